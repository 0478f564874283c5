"""Reports: training curves from a tolerant metrics.jsonl reader, win/tie/loss and length figures from a
verdicts file, outputs statistics, and the judge-check / reward-check tables."""

from __future__ import annotations

import json

import pytest

from cmerl.report import read_training_metrics, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _write_metrics(path):
    lines = [
        {"step": 1, "reward": 0.5, "rewards/cme/mean": -2.0, "completions/mean_length": 40.0, "loss": 0.1,
         "diagnostics/distinct_2": 0.9},
        {"step": 2, "reward": 0.7, "rewards/cme/mean": -1.5, "learning_rate": 1e-6},  # no length logged
        {"step": 3, "reward": "n/a", "rewards/cme/mean": -1.2, "completions/mean_length": 31.0, "note": "x"},
        {"global_step": 4, "rewards/cme/mean": None, "completions/mean_length": 29.0, "flag": True},
    ]
    text = "\n".join(json.dumps(r) for r in lines) + "\n" + '{"step": 5, "rew'  # torn last line
    path.write_text(text)


def test_read_training_metrics_is_tolerant(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl")
    rows = read_training_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # global_step used; the torn line skipped
    assert "reward" not in rows[2] and "rewards/cme/mean" not in rows[3] and "flag" not in rows[3]


def test_report_of_a_training_run(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl")
    rep = write_report(tmp_path)
    text = rep.path.read_text()
    fig = tmp_path / "figures" / "training_curves.png"
    assert fig in rep.figures and fig.read_bytes()[:8] == PNG
    assert "](figures/training_curves.png)" in text
    # first / last of each plotted key, read from the rows that have it
    assert "| reward | 0.5 | 0.7 |" in text
    assert "| rewards/cme/mean | -2 | -1.2 |" in text
    assert "| completions/mean_length | 40 | 29 |" in text
    assert "| diagnostics/distinct_2 | 0.9 | 0.9 |" in text and "| loss |" not in text
    assert "no `*verdicts*.jsonl`" in text  # says what it did not find


@pytest.mark.parametrize("output", ["out/summary.md", "out/reports"])
def test_report_output_is_a_markdown_file_or_a_folder(tmp_path, output):
    (tmp_path / "run").mkdir()
    _write_metrics(tmp_path / "run" / "metrics.jsonl")
    rep = write_report(tmp_path / "run", output=tmp_path / output)
    want = tmp_path / output if output.endswith(".md") else tmp_path / output / "report.md"
    assert rep.path == want and want.is_file()
    assert (want.parent / "figures" / "training_curves.png").read_bytes()[:8] == PNG
    assert "](figures/training_curves.png)" in want.read_text()


def _verdict_rows():
    # W=3 (one of them inconsistent), T=1, L=1, E=1
    spec = [("a", True, 100, 10), ("a", True, 200, 20), ("a", False, 300, 30), ("tie", False, 50, 50),
            ("b", True, 10, 100), ("error", None, 7, 7)]
    return [{"index": k, "instruction": f"q{k}", "verdict": v, "consistent": c, "margin": None, "len_a": la,
             "len_b": lb, "orders": {}} for k, (v, c, la, lb) in enumerate(spec)]


def test_report_of_an_evaluation(tmp_path):
    header = {"kind": "cmerl.verdicts", "version": 1,
              "judge": {"name": "judge-x", "settings": {"kind": "local", "mode": "logprobs"}},
              "decision": {"threshold": 0.2, "require_consistent": False},
              "prompt": {"sha256": "0" * 64, "text": "..."},
              "a": {"generator": "trained-run"}, "b": {"generator": "base-model"}}
    with open(tmp_path / "verdicts.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in [header, *_verdict_rows()])
    outputs = [{"instruction": "q0", "output": "a b c d a b c d", "generator": "trained-run", "index": 0,
                "finish_reason": "length", "generation": {"max_new_tokens": 5}},
               {"instruction": "q1", "output": "", "generator": "trained-run", "index": 1, "finish_reason": "stop",
                "generation": {"max_new_tokens": 5}}]
    (tmp_path / "outputs_trained.json").write_text(json.dumps(outputs))
    (tmp_path / "notes.json").write_text('{"not": "an outputs file"}')
    rep = write_report(tmp_path)
    text = rep.path.read_text()
    # n=5 judged: (3 + 0.5) / 5 = 70.0%; without ties 3/4 = 75.0%; consistency 3/5 = 60.0%;
    # mean lengths over judged pairs: A (100+200+300+50+10)/5 = 132, B (10+20+30+50+100)/5 = 42
    assert "| 5 | 3 | 1 | 1 | 1 | 70.0% |" in text
    assert "| 75.0% | 60.0% | 132 | 42 |" in text
    assert "Judge: **judge-x**" in text and "not measured for this judge setup" in text
    for name in ("verdicts_winrate.png", "verdicts_lengths.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:8] == PNG
        assert f"](figures/{name})" in text
    # outputs table: 2 rows, chars 15 and 0: mean, median and std 7.5 -> 8; mean words (8 + 0) / 2 = 4;
    # distinct-1 4 unique of 8 words = 50.0%, distinct-2 4 unique of 7 bigrams = 57.1%; self-BLEU needs two
    # non-empty outputs -> n/a; repetition of "a b c d a b c d" is 0.2 and of "" is 0 -> mean 10.0%;
    # half empty, half cut at max length
    assert ("| `outputs_trained.json` | trained-run | 2 | 8 | 8 | 8 | 4 | 50.0% | 57.1% | n/a | 10.0% | 50.0% | "
            "50.0% |") in text
    assert "![drift statistics](figures/outputs_drift.png)" in text
    assert "notes.json" not in text


def test_report_of_checks_and_bad_folder(tmp_path):
    jc = {"judge": "j", "n": 10, "ties": 2, "errors": 1,
          "agreement": {"value": 0.65, "ci_low": 0.4, "ci_high": 0.85, "n": 10},
          "consistency": {"value": 0.5, "ci_low": 0.2, "ci_high": 0.8, "n": 10},
          "length_baseline": {"value": 0.8, "ci_low": 0.5, "ci_high": 1.0, "n": 10}}
    (tmp_path / "jc").mkdir()
    (tmp_path / "jc" / "judge_check.json").write_text(json.dumps(jc))
    rc = {"verifier": "v", "n": 4, "signals": {"mean_logprob": {
        "accuracy": {"value": 0.75, "ci_low": 0.25, "ci_high": 1.0, "n": 4}, "pearson_length": -0.5,
        "spearman_length": None}}, "length_baseline": {"value": 0.5, "ci_low": 0.0, "ci_high": 1.0, "n": 4}}
    (tmp_path / "reward_check_v.json").write_text(json.dumps(rc))
    text = write_report(tmp_path).path.read_text()
    assert "| 10 | 65.0% | 40.0%-85.0% | 2 | 1 | 50.0% | 80.0% |" in text
    assert "| mean_logprob | 75.0% | 25.0%-100.0% | -0.50 | n/a |" in text
    with pytest.raises(FileNotFoundError, match="report folder not found"):
        write_report(tmp_path / "missing")


def test_one_curve_plotter_serves_report_and_run_card(tmp_path):
    """plot_curves: panels without any value are left out, nothing at all writes no file; the run card's
    reward curve (GRPO) and per-metric panels (DPO) are drawn by it."""
    from cmerl.plots import CurvePanel, plot_curves
    from cmerl.training import config_from_dict, write_run_card

    rows = [{"step": 1, "reward": 0.1, "loss": None}, {"step": 2, "reward": 0.3}]
    assert not plot_curves(rows, [CurvePanel(("loss",)), CurvePanel(("absent",))], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    assert plot_curves(rows, [CurvePanel(("reward", "loss"), title="reward")], tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG
    history = [{"step": s, "reward": 0.1 * s, "rewards/cme/mean": -1 + 0.1 * s, "loss": 1 / s,
                "rewards/margins": 0.2 * s} for s in (1, 2, 3)]
    for method in ("grpo", "dpo"):
        cfg = config_from_dict({"policy": "p", "verifiers": ["v"], "method": method,
                                "output_dir": str(tmp_path / method)})
        (tmp_path / method).mkdir()
        write_run_card(tmp_path / method, cfg, history, step=3)
        assert (tmp_path / method / "reward_curve.png").read_bytes()[:8] == PNG
        assert "](reward_curve.png)" in (tmp_path / method / "run_card.md").read_text()
    write_run_card(tmp_path, cfg, [], step=0)  # nothing logged yet: no figure, the card says so
    assert not (tmp_path / "reward_curve.png").exists()
    assert "(no logged steps yet)" in (tmp_path / "run_card.md").read_text()
