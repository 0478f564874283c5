"""Held-out evaluation during training: the split-overlap refusal, and the callback on a tiny model
(step-0 outputs, judged evaluations, best/ kept by win rate with the split that chose it)."""

from __future__ import annotations

import json

import pytest
import torch
from _eval_helpers import single_thread  # noqa: F401  (fixture)
from transformers import TrainerControl, TrainerState, TrainingArguments

from cmerl.judging import LocalJudge
from cmerl.testing import tiny_for_tokenizer
from cmerl.training.config import ConfigError, TrainConfig, validate
from cmerl.training.heldout import (
    BEST_DIR,
    BEST_MARKER,
    HeldOutEval,
    HeldOutOverlapError,
    HeldOutSplit,
    heldout_rows,
    heldout_split,
)

pytestmark = pytest.mark.usefixtures("single_thread")
TRAIN = ["Write a poem about the sea.", [{"role": "user", "content": "Explain  gravity."}]]


def _alpaca_instruction() -> str:
    from cmerl.generation import load_prompt_items

    return load_prompt_items("alpaca_eval:1")[0].instruction


def test_overlap_is_refused(tmp_path):
    cfg = TrainConfig(heldout_eval_steps=2, heldout_prompts=2)
    ok = heldout_split(cfg, TRAIN, ["What is a prime?", "Name a river."])
    assert ok.instructions == ("What is a prime?", "Name a river.") and len(ok.sha256) == 64
    with pytest.raises(HeldOutOverlapError, match="training prompts, e.g. 'explain gravity.'|training prompts"):
        heldout_split(cfg, TRAIN, ["explain gravity.", "Name a river."])  # case and spacing do not hide it
    with pytest.raises(HeldOutOverlapError, match="evaluation prompts 'alpaca_eval'"):
        heldout_split(cfg, TRAIN, [_alpaca_instruction()])
    f = tmp_path / "held.jsonl"
    f.write_text(json.dumps({"instruction": "Write a poem about the sea."}) + "\n")
    with pytest.raises(HeldOutOverlapError, match="shares 1 prompt"):
        heldout_split(TrainConfig(heldout_eval_steps=2, heldout_eval_prompts=str(f)), TRAIN, [])
    with pytest.raises(ConfigError, match="needs a held-out split"):
        validate(TrainConfig(heldout_eval_steps=2))


def test_callback_keeps_best_by_heldout_win_rate(tmp_path, smollm_tokenizer):
    policy = tiny_for_tokenizer(smollm_tokenizer, arch="llama", seed=3)
    judge = LocalJudge(tiny_for_tokenizer(smollm_tokenizer, arch="llama", seed=4), smollm_tokenizer, name="tiny-j")
    cfg = TrainConfig(heldout_eval_steps=1, heldout_prompts=2, heldout_eval_max_new_tokens=4,
                      policy_dtype="float32", output_dir=str(tmp_path))
    split = HeldOutSplit("test split", ("Say hi.", "Name a colour."))
    cb = HeldOutEval(cfg, tmp_path, split, smollm_tokenizer, judge_factory=lambda: judge)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control, model=policy)
    assert (tmp_path / "heldout" / "outputs_step0.json").is_file()
    rates = []
    for step in (1, 2, 3):
        with torch.no_grad():  # a different policy at every step
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        state.global_step = step
        cb.on_step_end(args, state, control, model=policy)
        rates.append(heldout_rows(tmp_path)[-1]["win_rate"])
    rows = heldout_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["n"] == 2 for r in rows)
    best = json.loads((tmp_path / BEST_DIR / BEST_MARKER).read_text())
    assert best["win_rate"] == max(rates) and best["step"] == [1, 2, 3][rates.index(max(rates))]
    assert best["split"]["name"] == "test split" and "held-out split test split" in best["chosen_by"]
    assert (tmp_path / BEST_DIR / "config.json").is_file()
