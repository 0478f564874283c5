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
            for k in ("token_logprobs", "token_entropies", "token_self_certainty"):
                d.pop(k)
        return d
