"""Rewards on the final answer of a maths solution: CME on the answer span, and ground-truth correctness.

Both follow TRL's ``reward_funcs`` contract (see :mod:`cmerl.rewards`); the gold answers arrive as the
``answer`` column of the dataset (``answer=[...]`` in the reward's keyword arguments).

**cme_answer** (:class:`AnswerSpanCME`). For a completion y with verifier values v_t over its tokens
T (``mean_logprob``: v_t = log q_V(y_t | x, y_<t); ``neg_entropy``: v_t = -H_t), answer tokens A (the
verifier tokens overlapping the answer's characters, :mod:`cmerl.answers`), weight w = ``answer_weight``
and penalty p = ``missing_answer_penalty``::

    whole  = mean_{t in T} v_t               (the plain CME signal)
    answer = mean_{t in A} v_t
    r      = w * answer + (1 - w) * whole          when A is not empty
    r      = w * floor  + (1 - w) * whole - p      when the completion has no final answer

where ``floor`` is the scoring engine's log-prob floor (-20 nats; below -log V for any real vocabulary):
a missing answer counts as the least likely answer there is, and p more. The reward is therefore never
NaN and a completion without an answer never receives a plain whole-response score (for w = 0 it still
loses p). An answer whose tokens were cut from the scored window (``truncated``) counts as missing.
Several verifiers: r is averaged over them. Logs ``cme_answer/missing_frac`` and
``cme_answer/answer_tokens_mean``.

**correctness** (:class:`Correctness`): 1.0 when :func:`cmerl.grading.grade` finds the completion's
final answer equal to the gold one, else 0.0 (a completion without an answer is wrong). Vanilla GRPO's
verifiable reward: the upper baseline CME is compared against. Logs ``correctness/no_answer_frac``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cmerl.answers import ANSWER_FORMATS, AnswerSpan, find_answer, token_indices_in_span
from cmerl.formatting import completion_text
from cmerl.grading import grade
from cmerl.rewards import VerifierReward, check_independent
from cmerl.scoring.types import DEFAULT_LOGPROB_FLOOR, ResponseScore

#: The scoring engine's default per-token log-prob floor.
LOGPROB_FLOOR = DEFAULT_LOGPROB_FLOOR
ANSWER_SIGNALS = ("mean_logprob", "neg_entropy")


@dataclass(frozen=True)
class AnswerSpanScore:
    """The parts of one completion's cme_answer reward (module docstring): ``answer`` is None and
    ``n_answer_tokens`` 0 when the answer is missing; ``span`` is where it was found in the text (None
    when the text has none; set, with ``answer`` None, when its tokens were not scored)."""

    reward: float
    whole: float
    answer: float | None
    n_answer_tokens: int
    span: AnswerSpan | None


def token_values(score: ResponseScore, signal: str) -> tuple[list[float], float]:
    """Per-token values and their whole-response mean for ``signal`` (``mean_logprob``: log-probs;
    ``neg_entropy``: negated entropies). Raises ValueError when the scorer did not return them."""
    if signal == "mean_logprob":
        return list(score.token_logprobs), score.mean_logprob
    if signal == "neg_entropy":
        if score.token_entropies is None or score.mean_entropy is None:
            raise ValueError("neg_entropy needs scores computed with entropy=True")
        return [-h for h in score.token_entropies], -score.mean_entropy
    raise ValueError(f"unknown answer-span signal {signal!r}; use one of {', '.join(ANSWER_SIGNALS)}")


def response_offsets(score: ResponseScore) -> list[tuple[int, int]] | None:
    """Per-token character offsets of the scored response tokens, as the scorer reports them (None when
    it does not)."""
    offsets = getattr(score, "token_offsets", None)
    return None if offsets is None else [(int(a), int(b)) for a, b in offsets]


def answer_span_score(score: ResponseScore, response: str, *, signal: str = "mean_logprob",
                      answer_weight: float = 1.0, missing_answer_penalty: float = 5.0,
                      answer_format: str = "auto", floor: float = LOGPROB_FLOOR) -> AnswerSpanScore:
    """The cme_answer reward of one scored completion (module docstring). ``response`` is the text the
    scorer scored; its token offsets (``score.token_offsets``) index into it. Raises ValueError when the
    completion has an answer but the score carries no offsets to find its tokens."""
    if not 0.0 <= answer_weight <= 1.0:
        raise ValueError(f"answer_weight must be in [0, 1] (got {answer_weight})")
    values, whole = token_values(score, signal)
    span = find_answer(response, answer_format)
    answer = None
    n = 0
    if span is not None:
        offsets = response_offsets(score)
        if offsets is None:
            raise ValueError("the scorer returned no per-token character offsets (ResponseScore.token_offsets), "
                             "so the answer span cannot be mapped onto its tokens")
        if len(offsets) != len(values):
            raise ValueError(f"{len(offsets)} token offsets for {len(values)} scored tokens")
        idx = token_indices_in_span(offsets, span.start, span.end)
        if idx:
            n = len(idx)
            answer = sum(values[i] for i in idx) / n
    if answer is None:
        reward = answer_weight * floor + (1.0 - answer_weight) * whole - missing_answer_penalty
    else:
        reward = answer_weight * answer + (1.0 - answer_weight) * whole
    if not math.isfinite(reward):
        raise ValueError(f"cme_answer reward is not finite ({reward}); whole={whole}, answer={answer}")
    return AnswerSpanScore(reward=reward, whole=whole, answer=answer, n_answer_tokens=n, span=span)


class AnswerSpanCME(VerifierReward):
    """CME on the final answer (``cme_answer``): see the module docstring for the formula.

    Args:
        verifiers: one scorer or a list (averaged). Scorers must return per-token character offsets.
        signal: ``mean_logprob`` (cross-entropy) or ``neg_entropy``.
        answer_weight: w in [0, 1]; missing_answer_penalty: p >= 0 (nats); answer_format: ``auto``,
            ``boxed`` or ``gsm8k``; policy / allow_self_verification: as :class:`cmerl.rewards.CrossModelEntropy`.
    """

    default_name = "cme_answer"

    def __init__(self, verifiers: Any, *, signal: str = "mean_logprob", answer_weight: float = 1.0,
                 missing_answer_penalty: float = 5.0, answer_format: str = "auto", policy: Any = None,
                 allow_self_verification: bool = False, floor: float = LOGPROB_FLOOR, name: str | None = None):
        if signal not in ANSWER_SIGNALS:
            raise ValueError(f"cme_answer signal must be one of {', '.join(ANSWER_SIGNALS)} (got {signal!r})")
        if not 0.0 <= answer_weight <= 1.0:
            raise ValueError(f"answer_weight must be in [0, 1] (got {answer_weight})")
        if not (math.isfinite(missing_answer_penalty) and missing_answer_penalty >= 0):
            raise ValueError(f"missing_answer_penalty must be a finite number >= 0 (got {missing_answer_penalty})")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"unknown answer format {answer_format!r}; use one of {', '.join(ANSWER_FORMATS)}")
        super().__init__(verifiers, signal=signal, name=name)
        if policy is not None and not allow_self_verification:
            check_independent(policy, self.scorers)
        self.answer_weight = float(answer_weight)
        self.missing_answer_penalty = float(missing_answer_penalty)
        self.answer_format = answer_format
        self.floor = float(floor)
        self.last_parts: list[list[AnswerSpanScore]] = []

    def parts(self, per_scorer: list[list[ResponseScore]], responses: Sequence[str]) -> list[list[AnswerSpanScore]]:
        """:func:`answer_span_score` of every (scorer, completion): ``out[k][i]``."""
        return [[answer_span_score(s, text, signal=self.signal, answer_weight=self.answer_weight,
                                   missing_answer_penalty=self.missing_answer_penalty,
                                   answer_format=self.answer_format, floor=self.floor)
                 for s, text in zip(scores, responses, strict=True)] for scores in per_scorer]

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 log_metric: Callable[[str, float], None] | None = None, **kwargs: Any) -> list[float]:
        t0 = time.perf_counter()
        texts = [completion_text(c) for c in completions]
        per_scorer = self.score(prompts, completions)
        parts = self.parts(per_scorer, texts)
        self.last_parts = parts
        n = len(texts)
        rewards = [sum(p[i].reward for p in parts) / len(parts) for i in range(n)]
        if log_metric is not None and n:
            first = parts[0]
            log_metric(f"{self.__name__}/missing_frac", sum(p.answer is None for p in first) / n)
            log_metric(f"{self.__name__}/answer_tokens_mean", sum(p.n_answer_tokens for p in first) / n)
            log_metric(f"{self.__name__}/response_tokens_mean", sum(s.n_tokens for s in per_scorer[0]) / n)
            log_metric(f"{self.__name__}/seconds", time.perf_counter() - t0)
        return rewards


class Correctness:
    """Ground-truth correctness (``correctness``): 1.0 if the completion's final answer equals the gold
    ``answer`` of its row (math-verify), else 0.0.

    >>> Correctness()(prompts=["1+1?"], completions=["so \\\\boxed{2}"], answer=["2"])
    [1.0]
    """

    __name__ = "correctness"

    def __init__(self, *, answer_format: str = "auto"):
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"unknown answer format {answer_format!r}; use one of {', '.join(ANSWER_FORMATS)}")
        self.answer_format = answer_format

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 log_metric: Callable[[str, float], None] | None = None, answer: Sequence[str] | None = None,
                 **kwargs: Any) -> list[float]:
        if answer is None:
            raise ValueError("the correctness reward needs the gold answers: a dataset column 'answer' (use a "
                             "maths prompt set such as gsm8k_train, or set answer_column)")
        if len(answer) != len(completions):
            raise ValueError(f"got {len(answer)} gold answers for {len(completions)} completions")
        grades = [grade(completion_text(c), str(g), answer_format=self.answer_format)
                  for c, g in zip(completions, answer)]
        if log_metric is not None and grades:
            log_metric(f"{self.__name__}/no_answer_frac", sum(g.extracted is None for g in grades) / len(grades))
        return [1.0 if g.correct else 0.0 for g in grades]
