"""Plain data that crosses the scoring boundary: requests in, per-token statistics out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Signal = Literal["mean_logprob", "sum_logprob", "neg_entropy"]
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
