"""CME and the self-referential baselines as TRL reward functions.

Every reward here follows TRL's ``reward_funcs`` contract::

    reward(prompts=..., completions=..., completion_ids=..., **kwargs) -> list[float]

``prompts`` are strings (standard datasets) or message lists (conversational); ``completions`` are
strings or ``[{"role": "assistant", "content": str}]``. ``__name__`` gives TRL's metric name
(``rewards/<name>/mean``). When TRL passes ``log_metric``, the reward logs its own figures under
``<name>/...``: mean response tokens, truncated fraction and seconds spent.

* :class:`CrossModelEntropy` (``cme``): mean log-likelihood of the response under one or more frozen,
  independent verifiers (arXiv 2605.29009); ``signal`` picks ``mean_logprob`` (default), ``sum_logprob``
  or ``neg_entropy`` (negative mean verifier entropy, arXiv 2603.25450). Several verifiers average.
* :class:`SelfCertainty` (Intuitor, arXiv 2505.19590), :class:`NegativeEntropy` (RENT / EM-RL) and
  :class:`SelfLikelihood`: the same computation with the policy (or a frozen copy) as the scorer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from cmerl.models import model_identity
from cmerl.scoring.types import SIGNALS, ResponseScore


class SelfVerificationError(ValueError):
    """The verifier is the policy itself, and the self-referential ablation was not asked for."""


class VerifierReward:
    """Base class: score completions with ``scorers`` and turn each score into one float per completion.

    A scorer is anything with ``score(prompts, responses, entropy=..., self_certainty=...) ->
    list[ResponseScore]`` and a ``name``: a local :class:`~cmerl.scoring.Verifier` or a remote one.
    """

    default_name = "reward"

    def __init__(self, scorers: Any, *, signal: str = "mean_logprob", name: str | None = None):
        self.scorers = list(scorers) if isinstance(scorers, (list, tuple)) else [scorers]
        if not self.scorers:
            raise ValueError("at least one verifier is needed")
        valid = SIGNALS + ("self_certainty",)
        if signal not in valid:
            raise ValueError(f"unknown signal {signal!r}; use one of {', '.join(valid)}")
        self.signal = signal
        self.__name__ = name or self.default_name
        self.last_scores: list[list[ResponseScore]] = []

    def score(self, prompts: Sequence, completions: Sequence) -> list[list[ResponseScore]]:
        """Scores per scorer: ``out[k][i]`` is scorer k on completion i."""
        need_entropy = self.signal == "neg_entropy"
        need_sc = self.signal == "self_certainty"
        return [s.score(list(prompts), list(completions), entropy=need_entropy, self_certainty=need_sc)
                for s in self.scorers]

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 log_metric: Callable[[str, float], None] | None = None, **kwargs: Any) -> list[float]:
        t0 = time.perf_counter()
        return self.combine(self.score(prompts, completions), t0, log_metric)

    def combine(self, per_scorer: list[list[ResponseScore]], t0: float,
                log_metric: Callable[[str, float], None] | None = None) -> list[float]:
        """One reward per completion: the signal averaged over scorers; logs figures through ``log_metric``.

        ``per_scorer[k][i]`` is scorer k on completion i; ``t0`` is when scoring started (perf_counter).
        """
        self.last_scores = per_scorer
        n = len(per_scorer[0])
        rewards = [sum(scores[i].signal(self.signal) for scores in per_scorer) / len(per_scorer) for i in range(n)]
        if log_metric is not None and n:
            first = per_scorer[0]
            log_metric(f"{self.__name__}/response_tokens_mean", sum(s.n_tokens for s in first) / n)
            log_metric(f"{self.__name__}/truncated_frac",
                       sum(any(sc[i].truncated for sc in per_scorer) for i in range(n)) / n)
            log_metric(f"{self.__name__}/seconds", time.perf_counter() - t0)
        return rewards


class CrossModelEntropy(VerifierReward):
    """The CME reward: mean per-token log-likelihood of the response under frozen verifier(s).

    Args:
        verifiers: one scorer or a list (an ensemble: their scores are averaged).
        signal: ``mean_logprob`` (the paper's CME), ``sum_logprob`` or ``neg_entropy``.
        policy: the policy's model name or model object; a verifier that is the same model is refused
            unless ``allow_self_verification=True`` (the self-referential ablation).
    """

    default_name = "cme"

    def __init__(self, verifiers: Any, *, signal: str = "mean_logprob", policy: Any = None,
                 allow_self_verification: bool = False, name: str | None = None):
        if signal == "self_certainty":
            raise ValueError("self_certainty is a policy-side baseline; use cmerl.rewards.SelfCertainty")
        super().__init__(verifiers, signal=signal, name=name)
        if policy is not None and not allow_self_verification:
            check_independent(policy, self.scorers)


def check_independent(policy: Any, scorers: Sequence[Any]) -> None:
    """Raise :class:`SelfVerificationError` when a scorer is the policy model (same object or same source)."""
    policy_id = model_identity(policy)
    for s in scorers:
        model = getattr(s, "model", None)
        same_object = model is not None and model is policy
        same_source = model_identity(getattr(s, "source_name", None) or s.name) == policy_id or (
            model is not None and model_identity(model) == policy_id)
        if same_object or same_source:
            raise SelfVerificationError(
                f"verifier {s.name!r} is the policy model itself; CME needs an independent verifier. "
                "Pass allow_self_verification=True to run the self-referential ablation on purpose.")


class SelfCertainty(VerifierReward):
    """Intuitor's self-certainty: mean over response positions of KL(uniform || p_model)."""

    default_name = "self_certainty"

    def __init__(self, scorer: Any, *, name: str | None = None):
        super().__init__(scorer, signal="self_certainty", name=name)


class NegativeEntropy(VerifierReward):
    """RENT / EM-RL: negative mean token entropy of the model's next-token distributions on the response."""

    default_name = "neg_entropy"

    def __init__(self, scorer: Any, *, name: str | None = None):
        super().__init__(scorer, signal="neg_entropy", name=name)


class SelfLikelihood(VerifierReward):
    """Mean log-likelihood of the response under the policy itself (or a frozen copy)."""

    default_name = "self_likelihood"

    def __init__(self, scorer: Any, *, name: str | None = None):
        super().__init__(scorer, signal="mean_logprob", name=name)
