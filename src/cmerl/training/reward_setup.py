"""Verifiers and reward functions of a run, each wrapped by :class:`GuardedReward` (repetition guard and
per-step degeneration diagnostics)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cmerl.diagnostics import RepetitionGuard, batch_diagnostics, repeated_ngram_share
from cmerl.training.config import ConfigError, TrainConfig, is_remote, parse_remote_spec


# --------------------------------------------------------------------------------------------- rewards
def build_scorer(spec: str, *, dtype: str = "auto", batch_tokens: int = 4096, device: str | None = None,
                 render=None):
    """The one place a verifier is constructed: a model name loads a local :class:`~cmerl.scoring.Verifier`
    (on ``device``; None = this process's accelerator device); an ``http(s)://`` URL gives a remote verifier
    (``cmerl.scoring.remote``)."""
    kwargs = {} if render is None else {"render": render}
    if is_remote(spec):
        try:
            from cmerl.scoring.remote import RemoteVerifier
        except ImportError as exc:
            raise ConfigError(f"verifier {spec!r} is a URL, but remote scoring (cmerl.scoring.remote) is not "
                              "available in this install") from exc
        url, options = parse_remote_spec(spec)
        return RemoteVerifier(url, options.pop("tokenizer", None), **options, **kwargs)
    from cmerl.scoring import Verifier

    if device is None:
        from accelerate import PartialState

        device = str(PartialState().device)
    return Verifier.from_pretrained(spec, dtype=dtype, device=device, max_batch_tokens=batch_tokens, **kwargs)


def policy_render_config(cfg: TrainConfig):
    """How the policy's prompts are rendered during generation, for scoring with the policy itself."""
    from cmerl.formatting import TEMPLATE_DEFAULT, RenderConfig

    return RenderConfig(system_prompt=cfg.system_prompt if cfg.system_prompt is not None else TEMPLATE_DEFAULT)


class GuardedReward:
    """A TRL reward function around another one: scores against the ``raw_prompt`` column (the prompt as the
    user wrote it, before the policy's formatting), applies the repetition guard, and logs diagnostics.

    With ``diagnostics=True`` it logs, through TRL's ``log_metric``, ``diagnostics/completion_length_mean``,
    ``diagnostics/truncated_frac``, ``diagnostics/distinct_2`` and ``diagnostics/repeated_4gram_share``
    (computed on completion token ids), and adds a ``repeated_4gram_share`` column to the completions table.
    The guard logs ``<name>/floored_frac``.
    """

    def __init__(self, reward: Callable, *, guard: RepetitionGuard | None = None, diagnostics: bool = False,
                 eos_ids: Sequence[int] = (), max_completion_length: int | None = None):
        self.reward = reward
        self.guard = guard
        self.diagnostics = diagnostics
        self.eos_ids = list(eos_ids)
        self.max_completion_length = max_completion_length
        self.__name__ = getattr(reward, "__name__", type(reward).__name__)

    def _sequences(self, completions: Sequence, completion_ids: Sequence | None) -> list[list]:
        if completion_ids is not None:
            return [list(ids) for ids in completion_ids]
        from cmerl.formatting import completion_text

        return [completion_text(c).split() for c in completions]

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 log_metric: Callable[[str, float], None] | None = None,
                 log_extra: Callable[[str, list], None] | None = None, raw_prompt: Sequence | None = None,
                 **kwargs: Any) -> list[float | None]:
        score_prompts = list(raw_prompt) if raw_prompt is not None else list(prompts)
        rewards = list(self.reward(prompts=score_prompts, completions=completions, completion_ids=completion_ids,
                                   log_metric=log_metric, **kwargs))
        seqs = self._sequences(completions, completion_ids)
        if self.guard is not None:
            rewards, n_floored = self.guard.apply(rewards, seqs)
            if log_metric is not None and seqs:
                log_metric(f"{self.__name__}/floored_frac", n_floored / len(seqs))
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


def build_rewards(cfg: TrainConfig, policy_model, policy_tokenizer, *, eos_ids: Sequence[int] = ()) -> list[GuardedReward]:
    """The run's reward functions, in ``cfg.rewards`` order, each wrapped in :class:`GuardedReward`
    (diagnostics logged by the first). Loads the verifiers (and the frozen policy copy if asked)."""
    from cmerl.rewards import CrossModelEntropy, NegativeEntropy, SelfCertainty, SelfLikelihood
    from cmerl.scoring import Verifier

    baseline_scorer = None

    def get_baseline_scorer():
        nonlocal baseline_scorer
        if baseline_scorer is None:
            if cfg.baseline_scorer == "policy":
                # The live policy: same object the trainer updates (LoRA layers are injected into it in place).
                # fp32_head=False: a cached float32 copy of the head would go stale as the policy trains.
                baseline_scorer = Verifier(policy_model, policy_tokenizer, name=f"{cfg.policy} (live policy)",
                                           render=policy_render_config(cfg), fp32_head=False,
                                           max_batch_tokens=cfg.verifier_batch_tokens)
            else:
                baseline_scorer = build_scorer(cfg.policy, dtype=cfg.verifier_dtype,
                                               batch_tokens=cfg.verifier_batch_tokens, device=cfg.verifier_device,
                                               render=policy_render_config(cfg))
        return baseline_scorer

    guard = (RepetitionGuard(cfg.repetition_ngram, cfg.repetition_max_share, cfg.repetition_floor)
             if cfg.repetition_guard else None)
    out = []
    for i, name in enumerate(cfg.rewards):
        if name == "cme":
            scorers = [build_scorer(v, dtype=cfg.verifier_dtype, batch_tokens=cfg.verifier_batch_tokens,
                                    device=cfg.verifier_device) for v in cfg.verifiers]
            fn = CrossModelEntropy(scorers, signal=cfg.cme_signal, policy=policy_model,
                                   allow_self_verification=cfg.allow_self_verification)
        elif name == "self_certainty":
            fn = SelfCertainty(get_baseline_scorer())
        elif name == "neg_entropy":
            fn = NegativeEntropy(get_baseline_scorer())
        else:
            fn = SelfLikelihood(get_baseline_scorer())
        out.append(GuardedReward(fn, guard=guard, diagnostics=(i == 0), eos_ids=eos_ids,
                                 max_completion_length=cfg.max_completion_length))
    return out


