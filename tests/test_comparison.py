"""cmerl eval with several systems: outputs files and a model (generated), every pair judged, one matrix."""

from __future__ import annotations

import json

import pytest
from _eval_helpers import (
    JudgeServer,
    save_tiny_model,
    single_thread,  # noqa: F401  (fixture)
    write_outputs,
)
from typer.testing import CliRunner

from cmerl.cli import app
from cmerl.comparison import parse_system, requested_pairs

pytestmark = pytest.mark.usefixtures("single_thread")


def test_matrix_of_three_outputs_files_and_a_model(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    instr = ["Say hi.", "Name a colour.", "Count to two."]
    prompts.write_text("".join(json.dumps({"instruction": i}) + "\n" for i in instr))
    # quality (count of GOOD, the test judge's rule): best 2, mid 1, low 0; the tiny model writes no GOOD
    best = write_outputs(tmp_path / "best.json", [(i, "GOOD GOOD") for i in instr] + [("extra", "x")], "best")
    mid = write_outputs(tmp_path / "mid.json", [(i, "GOOD") for i in reversed(instr)], "mid")
    low = write_outputs(tmp_path / "low.json", [(i, "meh") for i in instr], "low")
    model = save_tiny_model(tmp_path / "tiny")
    server = JudgeServer()
    try:
        out = tmp_path / "m"
        args = ["eval", "--system", str(best), "--system", str(mid), "--system", f"low={low}",
                "--system", f"tiny={model}", "--judge", f"openai:rules@{server.base_url}", "--prompts", str(prompts),
                "--output-dir", str(out), "--max-new-tokens", "3", "--dtype", "float32"]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        m = json.loads((out / "matrix.json").read_text())
        assert m["labels"] == ["best", "mid", "low", "tiny"]
        w = m["win_rate"]
        assert w[0][1] == 1.0 and w[1][0] == 0.0 and w[0][2] == 1.0 and w[1][2] == 1.0
        tiny_out = json.loads((out / "outputs_tiny.json").read_text())
        assert len(tiny_out) == 3 and not any("GOOD" in r["output"] for r in tiny_out)  # generated, no GOOD
        assert w[2][3] == 0.5 and w[3][0] == 0.0  # low vs tiny: equal quality, all ties
        assert all(w[i][i] is None for i in range(4))
        assert len(m["pairs"]) == 6
        for p in m["pairs"]:
            folder = out / "pairs" / f"{p['a']}__vs__{p['b']}"
            assert (folder / "verdicts.jsonl").is_file() and (folder / "report.md").is_file()
        table = (out / "matrix.md").read_text()
        assert "| **best** | — | 100.0% | 100.0% | 100.0% |" in table
        assert "## Comparison matrix" in (out / "report.md").read_text()
        assert "outputs_drift.png" in (out / "report.md").read_text()
        calls = server.stats()["/v1/chat/completions"]
        assert CliRunner().invoke(app, args).exit_code == 0  # rerun: nothing judged again
        assert server.stats()["/v1/chat/completions"] == calls
    finally:
        server.stop()


def test_systems_and_pairs(tmp_path):
    assert parse_system("gpt4_1106_preview").kind == "outputs"
    assert parse_system("base=smollm2-135m-instruct") == parse_system("base=smollm2-135m-instruct")
    assert parse_system("smollm2-135m-instruct").kind == "model"
    assert requested_pairs(["a", "b", "c"]) == [(0, 1), (0, 2), (1, 2)]
    assert requested_pairs(["a", "b", "c"], against="b") == [(0, 1), (2, 1)]
    with pytest.raises(ValueError, match="same label"):
        requested_pairs(["a", "a"])
    with pytest.raises(ValueError, match="not one of"):
        requested_pairs(["a", "b"], against="z")
    f = write_outputs(tmp_path / "x.json", [("q", "a")], "x")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"instruction": "other"}) + "\n")
    res = CliRunner().invoke(app, ["eval", "--system", str(f), "--system", f"y={f}", "--judge", "j",
                                   "--prompts", str(prompts), "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 1 and "has no output for 1 of the 1 prompts" in res.output
