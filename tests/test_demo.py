"""The demo's head-to-head: trained vs untrained completions judged in both orders into a verdicts file.

A tiny random Qwen2 judge with the real Qwen2.5 tokenizer (``cmerl.testing``) stands in for the packaged
judge; one end-to-end ``run_demo`` uses tiny policy/verifier/judge folders (tests/_training_helpers.py).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _training_helpers import (
    POLICY_TOKENIZER,
    VERIFIER_TOKENIZER,
    save_model,
    tiny_config,
    tiny_random_folder,
    write_prompts,
)
from typer.testing import CliRunner

from cmerl.cli.app import app
from cmerl.demo import VERDICTS_NAME, head_to_head, render_head_to_head, run_demo
from cmerl.judging import LocalJudge, read_verdicts
from cmerl.models import ModelNotAvailableError, load_tokenizer
from cmerl.testing import tiny_for_tokenizer
from cmerl.training import config_from_dict, validate

INSTRUCTIONS = ["What is rain?", "Name a colour.", "Describe the sea in one sentence.", "Say hello."]
TRAINED = ["Rain is water falling from clouds.", "Blue.", "The sea is vast, salty and restless.", "Hello!"]
UNTRAINED = ["It rains when it rains when it rains.", "Blue.", "Sea sea sea.", "Hi there, how are you today?"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny_judge():
    tok = load_tokenizer(VERIFIER_TOKENIZER)
    return LocalJudge(tiny_for_tokenizer(tok, arch="qwen2", seed=3), tok, name="tiny-judge")


def _margin_by_full_forward(judge: LocalJudge, instruction: str, a: str, b: str) -> float:
    """Summed log-odds for system a over both orders, from plain full forwards (no batching, no fast head)."""
    from cmerl.judging import Job

    total = 0.0
    for sign, job in ((1, Job(instruction, a, b)), (-1, Job(instruction, b, a))):
        ids, ia, ib = judge.encode_job(job)
        with torch.no_grad():
            logp = torch.log_softmax(judge.model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        total += sign * float(logp[ia] - logp[ib])
    return total


def test_head_to_head_writes_a_verdicts_file_winrate_reads(tiny_judge, tmp_path):
    out = tmp_path / VERDICTS_NAME
    h = head_to_head(tiny_judge, INSTRUCTIONS, TRAINED, UNTRAINED, out, trained_label="after", untrained_label="before")
    assert [r["index"] for r in h.rows] == [0, 1, 2, 3]
    # Identical completions: both orders see the same context, so the margin is exactly 0: a tie.
    assert h.rows[1]["verdict"] == "tie" and h.rows[1]["margin"] == 0.0
    for i in (0, 2, 3):
        expected = _margin_by_full_forward(tiny_judge, INSTRUCTIONS[i], TRAINED[i], UNTRAINED[i])
        assert h.rows[i]["margin"] == pytest.approx(expected, abs=1e-4)
        assert h.rows[i]["verdict"] == ("tie" if abs(expected) < 0.2 else "a" if expected > 0 else "b")
    verdicts = [r["verdict"] for r in h.rows]
    w = h.winrate
    assert (w.wins, w.ties, w.losses, w.errors) == (verdicts.count("a"), verdicts.count("tie"), verdicts.count("b"), 0)
    assert w.win_rate == pytest.approx((w.wins + w.ties / 2) / 4)
    assert w.ci_low <= w.win_rate <= w.ci_high

    header, rows = read_verdicts(out)
    assert header["judge"]["name"] == "tiny-judge"
    assert (header["a"]["generator"], header["b"]["generator"]) == ("after", "before")
    assert [r["verdict"] for r in rows] == verdicts
    res = CliRunner().invoke(app, ["winrate", str(out)])
    assert res.exit_code == 0, res.output
    assert f"wins {w.wins} / ties {w.ties} / losses {w.losses}" in res.output

    text = render_head_to_head(h)
    assert "tiny-judge" in text and f"wins {w.wins} / ties {w.ties} / losses {w.losses}" in text


def test_head_to_head_is_antisymmetric_and_checks_lengths(tiny_judge, tmp_path):
    ab = head_to_head(tiny_judge, INSTRUCTIONS, TRAINED, UNTRAINED, tmp_path / "ab.jsonl")
    ba = head_to_head(tiny_judge, INSTRUCTIONS, UNTRAINED, TRAINED, tmp_path / "ba.jsonl")
    for r, s in zip(ab.rows, ba.rows):
        assert r["margin"] == pytest.approx(-s["margin"], abs=1e-5)
    assert (ab.winrate.wins, ab.winrate.losses) == (ba.winrate.losses, ba.winrate.wins)
    with pytest.raises(ValueError, match="as many trained"):
        head_to_head(tiny_judge, INSTRUCTIONS, TRAINED[:3], UNTRAINED, tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


@pytest.mark.e2e
def test_run_demo_on_tiny_models_judges_after_vs_before(tmp_path):
    policy = tiny_random_folder(tmp_path / "policy", POLICY_TOKENIZER, arch="llama", seed=0)
    verifier = tiny_random_folder(tmp_path / "verifier", VERIFIER_TOKENIZER, arch="qwen2", seed=1)
    qtok = load_tokenizer(VERIFIER_TOKENIZER)
    judge_dir = save_model(tiny_for_tokenizer(qtok, arch="qwen2", seed=3), qtok, tmp_path / "judge")
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config_from_dict(tiny_config(tmp_path, policy, verifier, prompts, max_steps=1, save_steps=1,
                                       heldout_prompts=2))
    validate(cfg)
    with pytest.raises(ModelNotAvailableError, match="did you mean"):  # a bad judge fails before training
        run_demo(cfg, judge="qwen2.5-coder-1.5b-instruc")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    result = run_demo(cfg, judge=str(judge_dir), judge_dtype="float32")
    h = result.head_to_head
    assert h is not None and h.verdicts_path == tmp_path / "run" / VERDICTS_NAME
    header, rows = read_verdicts(h.verdicts_path)
    assert header["judge"]["name"] == str(judge_dir)
    assert [r["instruction"] for r in rows] == [s.prompt for s in result.samples]
    assert [(r["len_a"], r["len_b"]) for r in rows] == [(len(s.after), len(s.before)) for s in result.samples]
    saved = json.loads(result.samples_path.read_text())
    assert saved["head_to_head"]["n"] + saved["head_to_head"]["errors"] == 2
    assert saved["head_to_head"]["verdicts"] == str(h.verdicts_path)
    assert yaml.safe_load((tmp_path / "run" / "cmerl_config.yaml").read_text())["heldout_prompts"] == 2
