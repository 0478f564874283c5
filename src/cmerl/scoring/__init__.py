"""Verifier scoring: requests in, per-token log-probs out (in-process or over HTTP).

:class:`Verifier` (the torch engine, :mod:`cmerl.scoring.local`) loads on first use, so the contract
(:mod:`~cmerl.scoring.types`), the request helpers (:mod:`~cmerl.scoring.requests`) and the HTTP client
(:mod:`~cmerl.scoring.remote`) import without torch.
"""

from cmerl.scoring.types import (
    DEFAULT_LOGPROB_FLOOR,
    SIGNALS,
    AsyncScorer,
    ResponseScore,
    Scorer,
    ScoreRequest,
)

__all__ = ["DEFAULT_LOGPROB_FLOOR", "SIGNALS", "AsyncScorer", "ResponseScore", "ScoreRequest", "Scorer", "Verifier"]


def __getattr__(name: str):
    if name == "Verifier":
        # Imported on first use, not at the top: the engine needs torch, which an HTTP client does not.
        # deferred: torch, via cmerl.scoring.local (torch-free CLI start)
        from cmerl.scoring.local import Verifier

        globals()["Verifier"] = Verifier
        return Verifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
