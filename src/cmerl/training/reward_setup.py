"""Verifiers and reward functions of a run: the built-in rewards of the registry
(:mod:`cmerl.training.reward_registry`), each wrapped by :class:`GuardedReward` (scores against the raw
prompt, per-step degeneration diagnostics), plus :class:`RepetitionGuardReward`, the repetition guard as
one more TRL reward so that it acts on the combined reward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cmerl.diagnostics import RepetitionGuard, batch_diagnostics, repeated_ngram_share
from cmerl.formatting import TEMPLATE_DEFAULT, RenderConfig, completion_text
from cmerl.reward_variants import LengthResidualCME, PMICrossModelEntropy
from cmerl.rewards import CrossModelEntropy, NegativeEntropy, ReverseKL, SelfCertainty, SelfLikelihood
from cmerl.scoring.remote import is_remote, remote_verifier_from_spec
from cmerl.training.config import TrainConfig
from cmerl.training.reward_registry import RewardContext, get_reward, register_reward


# --------------------------------------------------------------------------------------------- rewards
def build_scorer(spec: str, *, dtype: str = "auto", batch_tokens: int = 4096, device: str | None = None,
                 render=None):
    """The one place a verifier is constructed: a model name loads a local :class:`~cmerl.scoring.Verifier`
    (on ``device``; None = this process's accelerator device); an ``http(s)://`` URL gives a remote verifier
    (``cmerl.scoring.remote``)."""
    kwargs = {} if render is None else {"render": render}
    if is_remote(spec):
        return remote_verifier_from_spec(spec, **kwargs)
    # deferred: torch, via cmerl.scoring.Verifier (slow import, loaded only when used)
    from cmerl.scoring import Verifier

    if device is None:
        from accelerate import PartialState  # deferred: accelerate (slow import, loaded only when used)

        device = str(PartialState().device)
    return Verifier.from_pretrained(spec, dtype=dtype, device=device, max_batch_tokens=batch_tokens, **kwargs)


def policy_render_config(cfg: TrainConfig):
    """How the policy's prompts are rendered during generation, for scoring with the policy itself."""
    return RenderConfig(system_prompt=cfg.system_prompt if cfg.system_prompt is not None else TEMPLATE_DEFAULT)


class GuardedReward:
    """A TRL reward function around another one: scores against the ``raw_prompt`` column (the prompt as the
    user wrote it, before the policy's formatting), hands degenerate completions to the repetition guard,
    and logs diagnostics.

    With a ``guard``, a completion the guard calls degenerate gets ``None`` ("does not apply") from this
    reward: its combined reward is then the guard's floor alone (:class:`RepetitionGuardReward`, which
    must be in the same TRL reward list), whatever the weights of the other rewards. TRL's
    ``rewards/<name>/mean`` then averages over the completions that were not floored.

    With ``diagnostics=True`` it logs, through TRL's ``log_metric``, ``diagnostics/completion_length_mean``,
    ``diagnostics/truncated_frac``, ``diagnostics/distinct_2`` and ``diagnostics/repeated_4gram_share``
    (computed on completion token ids), and adds a ``repeated_4gram_share`` column to the completions table.
    """

    def __init__(self, reward: Callable, *, guard: RepetitionGuard | None = None, diagnostics: bool = False,
                 eos_ids: Sequence[int] = (), max_completion_length: int | None = None):
        self.reward = reward
        self.guard = guard
        self.diagnostics = diagnostics
        self.eos_ids = list(eos_ids)
        self.max_completion_length = max_completion_length
        self.__name__ = getattr(reward, "__name__", type(reward).__name__)

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 log_metric: Callable[[str, float], None] | None = None,
                 log_extra: Callable[[str, list], None] | None = None, raw_prompt: Sequence | None = None,
                 **kwargs: Any) -> list[float | None]:
        score_prompts = list(raw_prompt) if raw_prompt is not None else list(prompts)
        rewards = list(self.reward(prompts=score_prompts, completions=completions, completion_ids=completion_ids,
                                   log_metric=log_metric, **kwargs))
        seqs = completion_sequences(completions, completion_ids)
        if self.guard is not None:
            rewards = [None if self.guard.degenerate(seq) else r for r, seq in zip(rewards, seqs, strict=True)]
        if self.diagnostics and seqs:
            stats = batch_diagnostics(seqs, eos_ids=self.eos_ids, max_completion_length=self.max_completion_length)
            if log_metric is not None:
                for name, value in stats.as_metrics().items():
                    log_metric(name, value)
            if log_extra is not None:
                eos = set(self.eos_ids)
                log_extra("repeated_4gram_share", [
                    round(repeated_ngram_share(s[:-1] if s and s[-1] in eos else s, 4), 3) for s in seqs])
        return rewards


def completion_sequences(completions: Sequence, completion_ids: Sequence | None) -> list[list]:
    """What the guard and the diagnostics count n-grams of: the completion token ids when TRL passes them,
    else the whitespace-split words of the completion texts."""
    if completion_ids is not None:
        return [list(ids) for ids in completion_ids]

    return [completion_text(c).split() for c in completions]


class RepetitionGuardReward:
    """The repetition guard as a TRL reward (``repetition_guard``, weight 1): ``guard.floor`` for a
    completion the guard calls degenerate, 0.0 for every other one.

    The run's other rewards (wrapped in :class:`GuardedReward` with the same guard) return ``None`` for the
    degenerate completions, so TRL's weighted sum (``sum_then_normalize``) gives them exactly ``floor``,
    while every other completion's sum is unchanged. Flooring each reward before weighting instead would
    let a negative weight turn the floor into a bonus (``-1 x -20 = +20``). Under ``normalize_then_sum``
    the guard's column is normalised like the others: floored completions get its large negative z-score.

    Logs ``repetition_guard/floored_frac``.
    """

    __name__ = "repetition_guard"

    def __init__(self, guard: RepetitionGuard):
        self.guard = guard

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 log_metric: Callable[[str, float], None] | None = None, **kwargs: Any) -> list[float]:
        seqs = completion_sequences(completions, completion_ids)
        flags = [self.guard.degenerate(seq) for seq in seqs]
        if log_metric is not None and seqs:
            log_metric(f"{self.__name__}/floored_frac", sum(flags) / len(seqs))
        return [self.guard.floor if bad else 0.0 for bad in flags]


# ------------------------------------------------------------------------------ the built-in rewards
class RunRewardContext:
    """:class:`~cmerl.training.reward_registry.RewardContext` of one run: builds the verifiers and the
    policy-side scorer on first use, once each, so every reward that needs them shares them."""

    def __init__(self, cfg: TrainConfig, policy_model: Any, policy_tokenizer: Any):
        self.cfg = cfg
        self.policy_model = policy_model
        self.policy_tokenizer = policy_tokenizer
        self._verifiers: list[Any] | None = None
        self._policy_scorer: Any = None

    def verifiers(self) -> list[Any]:
        if self._verifiers is None:
            cfg = self.cfg
            self._verifiers = [build_scorer(v, dtype=cfg.verifier_dtype, batch_tokens=cfg.verifier_batch_tokens,
                                            device=cfg.verifier_device) for v in cfg.verifiers]
        return self._verifiers

    def policy_scorer(self) -> Any:
        if self._policy_scorer is None:
            cfg = self.cfg
            if cfg.baseline_scorer == "policy":
                # deferred: torch, via cmerl.scoring.Verifier (slow import, loaded only when used)
                from cmerl.scoring import Verifier

                # The live policy: same object the trainer updates (LoRA layers are injected into it in place).
                # fp32_head=False: a cached float32 copy of the head would go stale as the policy trains.
                self._policy_scorer = Verifier(self.policy_model, self.policy_tokenizer,
                                               name=f"{cfg.policy} (live policy)", render=policy_render_config(cfg),
                                               fp32_head=False, max_batch_tokens=cfg.verifier_batch_tokens)
            else:
                self._policy_scorer = build_scorer(cfg.policy, dtype=cfg.verifier_dtype,
                                                   batch_tokens=cfg.verifier_batch_tokens,
                                                   device=cfg.verifier_device, render=policy_render_config(cfg))
        return self._policy_scorer


@register_reward("cme", uses_verifiers=True, help=(
    "mean log-likelihood of the completion under the verifier(s) (cme_signal: mean_logprob, sum_logprob or "
    "neg_entropy); several verifiers are averaged"))
def _cme(ctx: RewardContext) -> CrossModelEntropy:
    return CrossModelEntropy(ctx.verifiers(), signal=ctx.cfg.cme_signal, policy=ctx.policy_model,
                             allow_self_verification=ctx.cfg.allow_self_verification,
                             dense=ctx.cfg.dense, policy_tokenizer=ctx.policy_tokenizer)


@register_reward("self_certainty", uses_policy=True, help=(
    "Intuitor: mean KL(uniform || p) of the policy's next-token distributions"))
def _self_certainty(ctx: RewardContext) -> SelfCertainty:
    return SelfCertainty(ctx.policy_scorer())


@register_reward("neg_entropy", uses_policy=True, help="RENT / EM-RL: negative mean token entropy of the policy")
def _neg_entropy(ctx: RewardContext) -> NegativeEntropy:
    return NegativeEntropy(ctx.policy_scorer())


@register_reward("self_likelihood", uses_policy=True, help="mean log-likelihood of the completion under the policy")
def _self_likelihood(ctx: RewardContext) -> SelfLikelihood:
    return SelfLikelihood(ctx.policy_scorer())


@register_reward("reverse_kl", uses_verifiers=True, uses_policy=True, help=(
    "mean log q_V(y|x) - mean log pi(y|x): verifier log-likelihood minus the policy's own (no gradient "
    "through the reward)"))
def _reverse_kl(ctx: RewardContext) -> ReverseKL:
    return ReverseKL(ctx.verifiers(), ctx.policy_scorer(), policy=ctx.policy_model,
                     allow_self_verification=ctx.cfg.allow_self_verification)


@register_reward("cme_pmi", uses_verifiers=True, help=(
    "pointwise-mutual-information CME: mean log p_V(y|x) - pmi_lambda * mean log p_V(y|x0), x0 a content-free "
    "instruction (pmi_null_prompt); generic answers that fit any prompt score ~0"))
def _cme_pmi(ctx: RewardContext) -> PMICrossModelEntropy:
    return PMICrossModelEntropy(ctx.verifiers(), lam=ctx.cfg.pmi_lambda, null_prompt=ctx.cfg.pmi_null_prompt,
                                policy=ctx.policy_model, allow_self_verification=ctx.cfg.allow_self_verification)


@register_reward("cme_length_resid", uses_verifiers=True, help=(
    "CME residualised on log completion length within each prompt's group (least squares): ranks a group's "
    "completions by CME beyond what their length predicts"))
def _cme_length_resid(ctx: RewardContext) -> LengthResidualCME:
    return LengthResidualCME(ctx.verifiers(), signal=ctx.cfg.cme_signal, policy=ctx.policy_model,
                             allow_self_verification=ctx.cfg.allow_self_verification)


def build_rewards(cfg: TrainConfig, policy_model, policy_tokenizer, *, eos_ids: Sequence[int] = ()) -> list[Callable]:
    """The run's TRL reward functions: one per ``cfg.rewards`` name, in order, built by the registry and
    wrapped in :class:`GuardedReward` (diagnostics logged by the first), then, when ``cfg.repetition_guard``
    is on, :class:`RepetitionGuardReward` last. Pass ``reward_weights=training.trl_reward_weights(cfg)``
    (one more weight, 1.0, for the guard) to a hand-built ``GRPOTrainer``. Loads the verifiers (and the
    frozen policy copy if asked) once, however many rewards use them."""
    ctx = RunRewardContext(cfg, policy_model, policy_tokenizer)
    guard = (RepetitionGuard(cfg.repetition_ngram, cfg.repetition_max_share, cfg.repetition_floor)
             if cfg.repetition_guard else None)
    out: list[Callable] = []
    for i, name in enumerate(cfg.rewards):
        fn = get_reward(name).build(ctx)
        out.append(GuardedReward(fn, guard=guard, diagnostics=(i == 0), eos_ids=eos_ids,
                                 max_completion_length=cfg.max_completion_length))
    if guard is not None:
        out.append(RepetitionGuardReward(guard))
    return out


from cmerl.training import answer_rewards as _answer_rewards  # noqa: F401  (registers cme_answer, correctness)
