"""Verifier scoring: requests in, per-token log-probs out (in-process or over HTTP)."""

from cmerl.scoring.local import DEFAULT_LOGPROB_FLOOR, Verifier
from cmerl.scoring.types import SIGNALS, ResponseScore, ScoreRequest

__all__ = ["DEFAULT_LOGPROB_FLOOR", "SIGNALS", "ResponseScore", "ScoreRequest", "Verifier"]
