"""Label-free variants of CME that correct for what raw verifier likelihood rewards: generic, predictable,
short text.

* **PMI CME** (``cme_pmi``, domain-conditional PMI, Holtzman et al. 2021, arXiv 2104.08315): how much more
  likely the prompt makes the response than a fixed, content-free instruction ``x0`` rendered with the same
  template does::

      pmi(y | x) = mean_t [ log p_V(y_t | x, y_<t) - lambda * log p_V(y_t | x0, y_<t) ]

  A generic answer that fits any instruction scores about as well under ``x0`` as under ``x``, so its PMI is
  near 0 (lambda = 1); an answer that needs this prompt scores above it. Both terms come from one verifier
  call (the ``x0`` rows are batched with the real ones).
* **Length-residualised CME** (``cme_length_resid``): within each GRPO group (the completions of one
  prompt), the residual of CME after a least-squares fit on log token length, so the group's ranking no
  longer rewards length (either way) for its own sake.

Both are pure functions over :class:`~cmerl.scoring.types.ResponseScore` lists, so any scorer (local,
remote) works; :mod:`cmerl.training.reward_setup` registers them as rewards and
:func:`cmerl.checks.reward_check` measures them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from cmerl.rewards import CrossModelEntropy
from cmerl.scoring.types import ResponseScore

#: The content-free instruction of the PMI's reference term (rendered like any prompt).
NULL_PROMPT = "Write a response."


def pmi_values(conditional: Sequence[ResponseScore], unconditional: Sequence[ResponseScore], *,
               lam: float = 1.0) -> list[float]:
    """Per response: mean_t [lp(y_t | x) - lam * lp(y_t | x0)].

    ``conditional[i]`` / ``unconditional[i]``: the same response scored after its prompt and after ``x0``.
    When both scored the same number of tokens this is the per-token mean of the difference; when the
    context changed the response's tokenisation at its boundary (rare), the difference of the two means.
    An empty response keeps the verifier's empty score (the conditional mean), never the difference of two
    equal constants: otherwise an empty answer would score 0 under lambda = 1 and beat real ones.
    """
    if len(conditional) != len(unconditional):
        raise ValueError(f"pmi needs one unconditional score per response ({len(conditional)} vs "
                         f"{len(unconditional)})")
    if not (0.0 <= lam <= 1.0) or math.isnan(lam):
        raise ValueError(f"lambda must be in [0, 1] (got {lam})")
    out = []
    for c, u in zip(conditional, unconditional):
        if c.n_tokens == 0:
            out.append(c.mean_logprob)
        elif c.n_tokens == u.n_tokens:
            out.append(sum(a - lam * b for a, b in zip(c.token_logprobs, u.token_logprobs)) / c.n_tokens)
        else:
            out.append(c.mean_logprob - lam * u.mean_logprob)
    return out


def score_pmi(scorer, prompts: Sequence, responses: Sequence, *, lam: float = 1.0,
              null_prompt: str = NULL_PROMPT, progress: bool = False) -> tuple[list[float], list[ResponseScore]]:
    """``(pmi values, conditional scores)`` of ``responses`` with one ``scorer.score`` call of 2n rows."""
    n = len(responses)
    scores = scorer.score(list(prompts) + [null_prompt] * n, list(responses) * 2, progress=progress)
    return pmi_values(scores[:n], scores[n:], lam=lam), scores[:n]


def length_residuals(values: Sequence[float], n_tokens: Sequence[int],
                     groups: Sequence[Hashable] | None = None) -> list[float]:
    """Residuals of ``values`` after a least-squares line on ``log(max(n_tokens, 1))`` within each group.

    ``groups[i]`` names the group of item i (a GRPO group: the prompt); None = one group of everything. A
    group of fewer than 3 items, or whose lengths are all equal, is only centred (value - group mean): a
    line through two points would leave residuals of 0. The output has the input's order.
    """
    if len(values) != len(n_tokens) or (groups is not None and len(groups) != len(values)):
        raise ValueError("values, n_tokens and groups must have the same length")
    keys = list(groups) if groups is not None else [0] * len(values)
    members: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    out = [0.0] * len(values)
    for idx in members.values():
        y = [float(values[i]) for i in idx]
        x = [math.log(max(int(n_tokens[i]), 1)) for i in idx]
        my, mx = sum(y) / len(y), sum(x) / len(x)
        sxx = sum((a - mx) ** 2 for a in x)
        slope = 0.0
        if len(idx) >= 3 and sxx > 1e-12:
            slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
        for i, a, b in zip(idx, x, y):
            out[i] = b - my - slope * (a - mx)
    return out


def prompt_key(prompt) -> Hashable:
    """A hashable key of a TRL prompt (a string, or a list of chat messages) for grouping completions."""
    if isinstance(prompt, str):
        return prompt
    return tuple((m.get("role"), m.get("content")) if isinstance(m, dict) else str(m) for m in prompt)


def null_prompt_like(prompt, null_prompt: str = NULL_PROMPT):
    """``x0`` in the form of ``prompt``: the null instruction as a string, or as the user turn of a chat
    (system turns kept, so the template and system prompt match the real context)."""
    if isinstance(prompt, str):
        return null_prompt
    system = [m for m in prompt if isinstance(m, dict) and m.get("role") == "system"]
    return [*system, {"role": "user", "content": null_prompt}]


class PMICrossModelEntropy(CrossModelEntropy):
    """``cme_pmi``: CME minus ``lam`` times the response's CME after a content-free instruction (see the
    module docstring), averaged over verifiers. One ``score`` call of 2n rows per verifier. Logs
    ``<name>/conditional_mean`` and ``<name>/null_mean`` (the two mean log-likelihoods) besides the usual
    figures."""

    default_name = "cme_pmi"

    def __init__(self, verifiers: Any, *, lam: float = 1.0, null_prompt: str = NULL_PROMPT, policy: Any = None,
                 allow_self_verification: bool = False, name: str | None = None):
        super().__init__(verifiers, policy=policy, allow_self_verification=allow_self_verification, name=name)
        pmi_values([], [], lam=lam)  # validates lam
        self.lam, self.null_prompt = float(lam), null_prompt

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 log_metric: Callable[[str, float], None] | None = None, **kwargs: Any) -> list[float]:
        t0 = time.perf_counter()
        n = len(completions)
        nulls = [null_prompt_like(p, self.null_prompt) for p in prompts]
        per_scorer = [s.score(list(prompts) + nulls, list(completions) * 2) for s in self.scorers]
        values = [pmi_values(sc[:n], sc[n:], lam=self.lam) for sc in per_scorer]
        rewards = [sum(v[i] for v in values) / len(values) for i in range(n)]
        self.rewards_from_scores([sc[:n] for sc in per_scorer], t0, log_metric)  # the usual token/truncation figures
        if log_metric is not None and n:
            log_metric(f"{self.__name__}/conditional_mean", sum(s.mean_logprob for s in per_scorer[0][:n]) / n)
            log_metric(f"{self.__name__}/null_mean", sum(s.mean_logprob for s in per_scorer[0][n:]) / n)
        return rewards


class LengthResidualCME(CrossModelEntropy):
    """``cme_length_resid``: CME residualised on log length within each prompt's group of completions
    (:func:`length_residuals`). Completions are grouped by their prompt, so any batch layout works."""

    default_name = "cme_length_resid"

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 log_metric: Callable[[str, float], None] | None = None, **kwargs: Any) -> list[float]:
        t0 = time.perf_counter()
        per_scorer = self.score(prompts, completions)
        raw = self.rewards_from_scores(per_scorer, t0, log_metric)
        lengths = [s.n_tokens for s in per_scorer[0]]
        return length_residuals(raw, lengths, [prompt_key(p) for p in prompts])
