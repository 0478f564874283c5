"""Rendering (prompt, response) pairs on the three real tokenizer families; the lm-eval span rule."""

from __future__ import annotations

import pytest

from cmerl.formatting import (
    TEMPLATE_DEFAULT,
    RenderConfig,
    as_messages,
    completion_text,
    end_of_turn_id,
    render_context,
    render_pair,
)

RESPONSES = [
    "Paris is the capital of France.",
    " Leading space, then text.",
    "Multi\nline\n\n- item one\n- item two",
    "Unicode: Été, 東京, emoji 🙂, tab\there.",
    "def f(x):\n    return x + 1\n",
    "a",
]
# Responses whose first characters merge with the end of the context ("...assistant\n" or "### Response:\n").
MERGING = ["\nStarts with a newline.", "\n\nTwo newlines.", "\n", "  two spaces"]


def _chat(tok) -> bool:
    return bool(tok.chat_template)


def _ctx_ids(tok, prompt, config: RenderConfig | None = None):
    return tok(render_context(tok, prompt, config or RenderConfig()), add_special_tokens=not _chat(tok))["input_ids"]


def _special_ids(tok) -> set[int]:
    return set(tok.all_special_ids)


@pytest.mark.parametrize("response", RESPONSES)
def test_span_decodes_to_exactly_the_response(family_tokenizer, response):
    tok = family_tokenizer
    pair = render_pair(tok, "What is the capital of France?", response)
    span = pair.input_ids[pair.response_start:]
    assert tok.decode(span) == response
    assert pair.input_ids[:pair.response_start] == _ctx_ids(tok, "What is the capital of France?")
    assert not set(span) & _special_ids(tok), "a template token was counted as a response token"
    assert pair.response_start + pair.n_response_tokens == len(pair.input_ids) and pair.n_response_tokens == len(span) > 0


@pytest.mark.parametrize("response", MERGING)
def test_boundary_merges_count_as_response_tokens_once(family_tokenizer, response):
    """The lm-eval rule: context tokens up to the first difference, everything after is the response."""
    tok = family_tokenizer
    prompt = "Say something."
    pair = render_pair(tok, prompt, response)
    ctx_ids = _ctx_ids(tok, prompt)
    context = render_context(tok, prompt)
    full_ids = tok(context + response, add_special_tokens=not _chat(tok))["input_ids"]
    assert pair.input_ids == full_ids  # the scored sequence is the plain encoding of context + response
    start = pair.response_start
    assert 1 <= start <= len(ctx_ids) and pair.input_ids[:start] == ctx_ids[:start]
    assert start == len(ctx_ids) or pair.input_ids[start] != ctx_ids[start]
    span_text = tok.decode(pair.input_ids[start:])
    assert span_text.endswith(response) and context.endswith(span_text[: len(span_text) - len(response)])
    assert not set(pair.input_ids[start:]) & _special_ids(tok)


def test_a_merge_really_happens_somewhere(qwen_tokenizer):
    """Guard against MERGING losing its purpose: at least one family merges "\\n" across the boundary."""
    tok = qwen_tokenizer
    pair = render_pair(tok, "Say something.", "\nStarts with a newline.")
    assert pair.response_start < len(_ctx_ids(tok, "Say something."))


def test_include_eos_appends_the_end_of_turn_token(family_tokenizer):
    tok = family_tokenizer
    response = "A short answer."
    plain = render_pair(tok, "Q?", response)
    with_eos = render_pair(tok, "Q?", response, RenderConfig(include_eos=True))
    eot = end_of_turn_id(tok)
    assert with_eos.input_ids == plain.input_ids + [eot]
    assert with_eos.n_response_tokens == plain.n_response_tokens + 1
    expected_eot = "<|im_end|>" if _chat(tok) else tok.eos_token
    assert tok.convert_ids_to_tokens(eot) == expected_eot
    assert eot not in plain.input_ids[plain.response_start:]


def test_end_of_turn_is_what_the_template_writes_after_an_assistant_turn(smollm_tokenizer, qwen_tokenizer):
    for tok in (smollm_tokenizer, qwen_tokenizer):
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ANSWER"}]
        rendered = tok.apply_chat_template(msgs, tokenize=False)
        after = rendered.split("ANSWER", 1)[1]
        assert after.startswith(tok.convert_ids_to_tokens(end_of_turn_id(tok)))


DEFAULT_SYSTEM = {"smollm": "You are a helpful AI assistant named SmolLM", "qwen": "You are Qwen"}


@pytest.mark.parametrize("family", ["smollm", "qwen"])
def test_template_default_system_prompt_only_when_asked(family, request):
    tok = request.getfixturevalue(f"{family}_tokenizer")
    marker = DEFAULT_SYSTEM[family]
    # The template really does inject it when given a bare user turn (why the option exists).
    assert marker in tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert marker not in render_context(tok, "Hi")
    assert marker in render_context(tok, "Hi", RenderConfig(system_prompt=TEMPLATE_DEFAULT))
    custom = render_context(tok, "Hi", RenderConfig(system_prompt="Answer in French."))
    assert "Answer in French." in custom and marker not in custom
    assert custom.index("Answer in French.") < custom.index("Hi")


def test_system_prompt_in_the_plain_format(gemma_tokenizer):
    assert render_context(gemma_tokenizer, "Hi") == "### Instruction:\nHi\n\n### Response:\n"
    with_sys = render_context(gemma_tokenizer, "Hi", RenderConfig(system_prompt="Be brief."))
    assert with_sys == "### Instruction:\nBe brief.\n\nHi\n\n### Response:\n"
    assert render_context(gemma_tokenizer, "Hi", RenderConfig(system_prompt=TEMPLATE_DEFAULT)) == \
        render_context(gemma_tokenizer, "Hi")


def test_plain_format_for_gemma_starts_with_bos(gemma_tokenizer):
    assert not gemma_tokenizer.chat_template
    pair = render_pair(gemma_tokenizer, "Name a fruit.", "An apple.")
    assert pair.input_ids[0] == gemma_tokenizer.bos_token_id
    assert pair.input_ids.count(gemma_tokenizer.bos_token_id) == 1
    assert gemma_tokenizer.decode(pair.input_ids[1:pair.response_start]) == \
        "### Instruction:\nName a fruit.\n\n### Response:\n"


def test_custom_plain_template(gemma_tokenizer):
    config = RenderConfig(plain_template="Q: {prompt}\nA:")
    pair = render_pair(gemma_tokenizer, "2+2?", " 4", config)
    assert gemma_tokenizer.decode(pair.input_ids[pair.response_start:]) == " 4"
    assert gemma_tokenizer.decode(pair.input_ids[:pair.response_start], skip_special_tokens=True) == "Q: 2+2?\nA:"
    with pytest.raises(ValueError, match="must contain '\\{prompt\\}'"):
        RenderConfig(plain_template="no placeholder")


def test_chat_models_can_be_forced_to_the_plain_format(smollm_tokenizer, gemma_tokenizer):
    ctx = render_context(smollm_tokenizer, "Hi", RenderConfig(use_chat_template=False))
    assert ctx == "### Instruction:\nHi\n\n### Response:\n"
    with pytest.raises(ValueError, match="has no chat template"):
        render_context(gemma_tokenizer, "Hi", RenderConfig(use_chat_template=True))


def test_message_list_prompts_are_rendered_as_given(family_tokenizer):
    tok = family_tokenizer
    messages = [
        {"role": "system", "content": "You answer tersely."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain?"},
    ]
    ctx = render_context(tok, messages)
    positions = [ctx.index(m["content"]) for m in messages]
    assert positions == sorted(positions)
    pair = render_pair(tok, messages, "Madrid.")
    assert tok.decode(pair.input_ids[pair.response_start:]) == "Madrid."
    if _chat(tok):
        # A single-user-turn message list renders exactly like the string prompt.
        assert render_context(tok, [{"role": "user", "content": "Hi"}]) == render_context(tok, "Hi")
        assert ctx.endswith(render_context(tok, "x").rsplit("x", 1)[1])  # same assistant header


def test_empty_response_has_an_empty_span(family_tokenizer):
    pair = render_pair(family_tokenizer, "Q?", "")
    assert pair.n_response_tokens == 0 and pair.response_start == len(pair.input_ids)
    assert pair.input_ids == _ctx_ids(family_tokenizer, "Q?")


def test_bad_inputs_name_the_problem(smollm_tokenizer):
    with pytest.raises(TypeError, match="response must be a string .*int"):
        render_pair(smollm_tokenizer, "Q", 3)
    with pytest.raises(TypeError, match="prompt must be a string or a list"):
        render_pair(smollm_tokenizer, 42, "A")
    with pytest.raises(TypeError, match="prompt must be a string or a list"):
        as_messages([{"content": "no role"}])
    with pytest.raises(ValueError, match="empty message list"):
        as_messages([])


def test_completion_text_accepts_trl_formats():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "conv"}]) == "conv"
    assert completion_text({"role": "assistant", "content": "dict"}) == "dict"
    with pytest.raises(TypeError, match="got NoneType"):
        completion_text(None)
    with pytest.raises(TypeError, match=r"list of assistant messages \(got list\)"):
        completion_text([{"role": "assistant", "content": 5}])
