"""Property-based tests (hypothesis) of the pure parts: response spans, win rates and the bootstrap,
JSONL append/resume after any torn tail, config parsing, fingerprints.

Example counts come from the hypothesis profile (``conftest.py``: ``ci`` by default, ``thorough`` with
``HYPOTHESIS_PROFILE=thorough``), so the suite stays fast and a long local run is one variable away.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

# Unicode text as users paste it: any code point that UTF-8 can carry (no lone surrogates).
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
WORDS = st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "Zs"), exclude_characters="\x00"),
                max_size=40)


# --------------------------------------------------------------------------------------------- rendering
@given(prompt=TEXT.filter(str.strip), response=TEXT, system=st.none() | WORDS, include_eos=st.booleans())
def test_response_span_is_exactly_what_the_response_adds(family_tokenizer, prompt, response, system, include_eos):
    """For any text and any of the three tokenizer families: the tokens before the span are the context's
    own tokens, a response has at least one token unless the tokenizer drops all of it (an empty one none), ``include_eos`` adds
    exactly the end-of-turn token, and the span decodes to the response's end (when the tokenizer can
    round-trip the response at all)."""
    from cmerl.formatting import (
        RenderConfig,
        _encode,
        end_of_turn_id,
        render_context,
        render_pair,
        uses_chat_template,
    )

    tok = family_tokenizer  # conftest.py: SmolLM2 (llama), Qwen2.5 and Gemma 3 (no chat template)
    cfg = RenderConfig(system_prompt=system, include_eos=include_eos)
    pair = render_pair(tok, prompt, response, cfg)
    chat = uses_chat_template(tok, cfg)
    context = render_context(tok, prompt, cfg)
    ctx_ids = _encode(tok, context, chat)
    ids = pair.input_ids[:-1] if include_eos else pair.input_ids
    assert 1 <= pair.response_start <= len(ctx_ids)
    assert ids[:pair.response_start] == ctx_ids[:pair.response_start]
    assert pair.response_start + pair.n_response_tokens == len(pair.input_ids)
    if include_eos:
        assert pair.input_ids[-1] == end_of_turn_id(tok, cfg)
    if response == "":
        assert ids == ctx_ids and pair.response_start == len(ctx_ids)
        return
    if not tok(response, add_special_tokens=False)["input_ids"]:
        return  # text the tokenizer drops entirely (SmolLM2 drops control characters): scored as empty
    assert len(ids) > pair.response_start  # the response added at least one token
    if tok.decode(tok(response, add_special_tokens=False)["input_ids"]) == response:
        assert (context + response).endswith(tok.decode(ids[pair.response_start:]))
    assert render_pair(tok, prompt, response, cfg) == pair  # deterministic


# --------------------------------------------------------------------------------------------- win rates
VERDICT = st.sampled_from(["a", "b", "tie", "error"])


@given(verdicts=st.lists(VERDICT, max_size=60), seed=st.integers(0, 2**32 - 1))
def test_win_rate_arithmetic(verdicts, seed):
    from cmerl.metrics import win_rate

    w = win_rate(verdicts, n_boot=200, seed=seed)
    assert w.wins + w.ties + w.losses == w.n == len(verdicts) - verdicts.count("error")
    assert w.errors == verdicts.count("error")
    if w.n == 0:
        assert w.win_rate is None and (w.ci_low, w.ci_high) == (None, None)
        return
    assert w.win_rate == pytest.approx((w.wins + w.ties / 2) / w.n)
    assert 0 <= w.ci_low <= w.ci_high <= 1
    scores = [{"a": 1.0, "tie": 0.5, "b": 0.0}[v] for v in verdicts if v != "error"]
    assert min(scores) <= w.ci_low and w.ci_high <= max(scores)
    swapped = win_rate([{"a": "b", "b": "a"}.get(v, v) for v in verdicts], n_boot=200, seed=seed)
    assert swapped.win_rate == pytest.approx(1 - w.win_rate)  # A vs B is the mirror of B vs A
    assert (w.win_rate_no_ties is None) == (w.wins + w.losses == 0)
    assert win_rate(verdicts, n_boot=200, seed=seed) == w  # seeded: the same interval every time


@given(values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), n_boot=st.integers(1, 300),
       seed=st.integers(0, 2**32 - 1), level=st.floats(0.01, 0.99))
def test_bootstrap_interval_bounds(values, n_boot, seed, level):
    from cmerl.metrics import bootstrap_ci

    lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed, level=level)
    slack = 1e-9 * max(1.0, max(abs(v) for v in values))
    assert min(values) - slack <= lo <= hi + slack and hi <= max(values) + slack
    if len(set(values)) == 1:
        assert lo == pytest.approx(values[0]) and hi == pytest.approx(values[0])


@given(n_boot=st.integers(max_value=0) | st.booleans())
def test_bootstrap_refuses_no_resamples(n_boot):
    from cmerl.metrics import bootstrap_ci

    with pytest.raises(ValueError, match="n_boot must be an integer >= 1"):
        bootstrap_ci([0.0, 1.0], n_boot=n_boot)


# --------------------------------------------------------------------------------------------- JSONL
ROWS = st.lists(st.dictionaries(st.sampled_from(["prompt", "response", "n", "x"]),
                                TEXT | st.integers() | st.floats(allow_nan=False, allow_infinity=False),
                                min_size=1), min_size=1, max_size=12)


@given(rows=ROWS, more=ROWS, cut=st.floats(0, 1), junk=st.binary(max_size=20).filter(lambda b: b"\n" not in b))
def test_append_after_any_torn_tail_loses_and_repeats_nothing(tmp_path_factory, rows, more, cut, junk):
    """A writer killed at any byte of its last write, or leaving any bytes without a newline, then a
    resume that appends: the file reads back as the rows whose lines were complete, then the new rows."""
    from cmerl.io import append_jsonl, iter_jsonl, read_records

    path = tmp_path_factory.mktemp("jsonl") / "rows.jsonl"
    append_jsonl(path, rows)
    data = path.read_bytes()
    keep = int(cut * len(data))
    path.write_bytes(data[:keep] + (junk if keep == len(data) else b""))
    survived = data[:keep].count(b"\n")
    append_jsonl(path, more)
    assert list(iter_jsonl(path)) == rows[:survived] + more
    assert [r for _, r in read_records(path)[0]] == rows[:survived] + more
    assert path.read_bytes().endswith(b"\n")


@given(rows=ROWS)
def test_records_round_trip_in_both_formats(tmp_path_factory, rows):
    from cmerl.io import read_records, write_records

    folder = tmp_path_factory.mktemp("records")
    for name in ("r.jsonl", "r.json"):
        write_records(folder / name, rows)
        got, bad = read_records(folder / name)
        assert [r for _, r in got] == rows and bad == []


# --------------------------------------------------------------------------------------------- config
INT_KEYS = st.sampled_from(["num_generations", "max_steps", "max_completion_length", "save_steps", "seed"])
FLOAT_KEYS = st.sampled_from(["learning_rate", "temperature", "beta", "top_p"])
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                       max_leaves=6)


@given(key=INT_KEYS, value=st.integers(-10**12, 10**12))
def test_int_overrides_parse_exactly(key, value):
    from cmerl.training import TrainConfig, apply_overrides

    assert getattr(apply_overrides(TrainConfig(), [f"{key}={value}"]), key) == value


@given(key=FLOAT_KEYS, value=st.floats(allow_nan=False, allow_infinity=False))
def test_float_overrides_parse_exactly(key, value):
    from cmerl.training import TrainConfig, apply_overrides

    assert getattr(apply_overrides(TrainConfig(), [f"{key}={value!r}"]), key) == value


@given(data=st.dictionaries(st.sampled_from(["num_generations", "learning_rate", "rewards", "lora", "policy",
                                             "verifiers", "trl", "temperature", "no_such_key", "max_prompts"]),
                            JSONISH, max_size=4))
def test_any_config_mapping_parses_or_is_a_config_error(data):
    """Whatever a YAML file holds, parsing gives a config or a ConfigError naming the key, never another
    exception; a parsed config survives a YAML round trip unchanged."""
    import yaml

    from cmerl.training import ConfigError, config_from_dict, config_to_yaml

    try:
        cfg = config_from_dict(data, source="t.yaml")
    except ConfigError as exc:
        assert "t.yaml" in str(exc)
        return
    try:
        text = config_to_yaml(cfg)
    except (ValueError, yaml.YAMLError):
        assume(False)  # values YAML itself cannot hold
    assert config_from_dict(yaml.safe_load(text)) == cfg


# --------------------------------------------------------------------------------------------- fingerprints
SETTINGS = st.dictionaries(st.text(min_size=1, max_size=8), st.none() | st.booleans() | st.integers() | WORDS,
                           max_size=5)


@given(a=SETTINGS, b=SETTINGS)
def test_fingerprint_differences_are_empty_exactly_when_equal(a, b):
    from cmerl.fingerprint import Fingerprint

    fa, fb = Fingerprint("job", {"x": "sha256:1"}, a), Fingerprint("job", {"x": "sha256:1"}, b)
    assert (fa.differences(Fingerprint.from_dict(fb.to_dict())) == []) == (a == b)
    assert len(fa.differences(fb)) == len({k for k in set(a) | set(b) if a.get(k, ...) != b.get(k, ...)})
