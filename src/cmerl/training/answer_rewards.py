"""Registers the maths rewards of :mod:`cmerl.math_rewards` (``cme_answer``, ``correctness``) in the reward
registry; imported by :mod:`cmerl.training.reward_setup`."""

from __future__ import annotations

from cmerl.math_rewards import AnswerSpanCME, Correctness
from cmerl.training.reward_registry import RewardContext, register_reward


@register_reward("cme_answer", uses_verifiers=True, help=(
    "CME on the final answer: answer_weight x answer-span mean + (1 - answer_weight) x whole-response mean of "
    "the verifier signal (cme_signal: mean_logprob or neg_entropy); no answer: floor - missing_answer_penalty"))
def _cme_answer(ctx: RewardContext) -> AnswerSpanCME:
    cfg = ctx.cfg
    return AnswerSpanCME(ctx.verifiers(), signal=cfg.cme_signal, answer_weight=cfg.answer_weight,
                         missing_answer_penalty=cfg.missing_answer_penalty, answer_format=cfg.answer_format,
                         policy=ctx.policy_model, allow_self_verification=cfg.allow_self_verification)


@register_reward("correctness", help=(
    "ground truth: 1 if the completion's final answer equals the gold answer (math-verify), else 0 (vanilla "
    "GRPO's reward; needs a maths prompt set or answer_column)"))
def _correctness(ctx: RewardContext) -> Correctness:
    return Correctness(answer_format=ctx.cfg.answer_format)
