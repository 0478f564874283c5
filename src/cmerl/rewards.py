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
* :class:`ReverseKL` (``reverse_kl``): mean log q_V(y|x) - mean log pi(y|x), the verifier's log-likelihood
  minus the policy's own, a one-sample estimate of -KL(pi || q_V) per token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from cmerl.fingerprint import same_model
from cmerl.models import model_identity
from cmerl.scoring.types import SIGNALS, ResponseScore, Scorer
from cmerl.token_rewards import policy_token_rewards


class SelfVerificationError(ValueError):
    """The verifier is the policy itself, and the self-referential ablation was not asked for."""


class VerifierReward:
    """Base class: score completions with ``scorers`` and turn each score into one float per completion.

    A scorer plays the :class:`~cmerl.scoring.types.Scorer` role: a local :class:`~cmerl.scoring.Verifier`
    or a remote one.
    """

    default_name = "reward"

    def __init__(self, scorers: Scorer | Sequence[Scorer], *, signal: str = "mean_logprob",
                 name: str | None = None):
        self.scorers = list(scorers) if isinstance(scorers, (list, tuple)) else [scorers]
        if not self.scorers:
            raise ValueError("at least one verifier is needed")
        valid = SIGNALS + ("self_certainty",)
        if signal not in valid:
            raise ValueError(f"unknown signal {signal!r}; use one of {', '.join(valid)}")
        self.signal = signal
        self.__name__ = name or self.default_name

    def score(self, prompts: Sequence, completions: Sequence) -> list[list[ResponseScore]]:
        """Scores per scorer: ``out[k][i]`` is scorer k on completion i."""
        need_entropy = self.signal == "neg_entropy"
        need_sc = self.signal == "self_certainty"
        return [s.score(list(prompts), list(completions), entropy=need_entropy, self_certainty=need_sc)
                for s in self.scorers]

    #: set to the policy tokenizer to also compute per-policy-token rewards (:mod:`cmerl.token_rewards`)
    dense_tokenizer: Any = None
    #: the :class:`~cmerl.token_rewards.TokenRewards` of the last call (dense rewards only)
    last_token_rewards: Any = None

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 log_metric: Callable[[str, float], None] | None = None, **kwargs: Any) -> list[float]:
        t0 = time.perf_counter()
        per_scorer = self.score(prompts, completions)
        rewards = self.rewards_from_scores(per_scorer, t0, log_metric)
        if self.dense_tokenizer is not None:
            self.last_token_rewards = self.token_rewards(per_scorer, completions, completion_ids, log_metric)
        return rewards

    def token_rewards(self, per_scorer: list[list[ResponseScore]], completions: Sequence,
                      completion_ids: Sequence | None, log_metric: Callable[[str, float], None] | None = None):
        """Per-policy-token rewards of this call's scores (:func:`cmerl.token_rewards.policy_token_rewards`);
        logs ``<name>/alignment_misses`` and ``<name>/identity_frac``."""
        if completion_ids is None:
            raise ValueError(f"dense {self.__name__} needs TRL's completion_ids (TRL >= 0.18 passes them)")
        out = policy_token_rewards(per_scorer, completions, completion_ids, self.dense_tokenizer,
                                   signal=self.signal, scorer_tokenizers=[getattr(s, "tokenizer", None)
                                                                          for s in self.scorers],
                                   scorer_names=[str(getattr(s, "name", "verifier")) for s in self.scorers])
        if log_metric is not None and completions:
            log_metric(f"{self.__name__}/alignment_misses", float(out.misses))
            log_metric(f"{self.__name__}/identity_frac", out.identity_tokens / max(out.verifier_tokens, 1))
        return out

    def rewards_from_scores(self, per_scorer: list[list[ResponseScore]], t0: float,
                            log_metric: Callable[[str, float], None] | None = None) -> list[float]:
        """One reward per completion: the signal averaged over scorers; logs figures through ``log_metric``.

        ``per_scorer[k][i]`` is scorer k on completion i; ``t0`` is when scoring started (perf_counter).
        """
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
        dense: also compute per-policy-token rewards from the same verifier pass, kept as
            :attr:`last_token_rewards` for :class:`cmerl.training.dense.DenseGRPOTrainer`; needs
            ``policy_tokenizer``. The returned scalar rewards are unchanged.
    """

    default_name = "cme"

    def __init__(self, verifiers: Scorer | Sequence[Scorer], *, signal: str = "mean_logprob", policy: Any = None,
                 allow_self_verification: bool = False, name: str | None = None, dense: bool = False,
                 policy_tokenizer: Any = None):
        if signal == "self_certainty":
            raise ValueError("self_certainty is a policy-side baseline; use cmerl.rewards.SelfCertainty")
        super().__init__(verifiers, signal=signal, name=name)
        if policy is not None and not allow_self_verification:
            check_independent(policy, self.scorers)
        if dense:
            if policy_tokenizer is None:
                raise ValueError("dense=True needs policy_tokenizer (the policy's tokenizer) to align tokens")
            self.dense_tokenizer = policy_tokenizer


def check_independent(policy: Any, scorers: Sequence[Scorer]) -> None:
    """Raise :class:`SelfVerificationError` when a scorer is the policy model (same object or same source)."""
    policy_id = model_identity(policy)
    for s in scorers:
        model = getattr(s, "model", None)
        same_object = model is not None and model is policy
        scorer_id = model_identity(getattr(s, "source_name", None) or s.name)
        same_source = scorer_id == policy_id or (model is not None and model_identity(model) == policy_id) or (
            same_model(scorer_id, policy_id))  # one model under two names (alias vs hub id, copied folder)
        if same_object or same_source:
            raise SelfVerificationError(
                f"verifier {s.name!r} is the policy model itself; CME needs an independent verifier. "
                "Pass allow_self_verification=True to run the self-referential ablation on purpose.")


class SelfCertainty(VerifierReward):
    """Intuitor's self-certainty: mean over response positions of KL(uniform || p_model)."""

    default_name = "self_certainty"

    def __init__(self, scorer: Scorer, *, name: str | None = None):
        super().__init__(scorer, signal="self_certainty", name=name)


class NegativeEntropy(VerifierReward):
    """RENT / EM-RL: negative mean token entropy of the model's next-token distributions on the response."""

    default_name = "neg_entropy"

    def __init__(self, scorer: Scorer, *, name: str | None = None):
        super().__init__(scorer, signal="neg_entropy", name=name)


class SelfLikelihood(VerifierReward):
    """Mean log-likelihood of the response under the policy itself (or a frozen copy)."""

    default_name = "self_likelihood"

    def __init__(self, scorer: Scorer, *, name: str | None = None):
        super().__init__(scorer, signal="mean_logprob", name=name)


class ReverseKL(VerifierReward):
    """Reverse-KL reward: ``mean_t log q_V(y_t | x, y_<t) - mean_t log pi(y_t | x, y_<t)``.

    Maximising its expectation over y ~ pi minimises a per-token KL(pi || q_V) estimate: the policy is pulled
    toward the verifier and pushed away from its own most likely text (CME is the first term alone). Both
    terms are computed without gradient (the scorers run under ``torch.inference_mode``); with the live
    policy as ``policy_scorer`` the second term tracks the weights being trained.

    Args:
        verifiers: one scorer or a list (their mean log-probs are averaged, as in CME).
        policy_scorer: scorer of the policy (the live policy, or a frozen copy for a fixed-reference variant).
        policy: the policy's model or name; a verifier that is the policy itself is refused (the reward
            would be 0 for every completion) unless ``allow_self_verification=True``.

    Edge cases: a completion with no tokens scores the verifier's empty score (its floor, -20 by default)
    with no policy term, so an empty answer cannot earn the 0 that two equal floors would give. Both terms
    use the scorers' per-token floor. Logs ``reverse_kl/verifier_logprob_mean`` and
    ``reverse_kl/policy_logprob_mean`` next to the usual ``<name>/...`` figures.
    """

    default_name = "reverse_kl"

    def __init__(self, verifiers: Scorer | Sequence[Scorer], policy_scorer: Scorer, *, policy: Any = None,
                 allow_self_verification: bool = False, name: str | None = None):
        super().__init__(verifiers, signal="mean_logprob", name=name)
        self.policy_scorer = policy_scorer
        if policy is not None and not allow_self_verification:
            check_independent(policy, self.scorers)

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 log_metric: Callable[[str, float], None] | None = None, **kwargs: Any) -> list[float]:
        t0 = time.perf_counter()
        verifier_terms = self.rewards_from_scores(self.score(prompts, completions), t0, log_metric)
        policy_scores = self.policy_scorer.score(list(prompts), list(completions))
        rewards = [v - (p.mean_logprob if p.n_tokens else 0.0) for v, p in zip(verifier_terms, policy_scores)]
        if log_metric is not None and rewards:
            n = len(rewards)
            log_metric(f"{self.__name__}/verifier_logprob_mean", sum(verifier_terms) / n)
            log_metric(f"{self.__name__}/policy_logprob_mean", sum(p.mean_logprob for p in policy_scores) / n)
            log_metric(f"{self.__name__}/seconds", time.perf_counter() - t0)
        return rewards
