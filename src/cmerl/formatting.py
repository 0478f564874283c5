"""How a (prompt, response) pair is rendered for one tokenizer, with the exact span of response tokens.

Rule (lm-evaluation-harness): the context (everything before the response: template, system turn, user
turn, assistant header) is encoded alone; the response tokens are whatever the encoding of
``context + response`` adds after the tokens it shares with the context encoding. Template tokens are
never scored as response tokens; a token that merges across the boundary counts as a response token.

Prompts are strings or chat message lists (``[{"role": ..., "content": ...}]``), exactly as TRL passes them.
Tokenizers with a chat template use it (the prompt is the user turn, the response the assistant turn);
tokenizers without one use :attr:`RenderConfig.plain_template`.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
Prompt = str | list[Message]

#: Pass as ``RenderConfig.system_prompt`` to let a chat template insert its own default system prompt.
TEMPLATE_DEFAULT = "<template-default>"

DEFAULT_PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass(frozen=True)
class RenderConfig:
    """How to render pairs for one tokenizer.

    system_prompt: ``None`` renders no system prompt: for templates that inject a default system prompt
        when none is given (SmolLM2, Qwen2.5), an empty system turn is passed so nothing leaks in. A string
        is used as the system turn; :data:`TEMPLATE_DEFAULT` keeps the template's own default.
    include_eos: also score the end-of-turn token (chat templates) or EOS (plain format) after the response.
    use_chat_template: ``None`` = use it when the tokenizer has one; ``False`` forces the plain format.
    plain_template: format for tokenizers without a chat template; must contain ``{prompt}``.
    """

    system_prompt: str | None = None
    include_eos: bool = False
    use_chat_template: bool | None = None
    plain_template: str = DEFAULT_PLAIN_TEMPLATE

    def __post_init__(self) -> None:
        if "{prompt}" not in self.plain_template:
            raise ValueError(f"plain_template must contain '{{prompt}}' (got {self.plain_template!r})")


@dataclass(frozen=True)
class RenderedPair:
    """Token ids of one rendered pair; the response occupies ``input_ids[response_start:]``.

    ``n_response_tokens`` counts the scored tokens (the end-of-turn token included when ``include_eos``).
    An empty response has ``response_start == len(input_ids)``.
    ``response_offsets``: one ``(start, end)`` character span *within the response string* per response
    token (:func:`response_token_offsets`; slow tokenizers: :func:`token_char_spans`). None only when
    built by hand without them.
    """

    input_ids: list[int]
    response_start: int
    response_offsets: list[tuple[int, int]] | None = field(default=None, compare=False)

    @property
    def n_response_tokens(self) -> int:
        return len(self.input_ids) - self.response_start


def uses_chat_template(tokenizer, config: RenderConfig) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if config.use_chat_template is None:
        return has
    if config.use_chat_template and not has:
        raise ValueError(f"use_chat_template=True but tokenizer {tokenizer.name_or_path!r} has no chat template")
    return config.use_chat_template


def as_messages(prompt: Prompt) -> list[Message]:
    """A prompt as a message list; validates shape and names the problem."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        if not prompt:
            raise ValueError("prompt is an empty message list")
        return list(prompt)
    raise TypeError(f"prompt must be a string or a list of {{'role', 'content'}} messages (got {type(prompt).__name__})")


def completion_text(completion: Any) -> str:
    """Text of a completion: a string, or TRL's conversational form ``[{"role": "assistant", "content"}]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) for m in completion):
        parts = [m.get("content") for m in completion if m.get("role", "assistant") == "assistant"]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    if isinstance(completion, dict) and isinstance(completion.get("content"), str):
        return completion["content"]
    raise TypeError(f"response must be a string or a list of assistant messages (got {type(completion).__name__})")


def _template_injects_system(tokenizer) -> bool:
    cached = getattr(tokenizer, "_cmerl_injects_system", None)
    if cached is not None:
        return cached
    marker = "cmerl-probe-7f3a"
    no_sys = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    try:
        empty_sys = tokenizer.apply_chat_template(
            [{"role": "system", "content": ""}, {"role": "user", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 - templates that reject system turns cannot inject one either
        empty_sys = no_sys
    injects = no_sys != empty_sys and len(no_sys.split(marker)[0]) > len(empty_sys.split(marker)[0])
    try:
        tokenizer._cmerl_injects_system = injects
    except AttributeError:
        pass
    return injects


def render_context(tokenizer, prompt: Prompt, config: RenderConfig = RenderConfig()) -> str:
    """The text before the response: chat-templated prompt with the assistant header, or the plain format."""
    messages = as_messages(prompt)
    if not uses_chat_template(tokenizer, config):
        if len(messages) == 1 and messages[0]["role"] == "user":
            body = messages[0]["content"]
        else:
            body = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
        if config.system_prompt not in (None, TEMPLATE_DEFAULT) and messages[0]["role"] != "system":
            body = f"{config.system_prompt}\n\n{body}"
        return config.plain_template.format(prompt=body)
    if messages[0]["role"] != "system":
        if config.system_prompt is None:
            if _template_injects_system(tokenizer):
                messages = [{"role": "system", "content": ""}] + messages
        elif config.system_prompt != TEMPLATE_DEFAULT:
            messages = [{"role": "system", "content": config.system_prompt}] + messages
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    # Chat templates write their own BOS; the plain format relies on the tokenizer's special tokens.
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def end_of_turn_id(tokenizer, config: RenderConfig = RenderConfig()) -> int | None:
    """Token that closes an assistant turn: the first token the template writes after the content, else EOS."""
    if uses_chat_template(tokenizer, config):
        probe = "cmerl-probe"
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}]
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        tail = full.split(probe, 1)[1] if probe in full else ""
        ids = _encode(tokenizer, tail, chat=True) if tail.strip() else []
        if ids:
            return ids[0]
    return tokenizer.eos_token_id


def _encode_with_offsets(tokenizer, text: str, chat: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
    """``_encode`` plus the fast tokenizer's character offsets into ``text`` (None for slow tokenizers)."""
    if not getattr(tokenizer, "is_fast", False):
        return _encode(tokenizer, text, chat), None
    enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]


def response_token_offsets(offsets: list[tuple[int, int]], response_start: int, context_len: int,
                           response_len: int) -> list[tuple[int, int]]:
    """Character spans within the response of the tokens ``response_start:`` of a ``context + response``
    encoding, from that encoding's offset mapping ``offsets`` (spans into ``context + response``).

    Each span is shifted by ``context_len`` and clamped to ``[0, response_len]``: a token that merges across
    the context/response boundary starts at 0. A zero-width token (a special token such as BOS/EOS, whose
    offset mapping is empty) gets ``(p, p)`` with ``p`` the end of the previous response token (0 for the
    first). Spans may overlap: byte-level tokens of one multi-byte character all cover that character.
    """
    out: list[tuple[int, int]] = []
    prev = 0
    for s, e in offsets[response_start:]:
        if s == e:
            out.append((prev, prev))
            continue
        a = min(max(s - context_len, 0), response_len)
        b = min(max(e - context_len, 0), response_len)
        out.append((a, b))
        prev = max(prev, b)
    return out


def disjoint_spans(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans made non-overlapping left to right: each starts no earlier than the previous one ended (a
    multi-byte character shared by several byte-level tokens goes to the first of them; the others
    become empty). Input spans must be in text order."""
    out, prev = [], 0
    for s, e in spans:
        a = max(s, prev)
        b = max(e, a)
        out.append((a, b))
        prev = b
    return out


def token_char_spans(tokenizer, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """Disjoint character spans within ``text`` of the tokens ``ids``, where ``text`` is their decoding with
    ``skip_special_tokens=True`` (what TRL hands a reward as the completion).

    Fast tokenizers: ``text`` is re-encoded with its offset mapping. Where the re-encoding equals ``ids``
    (their special tokens aside) its offsets are used; the stretches where a sampled tokenisation differs
    from the canonical one are filled by decoding them after a clean anchor token (a few decodes of a few
    tokens each). Otherwise (slow tokenizers, or a result that does not partition ``text``) growing
    prefixes are decoded: token k covers ``text[L(k-1):L(k)]``, ``L(k)`` the longest prefix of ``text`` that
    ``decode(ids[:k+1])`` reproduces (O(n^2) decoding). Special tokens (EOS, end-of-turn) get the empty span
    at the end of the previous token; byte-level tokens of one character: the character goes to one of them
    (offsets: the first, decoding: the one completing it). When ``text`` is a part of the decoding (a
    response parser stripped its ends), spans are shifted onto it and clamped.
    """
    ids = [int(i) for i in ids]
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    full = tokenizer.decode(ids, skip_special_tokens=True)
    if full != text and text and text in full:  # e.g. a response parser stripped the decoding's ends
        shift = full.index(text)
        return [(min(max(a - shift, 0), len(text)), min(max(b - shift, 0), len(text)))
                for a, b in token_char_spans(tokenizer, ids, full)]
    core = [i for i in ids if i not in special]
    spans = None
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        canon = list(enc["input_ids"])
        offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
        spans = disjoint_spans(offsets) if canon == core else _patched_spans(tokenizer, core, canon, offsets, text)
    if spans is None:
        spans = _prefix_decoded_spans(tokenizer, core, text)
    out: list[tuple[int, int]] = []
    pieces, prev = iter(spans), 0
    for i in ids:
        if i in special:
            out.append((prev, prev))
        else:
            out.append(next(pieces))
            prev = out[-1][1]
    return out


def _common_prefix_len(a: str, b: str, lo: int = 0) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (at least ``lo``, known common), by bisection."""
    if b.startswith(a):
        return len(a)
    hi = min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(a[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _prefix_decoded_spans(tokenizer, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Spans of special-free ``ids`` in ``text`` by decoding growing prefixes (see :func:`token_char_spans`)."""
    spans, prev = [], 0
    for k in range(len(ids)):
        length = max(_common_prefix_len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True), text, prev), prev)
        spans.append((prev, length))
        prev = length
    return spans


def _patched_spans(tokenizer, ids: list[int], canon: list[int], offsets: list[tuple[int, int]],
                   text: str) -> list[tuple[int, int]] | None:
    """Spans of special-free ``ids`` from the canonical encoding ``canon`` of ``text`` (with ``offsets``):
    matching runs take its offsets, the stretches in between are decoded after an anchor of up to four
    preceding tokens that decode cleanly. None when the result does not partition ``text``."""
    n = len(ids)
    spans: list[tuple[int, int] | None] = [None] * n
    for a, b, size in difflib.SequenceMatcher(None, ids, canon, autojunk=False).get_matching_blocks():
        for m in range(size):
            spans[a + m] = offsets[b + m]
    k = 0
    while k < n:
        if spans[k] is not None:
            k += 1
            continue
        i0 = k
        while k < n and spans[k] is None:
            k += 1
        left = max((sp[1] for sp in spans[:i0] if sp is not None), default=0)
        right = spans[k][0] if k < n else len(text)
        anchor = next((a for a in range(i0 - 1, max(i0 - 5, -1), -1)
                       if "\ufffd" not in tokenizer.decode(ids[a:i0], skip_special_tokens=True)), None)
        if anchor is None and i0 > 0:
            return None
        start = 0 if anchor is None else anchor
        base = tokenizer.decode(ids[start:i0], skip_special_tokens=True)
        target, prev = text[left:right], left
        for j in range(i0, k):
            decoded = tokenizer.decode(ids[start:j + 1], skip_special_tokens=True)
            if not decoded.startswith(base):
                return None
            pos = max(left + _common_prefix_len(decoded[len(base):], target), prev)
            spans[j] = (prev, pos)
            prev = pos
        if prev != right:
            return None
    result = disjoint_spans(spans)  # type: ignore[arg-type]
    return result if "".join(text[a:b] for a, b in result) == text else None


def render_pair(tokenizer, prompt: Prompt, response: str, config: RenderConfig = RenderConfig()) -> RenderedPair:
    """Render and tokenize one pair; see module docstring for the span rule. ``response_offsets`` holds
    each response token's character span within ``response``; the end-of-turn token
    added by ``include_eos`` gets the empty span ``(len(response), len(response))``."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a string (got {type(response).__name__})")
    chat = uses_chat_template(tokenizer, config)
    context = render_context(tokenizer, prompt, config)
    ctx_ids = _encode(tokenizer, context, chat)
    offsets: list[tuple[int, int]] | None = []
    if response == "":
        ids, start = ctx_ids, len(ctx_ids)
    else:
        ids, full_offsets = _encode_with_offsets(tokenizer, context + response, chat)
        start = 0
        limit = min(len(ctx_ids), len(ids))
        while start < limit and ids[start] == ctx_ids[start]:
            start += 1
        if start == len(ids):  # the response added no token (cannot happen for non-empty text, but be safe)
            ids, start = ctx_ids, len(ctx_ids)
        elif full_offsets is None:  # slow tokenizer: spans from decoding (the boundary token is approximate)
            offsets = token_char_spans(tokenizer, ids[start:], response)
        else:
            offsets = response_token_offsets(full_offsets, start, len(context), len(response))
    if config.include_eos:
        eot = end_of_turn_id(tokenizer, config)
        if eot is not None:
            ids = ids + [eot]
            if offsets is not None:
                offsets.append((len(response), len(response)))
    return RenderedPair(input_ids=ids, response_start=start, response_offsets=offsets)
