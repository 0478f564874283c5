"""What crosses the scoring boundary (no torch): requests in, per-token statistics out, and the
:class:`Scorer` role that the local engine, the remote client and the policy-side baselines all play."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from cmerl.formatting import Prompt

#: Per-token log-probs are clamped at this value (natural log) unless a scorer is given another floor.
DEFAULT_LOGPROB_FLOOR = -20.0
SIGNALS: tuple[str, ...] = ("mean_logprob", "sum_logprob", "neg_entropy")


@dataclass(frozen=True)
class ScoreRequest:
    """Token ids of a rendered pair; positions ``[response_start, len(input_ids))`` are scored.

    ``response_start >= 1`` whenever there is a response token (the first scored token needs a context
    token before it); ``response_start == len(input_ids)`` means an empty response.
    """

    input_ids: list[int]
    response_start: int
    #: one (start, end) character span within the response text per response token, when known
    #: (:func:`cmerl.formatting.render_pair`); carried onto :attr:`ResponseScore.token_offsets`.
    response_offsets: list[tuple[int, int]] | None = field(default=None, compare=False)

    @property
    def n_response_tokens(self) -> int:
        return len(self.input_ids) - self.response_start


@dataclass
class ResponseScore:
    """Verifier statistics of one response. Log-probs are natural logs, clamped at the engine's floor.

    token_logprobs: (n_tokens,) log p_V(y_t | x, y_<t).
    mean_logprob: the CME reward (mean of token_logprobs); ``empty_score`` for an empty response.
    sum_logprob: sum of token_logprobs; ``empty_score`` for an empty response.
    token_entropies: (n_tokens,) entropy (nats) of the verifier's next-token distribution at each scored
        position, when requested; ``mean_entropy`` is their mean (``-empty_score`` for an empty response).
    token_self_certainty: (n_tokens,) KL(uniform || p) at each position (Intuitor), when requested.
    truncated: prompt tokens were dropped from the left, or the response was cut to fit the context.
    token_ids: (n_tokens,) the verifier's ids of the scored tokens, when known.
    token_offsets: (n_tokens,) ``(start, end)`` character span of each scored token within the response
        string (``response[start:end]``), when known: set by the local engine and the remote client from
        the rendering (``ScoreRequest.response_offsets``), and by ``cmerl serve`` for text items. Spans are
        clamped to the response (a token merging across the prompt boundary starts at 0), may overlap
        (byte-level tokens of one multi-byte character share it), and are empty, ``(p, p)``, for special
        tokens: the end-of-turn token of ``include_eos`` is ``(len(response), len(response))``.
    """

    token_logprobs: list[float]
    n_tokens: int
    mean_logprob: float
    sum_logprob: float
    truncated: bool = False
    token_entropies: list[float] | None = None
    mean_entropy: float | None = None
    token_self_certainty: list[float] | None = None
    mean_self_certainty: float | None = None
    extra: dict = field(default_factory=dict)
    token_ids: list[int] | None = None
    token_offsets: list[tuple[int, int]] | None = None

    def signal(self, name: str) -> float:
        """Scalar reward for a signal name: mean_logprob, sum_logprob, neg_entropy, self_certainty."""
        if name == "mean_logprob":
            return self.mean_logprob
        if name == "sum_logprob":
            return self.sum_logprob
        if name == "neg_entropy":
            if self.mean_entropy is None:
                raise ValueError("neg_entropy needs scores computed with entropy=True")
            return -self.mean_entropy
        if name == "self_certainty":
            if self.mean_self_certainty is None:
                raise ValueError("self_certainty needs scores computed with self_certainty=True")
            return self.mean_self_certainty
        raise ValueError(f"unknown signal {name!r}; use one of {', '.join(SIGNALS + ('self_certainty',))}")

    def to_dict(self, *, with_tokens: bool = True) -> dict:
        d = asdict(self)
        if not with_tokens:
            for k in ("token_logprobs", "token_entropies", "token_self_certainty", "token_ids", "token_offsets"):
                d.pop(k)
        return d


def attach_token_positions(scores: list[ResponseScore], requests: list[ScoreRequest]) -> None:
    """Set ``token_ids`` and ``token_offsets`` of each score from the request it scored, in place.

    The scored tokens are a prefix of the request's response tokens (a response cut to fit the context
    keeps its first tokens), so both are the request's first ``n_tokens`` entries. Offsets stay None when
    the request carries none; a request whose offsets do not cover the scored tokens raises ValueError.
    """
    for i, (score, req) in enumerate(zip(scores, requests, strict=True)):
        n = score.n_tokens
        score.token_ids = list(req.input_ids[req.response_start:req.response_start + n])
        if req.response_offsets is not None:
            if len(req.response_offsets) < n:
                raise ValueError(f"request {i}: {len(req.response_offsets)} response offsets for {n} scored tokens")
            score.token_offsets = [tuple(o) for o in req.response_offsets[:n]]


def response_score_from_token_logprobs(
        token_logprobs: Sequence[float], *, floor: float, empty_score: float, truncated: bool = False,
        token_entropies: Sequence[float] | None = None,
        token_self_certainty: Sequence[float] | None = None) -> ResponseScore:
    """The one way a :class:`ResponseScore` is built from per-token values (every scorer and the server).

    token_logprobs: (n_tokens,) natural-log probabilities; each is clamped at ``floor`` and a non-finite
        value (NaN, -inf) becomes ``floor``. ``mean_logprob`` and ``sum_logprob`` are their exact (``fsum``)
        mean and sum in float64.
    token_entropies / token_self_certainty: (n_tokens,) when computed (nats), else None; their means are
        ``mean_entropy`` / ``mean_self_certainty``.
    An empty response (no tokens) scores ``empty_score`` as mean and sum, ``-empty_score`` mean entropy and
    0 self-certainty (when those were asked for, i.e. given as empty lists).
    """
    lp = [float(x) if math.isfinite(x) and x > floor else float(floor) for x in token_logprobs]
    ent = None if token_entropies is None else [float(x) for x in token_entropies]
    sc = None if token_self_certainty is None else [float(x) for x in token_self_certainty]
    if not lp:
        return ResponseScore(
            token_logprobs=[], n_tokens=0, mean_logprob=empty_score, sum_logprob=empty_score, truncated=truncated,
            token_entropies=[] if ent is not None else None, mean_entropy=-empty_score if ent is not None else None,
            token_self_certainty=[] if sc is not None else None, mean_self_certainty=0.0 if sc is not None else None)
    total = math.fsum(lp)
    return ResponseScore(
        token_logprobs=lp, n_tokens=len(lp), mean_logprob=total / len(lp), sum_logprob=total, truncated=truncated,
        token_entropies=ent, mean_entropy=math.fsum(ent) / len(ent) if ent else None,
        token_self_certainty=sc, mean_self_certainty=math.fsum(sc) / len(sc) if sc else None)


@runtime_checkable
class Scorer(Protocol):
    """The verifier role: (prompt, response) pairs or tokenized requests in, one :class:`ResponseScore` each.

    Played by the local engine (:class:`cmerl.scoring.Verifier`, also as the policy-side scorer of the
    self-certainty / entropy / self-likelihood baselines) and the HTTP client
    (:class:`cmerl.scoring.remote.RemoteVerifier`). Results are in input order; ``entropy`` /
    ``self_certainty`` ask for ``token_entropies`` / ``token_self_certainty`` as well (a scorer that cannot
    compute them raises ValueError). A scorer may also have a ``tokenizer`` (its vocabulary, used to align
    tokens for dense rewards) and ``source_name`` (the model it serves, for the independence guard); both
    are read with ``getattr`` and are not part of the protocol.
    """

    @property
    def name(self) -> str:
        """Shown in logs and metrics, and compared with the policy's name by the independence guard."""
        ...

    def score(self, prompts: Sequence[Prompt], responses: Sequence, *, entropy: bool = False,
              self_certainty: bool = False, progress: bool = False) -> list[ResponseScore]:
        """Score parallel lists of prompts and responses (strings or TRL conversational completions)."""
        ...

    def score_requests(self, requests: Sequence[ScoreRequest], *, entropy: bool = False,
                       self_certainty: bool = False, progress: bool = False) -> list[ResponseScore]:
        """Score requests already rendered and tokenized with this scorer's tokenizer."""
        ...


@runtime_checkable
class AsyncScorer(Scorer, Protocol):
    """A :class:`Scorer` that can also be awaited from any event loop (the remote client). Scorers without
    ``ascore`` are awaited through a worker thread (:func:`cmerl.integrations.common.ascore`)."""

    async def ascore(self, prompts: Sequence[Prompt], responses: Sequence, *, entropy: bool = False,
                     self_certainty: bool = False) -> list[ResponseScore]:
        """Async :meth:`score`."""
        ...
