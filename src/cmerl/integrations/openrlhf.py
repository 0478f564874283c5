"""OpenRLHF's remote reward protocol, without importing OpenRLHF.

OpenRLHF (0.11) sends ``{"query": [...], "prompts": [...], "labels": [...]}`` to ``--reward.remote_url`` and
reads ``{"rewards": [...], "scores": [...], "extra_logs": {name: [...]}}``. ``query`` is
``tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)`` of the *actor*: the prompt
string followed by the response, with the actor's end-of-turn / EOS tokens still in it. The response is
therefore ``query[len(prompt):]`` with those stop strings stripped from its end.

``rewards`` are the CME rewards (mean log-prob); ``scores`` (used by OpenRLHF's dynamic filtering, which
expects 0-1 values) are ``exp(mean log-prob)``, the geometric-mean token probability.

The same protocol is served by ``cmerl serve`` at ``POST /get_reward`` and by the file
:mod:`cmerl.integrations.openrlhf_reward_func` for ``--reward.remote_url /path/to/that/file.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cmerl.formatting import RenderConfig
from cmerl.scoring.types import ResponseScore, Scorer

#: End-of-turn / EOS strings of common chat models, stripped from the end of an actor's response.
DEFAULT_STOP_STRINGS: tuple[str, ...] = (
    "<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "</s>", "<end_of_turn>", "<eos>", "<|end|>",
    "<|return|>", "<｜end▁of▁sentence｜>",
)

PROMPT_MODES = ("chat", "label", "verbatim")


class QueryMismatchError(ValueError):
    """A query that does not start with its prompt; ``index`` is the item's position in the request."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def strip_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` without trailing stop strings (repeatedly, e.g. ``"<|im_end|><|endoftext|>"``)."""
    stops = [s for s in stop_strings if s]
    changed = True
    while changed:
        changed = False
        for s in stops:
            if text.endswith(s):
                text = text[: -len(s)]
                changed = True
    return text


def split_queries(queries: Sequence[str], prompts: Sequence[str],
                  stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS) -> list[str]:
    """Responses of OpenRLHF queries: each query minus its prompt prefix, stop strings stripped.

    Raises :class:`QueryMismatchError` naming the first item whose query does not start with its prompt,
    and ValueError when the lists differ in length.
    """
    if len(queries) != len(prompts):
        raise ValueError(f"got {len(queries)} queries but {len(prompts)} prompts; they must pair up")
    out = []
    for i, (q, p) in enumerate(zip(queries, prompts)):
        if not q.startswith(p):
            k = next((j for j, (a, b) in enumerate(zip(q, p)) if a != b), min(len(q), len(p)))
            raise QueryMismatchError(
                i, f"item {i}: query does not start with its prompt (they differ at character {k}: "
                   f"query has {q[k:k + 20]!r}, prompt has {p[k:k + 20]!r}); the actor's tokenizer may not "
                   "round-trip this prompt")
        out.append(strip_stop_strings(q[len(p):], stop_strings))
    return out


def scoring_prompts(prompts: Sequence[str], labels: Sequence[Any] | None, mode: str) -> list[Any]:
    """What the verifier sees as the prompt: ``prompts`` (chat, verbatim) or ``labels`` (label mode)."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt mode {mode!r}; use one of {', '.join(PROMPT_MODES)}")
    if mode != "label":
        return list(prompts)
    if labels is None or len(labels) != len(prompts):
        raise ValueError(f"prompt mode 'label' needs one label per prompt (got "
                         f"{'none' if labels is None else len(labels)} for {len(prompts)} prompts)")
    for i, lab in enumerate(labels):
        if not isinstance(lab, (str, list)):
            raise TypeError(f"item {i}: label must be the prompt text or a message list (got {type(lab).__name__})")
    return list(labels)


def render_config_for(mode: str, base: RenderConfig) -> RenderConfig:
    """Render config of a prompt mode: ``verbatim`` uses the prompt string as the exact context text."""
    if mode == "verbatim":
        return RenderConfig(system_prompt=None, include_eos=base.include_eos, use_chat_template=False,
                            plain_template="{prompt}")
    return base


def reward_payload(scores: Sequence[ResponseScore], name: str = "cme") -> dict[str, Any]:
    """The OpenRLHF answer for scored items: rewards, 0-1 scores and per-item extra logs (plain lists)."""
    rewards = [s.mean_logprob for s in scores]
    return {
        "rewards": rewards,
        "scores": [math.exp(min(0.0, r)) for r in rewards],
        "extra_logs": {f"{name}_response_tokens": [float(s.n_tokens) for s in scores],
                       f"{name}_truncated": [float(s.truncated) for s in scores]},
    }


def score_queries(scorer: Scorer, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any] | None = None,
                  *, prompt_mode: str = "chat",
                  stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS) -> dict[str, Any]:
    """Score OpenRLHF queries with any :class:`~cmerl.scoring.types.Scorer`; returns :func:`reward_payload`.

    The scorer's render config decides the verifier-side format; for ``verbatim`` build it with
    ``render=render_config_for("verbatim", ...)``.
    """
    if prompt_mode == "verbatim" and getattr(scorer, "tokenizer", True) is None:
        raise ValueError("prompt mode 'verbatim' renders on this side: give the remote verifier a tokenizer "
                         "(CMERL_VERIFIER_TOKENIZER), or use the server's /get_reward with --prompt-mode verbatim")
    responses = split_queries(queries, prompts, stop_strings)
    pairs_prompts = scoring_prompts(prompts, labels, prompt_mode)
    return reward_payload(scorer.score(pairs_prompts, responses))
