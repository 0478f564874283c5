"""judge-check on system-vs-system pairs: selection by margin, agreement and both baselines by hand,
and the figure in later win-rate reports."""

from __future__ import annotations

import json

import pytest
from _eval_helpers import JudgeServer, quality, write_outputs
from typer.testing import CliRunner

from cmerl.calibration import load_margin_pairs, pairs_check, position_first_shown, resolve_pairs_file
from cmerl.cli import app
from cmerl.judging import OpenAIJudge

ROWS = [  # (output_a, output_b, margin): the rules judge prefers more GOODs
    ("GOOD GOOD", "meh", 0.6),        # judge a, label a
    ("meh", "GOOD answer", -0.5),     # judge b, label b
    ("GOOD", "GOOD GOOD GOOD", 0.4),  # judge b, label a (disagrees)
    ("GOOD", "GOOD", 0.35),           # judge tie, label a -> half
    ("x", "y", 0.1),                  # below the margin: not used
    ("GOOD", "meh", None),            # no margin: skipped
]


def _pairs_file(path):
    with open(path, "w") as f:
        f.writelines(json.dumps({"instruction": f"instruction {k}", "dataset": "t", "output_a": a, "output_b": b,
                                "generator_a": "sys-a", "generator_b": "sys-b", "gpt4t_pref_a_vs_ref": None,
                                "gpt4t_pref_b_vs_ref": None, "gpt4t_margin_a_minus_b": m}) + "\n" for k, (a, b, m) in enumerate(ROWS))
    return path


def test_selection_and_bundled_files(tmp_path):
    sel, info = load_margin_pairs(_pairs_file(tmp_path / "p.jsonl"), min_margin=0.3)
    assert [s.pair.index for s in sel] == [0, 1, 2, 3] and [s.reference for s in sel] == ["a", "b", "a", "a"]
    assert info["rows_with_margin"] == 5 and info["rows_selected"] == 4
    assert len(load_margin_pairs(tmp_path / "p.jsonl", min_margin=0.3, n=2)[0]) == 2
    # characters per pair (instruction + both outputs): 25, 27, 31, 21
    assert [s.pair.index for s in load_margin_pairs(tmp_path / "p.jsonl", min_margin=0.3, max_pair_chars=30)[0]] \
        == [0, 1, 3]
    with pytest.raises(ValueError, match="no pair has"):
        load_margin_pairs(tmp_path / "p.jsonl", min_margin=0.9)
    phi, info = load_margin_pairs("phi2", min_margin=0.3)
    assert len(phi) == 39 and sum(s.reference == "a" for s in phi) == 26  # data/README.md's counts
    assert resolve_pairs_file("fusechat")[1] == "FuseChat-Llama-3.2-1B-Instruct__vs__gemma-2b-it"
    with pytest.raises(FileNotFoundError, match="bundled: phi2"):
        resolve_pairs_file("nope")
    assert position_first_shown("q") == position_first_shown("q")
    assert {position_first_shown(f"q{k}") for k in range(20)} == {"a", "b"}


def test_pairs_check_by_hand_and_in_reports(tmp_path, tmp_cache):
    server = JudgeServer()
    try:
        judge = OpenAIJudge(server.base_url, "rules")
        res = pairs_check(judge, _pairs_file(tmp_path / "p.jsonl"), output=tmp_path / "v.jsonl", min_margin=0.3)
        assert res.n == 4 and res.errors == 0 and res.ties == 1 and res.reference_a == 3
        assert res.agreement.value == pytest.approx((1 + 1 + 0 + 0.5) / 4)
        longer = [("a", "a"), ("b", "b"), ("b", "a"), ("tie", "a")]  # (longer answer, label)
        assert res.length_baseline.value == pytest.approx(
            sum(1.0 if x == y else 0.5 if "tie" in (x, y) else 0.0 for x, y in longer) / 4)
        labels = ["a", "b", "a", "a"]
        first = [position_first_shown(f"instruction {k}") for k in range(4)]
        assert res.position_baseline.value == pytest.approx(sum(f == lab for f, lab in zip(first, labels)) / 4)
        registry = json.loads((tmp_cache / "judge_checks.json").read_text())
        assert registry[res.key]["pairs"]["p"]["agreement"] == res.agreement.value
        # a later win rate by the same judge setup prints this figure
        a = write_outputs(tmp_path / "a.json", [("q1", "GOOD"), ("q2", "meh")], "x")
        b = write_outputs(tmp_path / "b.json", [("q1", "meh"), ("q2", "meh")], "y")
        out = CliRunner().invoke(app, ["judge", "--a", str(a), "--b", str(b), "--judge", "rules", "--judge-url",
                                       server.base_url, "--output", str(tmp_path / "w.jsonl")])
        assert out.exit_code == 0, out.output
        assert "agreement on system-vs-system pairs: p 62.5%" in out.output
        assert "length-controlled win rate: n/a" in out.output  # 2 pairs: too few to fit
        assert quality("GOOD GOOD") == 2
    finally:
        server.stop()
