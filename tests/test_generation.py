"""Generation: prompt-set specs, batched left-padded greedy decoding (= one prompt at a time), AlpacaEval
format, resuming after a stop or a real SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from _eval_helpers import (
    CMERL,
    save_tiny_model,
    single_thread,  # noqa: F401  (fixture, used via pytestmark)
)

from cmerl.formatting import RenderConfig, render_context
from cmerl.generation import (
    GenerationConfig,
    PromptItem,
    generate_outputs,
    load_prompt_items,
    parse_prompt_spec,
    partial_path,
    resolve_trained_model,
)
from cmerl.io import iter_jsonl

ITEMS = [PromptItem(0, "Name a prime number."), PromptItem(1, "Write one long sentence about the history of "
                                                              "the printing press in Europe."),
         PromptItem(2, "Hi"), PromptItem(3, "List three colours, then explain why the sky is blue.")]

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see _eval_helpers


@pytest.mark.parametrize("spec, parsed", [
    ("alpaca_eval", ("alpaca_eval", None, None)),
    ("alpaca_eval:50", ("alpaca_eval", None, 50)),
    ("alpaca_eval[:50]", ("alpaca_eval", None, 50)),
    ("data/p.jsonl[10:20]", ("data/p.jsonl", 10, 20)),
    ("alpaca_eval[5:]", ("alpaca_eval", 5, None)),
])
def test_parse_prompt_spec(spec, parsed):
    assert parse_prompt_spec(spec) == parsed


def test_load_prompt_items(tmp_path):
    from importlib import resources

    items = load_prompt_items("alpaca_eval:3")

    bundled = [json.loads(line) for line in
               resources.files("cmerl").joinpath("data", "alpaca_eval_805.jsonl").read_text().splitlines()[:3]]
    assert [(i.index, i.instruction, i.dataset) for i in items] == \
        [(k, r["instruction"], r["dataset"]) for k, r in enumerate(bundled)]
    assert len(load_prompt_items("alpaca_eval")) == 805
    assert [i.index for i in load_prompt_items("alpaca_eval[800:]")] == [800, 801, 802, 803, 804]
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"instruction": "b", "dataset": "d"}\n'
                 '{"prompt": [{"role": "user", "content": "c"}]}\n')
    assert [(i.instruction, i.dataset) for i in load_prompt_items(str(f))] == [("a", None), ("b", "d"), ("c", None)]
    f.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="row 2"):
        load_prompt_items(str(f))
    with pytest.raises(FileNotFoundError, match="neither a bundled set"):
        load_prompt_items("no_such_set")


def _greedy_one(model, tok, instruction: str, n: int) -> str:
    """Reference: one unpadded prompt, greedy, token by token with full forwards (no cache, no batching)."""
    chat = bool(tok.chat_template)
    ids = tok(render_context(tok, instruction, RenderConfig()), add_special_tokens=not chat)["input_ids"]
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out]), logits_to_keep=1).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


def test_batched_greedy_equals_one_prompt_at_a_time(tmp_path, smollm_tokenizer, tiny_llama):
    config = GenerationConfig(max_new_tokens=12, batch_size=4, dtype="float32")
    rows = generate_outputs(tiny_llama, smollm_tokenizer, ITEMS, tmp_path / "o.json", generator="tiny",
                            config=config)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    for item, row in zip(ITEMS, rows):
        assert row["output"] == _greedy_one(tiny_llama, smollm_tokenizer, item.instruction, 12)
        assert set(row) >= {"instruction", "output", "generator", "dataset", "generation", "finish_reason"}
        assert row["generator"] == "tiny" and row["generation"]["decoding"] == "greedy"
    saved = json.loads((tmp_path / "o.json").read_text())
    assert saved == rows and not partial_path(tmp_path / "o.json").exists()


def test_plain_format_for_base_model(tmp_path, gemma_tokenizer, tiny_gemma):
    """No chat template: each output is the greedy continuation of the plain-format prompt (with BOS)."""
    rows = generate_outputs(tiny_gemma, gemma_tokenizer, ITEMS[:2], tmp_path / "g.json", generator="g",
                            config=GenerationConfig(max_new_tokens=6, batch_size=2, dtype="float32"))
    assert len(rows) == 2 and rows[0]["generation"]["chat_template"] is False
    context = render_context(gemma_tokenizer, ITEMS[0].instruction, RenderConfig())  # what _greedy_one encodes
    assert context == f"### Instruction:\n{ITEMS[0].instruction}\n\n### Response:\n"
    assert gemma_tokenizer(context)["input_ids"][0] == gemma_tokenizer.bos_token_id
    for item, row in zip(ITEMS[:2], rows):
        assert row["output"] == _greedy_one(tiny_gemma, gemma_tokenizer, item.instruction, 6)


def test_plain_format_stops_at_the_next_turn(gemma_tokenizer):
    from cmerl.generation import PLAIN_STOP_STRINGS, _StopOnText

    ids = gemma_tokenizer("### Instruction:\nHi\n\n### Response:\n", add_special_tokens=True)["input_ids"]
    more = gemma_tokenizer("Hello there.\n### Instruction:\nmore", add_special_tokens=False)["input_ids"]
    crit = _StopOnText(gemma_tokenizer, PLAIN_STOP_STRINGS, len(ids))
    rows = torch.tensor([ids + more, ids + more[:3] + [gemma_tokenizer.pad_token_id] * (len(more) - 3)])
    assert crit(rows, None).tolist() == [True, False]


def test_sampling_is_seeded(tmp_path, smollm_tokenizer, tiny_llama):
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=5, batch_size=2, dtype="float32")
    a = generate_outputs(tiny_llama, smollm_tokenizer, ITEMS, tmp_path / "a.json", generator="t", config=cfg)
    b = generate_outputs(tiny_llama, smollm_tokenizer, ITEMS, tmp_path / "b.json", generator="t", config=cfg)
    assert len(a) == len(ITEMS) and [r["output"] for r in a] == [r["output"] for r in b]
    assert a[0]["generation"]["decoding"] == "sampling" and a[0]["generation"]["seed"] == 5
    greedy = generate_outputs(tiny_llama, smollm_tokenizer, ITEMS, tmp_path / "g.json", generator="t",
                              config=GenerationConfig(max_new_tokens=8, batch_size=2, dtype="float32"))
    other = generate_outputs(tiny_llama, smollm_tokenizer, ITEMS, tmp_path / "c.json", generator="t",
                             config=dataclasses.replace(cfg, seed=6))
    assert len(greedy) == len(other) == len(ITEMS)
    for row, g, o in zip(a, greedy, other):  # each row: sampled, and by its own seed
        assert row["output"] != g["output"] and row["output"] != o["output"]


class CountingModel:
    """The real model, counting the prompts passed to ``generate`` (to check that resuming redoes nothing)."""

    def __init__(self, model):
        self.model, self.prompts = model, 0
        self.device = model.device

    def generate(self, **kwargs):
        self.prompts += kwargs["input_ids"].shape[0]
        return self.model.generate(**kwargs)


def test_stop_and_resume(tmp_path, smollm_tokenizer, tiny_llama):
    out = tmp_path / "o.json"
    cfg = GenerationConfig(max_new_tokens=5, batch_size=1, dtype="float32")
    spy = CountingModel(tiny_llama)
    part = generate_outputs(spy, smollm_tokenizer, ITEMS, out, generator="tiny", config=cfg, stop_after=2)
    assert len(part) == 2 and spy.prompts == 2 and not out.exists()
    side_rows = list(iter_jsonl(partial_path(out)))[1:]
    assert len(side_rows) == 2
    rows = generate_outputs(spy, smollm_tokenizer, ITEMS, out, generator="tiny", config=cfg)
    assert spy.prompts == 4 and len(rows) == 4  # only the two missing prompts were generated
    by_index = {r["index"]: r for r in json.loads(out.read_text())}
    assert all(by_index[r["index"]] == r for r in side_rows)
    # A larger prompt set continues from the finished file; other settings are refused.
    more = ITEMS + [PromptItem(4, "One more prompt.")]
    generate_outputs(spy, smollm_tokenizer, more, out, generator="tiny", config=cfg)
    assert spy.prompts == 5 and len(json.loads(out.read_text())) == 5
    before = out.read_bytes()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_outputs(spy, smollm_tokenizer, more, out, generator="tiny",
                         config=GenerationConfig(max_new_tokens=9, dtype="float32"))
    assert out.read_bytes() == before


def test_resolve_trained_model(tmp_path):
    run = tmp_path / "run"
    for d in ("checkpoint-2", "checkpoint-10", "checkpoint-9"):
        (run / d).mkdir(parents=True)
        (run / d / "config.json").write_text("{}")
    assert resolve_trained_model(run).name == "checkpoint-10"
    (run / "final").mkdir()
    (run / "final" / "adapter_config.json").write_text("{}")
    assert resolve_trained_model(run).name == "final"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model"):
        resolve_trained_model(tmp_path / "empty")


@pytest.mark.e2e
def test_generate_survives_sigkill(tmp_path):
    """A real ``cmerl generate`` process killed mid-run keeps its rows; the rerun finishes the rest."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "out.json"
    cmd = [CMERL, "generate", "--model", str(model_dir), "--prompts", "alpaca_eval:10", "--output", str(out),
           "--batch-size", "1", "--max-new-tokens", "24", "--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    side = partial_path(out)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(iter_jsonl(side))) < 3:  # header + 2 rows
        assert proc.poll() is None, "generate finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    kept = list(iter_jsonl(side))[1:]
    assert 2 <= len(kept) < 10 and not out.exists()
    from typer.testing import CliRunner

    from cmerl.cli import app

    res = CliRunner().invoke(app, cmd[1:])  # the rerun in-process (the kill above was a real process)
    assert res.exit_code == 0, res.output[-2000:]
    final = json.loads(out.read_text())
    assert [r["index"] for r in final] == list(range(10)) and not side.exists()
    by_index = {r["index"]: r for r in final}
    assert all(by_index[r["index"]] == r for r in kept)  # rows written before the kill are kept as they were
