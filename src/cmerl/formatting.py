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
    """Token ids of one rendered pair; the response occupies ``input_ids[response_start:response_end]``.

    ``response_end == len(input_ids)``. ``n_response_tokens`` counts the scored tokens (the end-of-turn
    token included when ``include_eos``). An empty response has ``response_start == response_end``.
    """

    input_ids: list[int]
    response_start: int
    response_end: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.response_end == -1:
            object.__setattr__(self, "response_end", len(self.input_ids))

    @property
    def n_response_tokens(self) -> int:
        return self.response_end - self.response_start


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


def render_pair(tokenizer, prompt: Prompt, response: str, config: RenderConfig = RenderConfig()) -> RenderedPair:
    """Render and tokenize one pair; see module docstring for the span rule."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a string (got {type(response).__name__})")
    chat = uses_chat_template(tokenizer, config)
    context = render_context(tokenizer, prompt, config)
    ctx_ids = _encode(tokenizer, context, chat)
    if response == "":
        ids, start = ctx_ids, len(ctx_ids)
    else:
        ids = _encode(tokenizer, context + response, chat)
        start = 0
        limit = min(len(ctx_ids), len(ids))
        while start < limit and ids[start] == ctx_ids[start]:
            start += 1
        if start == len(ids):  # the response added no token (cannot happen for non-empty text, but be safe)
            ids, start = ctx_ids, len(ctx_ids)
    if config.include_eos:
        eot = end_of_turn_id(tokenizer, config)
        if eot is not None:
            ids = ids + [eot]
    return RenderedPair(input_ids=ids, response_start=start)
