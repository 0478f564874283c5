"""``cmerl score`` end to end on real files with a tiny verifier folder; malformed rows by line number."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmerl.cli import app
from cmerl.scoring import Verifier
from cmerl.testing import tiny_for_tokenizer


@pytest.fixture(scope="module")
def verifier_folder(tmp_path_factory, smollm_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-verifier")
    tiny_for_tokenizer(smollm_tokenizer, arch="llama", seed=21).save_pretrained(folder)
    smollm_tokenizer.save_pretrained(folder)
    return folder


GOOD = [
    {"prompt": "What is 2+2?", "response": "4", "id": "a"},
    {"instruction": "Name a colour.", "output": "Blue.", "generator": "me"},  # AlpacaEval fields
    {"prompt": [{"role": "user", "content": "Say hi."}], "response": "Hi!"},
    {"prompt": "Empty answer", "response": ""},
]
# (line written, reason fragment); line numbers are 1-based lines of the JSONL file.
BAD = [
    ('{"prompt": "unterminated', "invalid JSON"),
    ('{"prompt": "no response"}', "missing field 'response'"),
    ('{"prompt": "x", "response": 7}', "'response' must be a string"),
    ('{"prompt": [1, 2], "response": "x"}', "'prompt'"),
    ('["not", "an", "object"]', "not a JSON object"),
]


def write_input(path: Path) -> tuple[list[int], dict[int, str]]:
    """Interleave good and bad rows (and a blank line); return good line numbers and bad line → reason."""
    lines, good_lines, bad_lines = [], [], {}
    for i in range(max(len(GOOD), len(BAD))):
        if i < len(GOOD):
            lines.append(json.dumps(GOOD[i]))
            good_lines.append(len(lines))
        if i == 1:
            lines.append("")
        if i < len(BAD):
            lines.append(BAD[i][0])
            bad_lines[len(lines)] = BAD[i][1]
    path.write_text("\n".join(lines) + "\n")
    return good_lines, bad_lines


def test_score_jsonl_reports_bad_rows_and_scores_the_rest(tmp_path, verifier_folder):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _, bad_lines = write_input(inp)
    result = CliRunner().invoke(app, ["score", "--verifier", str(verifier_folder), "--input", str(inp),
                                      "--output", str(out), "--dtype", "float32", "--entropy", "--tokens"])
    assert result.exit_code == 0, result.output
    stderr = result.stderr
    reported = {int(n): None for n in re.findall(r"skipped line (\d+):", stderr)}
    assert set(reported) == set(bad_lines)
    for line, reason in bad_lines.items():
        block = stderr.split(f"skipped line {line}:", 1)[1].split("skipped line", 1)[0]
        assert reason in " ".join(block.split()), (line, block)
    assert f"scored {len(GOOD)} rows ({len(BAD)} skipped)" in " ".join(stderr.split())

    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == len(GOOD)
    expected = Verifier.from_pretrained(str(verifier_folder), dtype="float32").score(
        [r.get("prompt", r.get("instruction")) for r in GOOD], [r.get("response", r.get("output")) for r in GOOD],
        entropy=True)
    for row, src, exp in zip(rows, GOOD, expected):
        assert {k: row[k] for k in src} == src  # the input fields come back unchanged
        assert row["cme"] == pytest.approx(exp.mean_logprob, abs=1e-6)
        assert row["sum_logprob"] == pytest.approx(exp.sum_logprob, abs=1e-5)
        assert row["n_tokens"] == exp.n_tokens and row["truncated"] is False
        assert row["mean_entropy"] == pytest.approx(exp.mean_entropy, abs=1e-5)
        assert row["token_logprobs"] == pytest.approx(exp.token_logprobs, abs=1e-6)
        assert row["verifier"] == str(verifier_folder)
    assert rows[3]["n_tokens"] == 0 and rows[3]["cme"] == -20.0  # the empty response: defined, not NaN


def test_score_json_list_input_and_output(tmp_path, verifier_folder):
    inp, out = tmp_path / "in.json", tmp_path / "out.json"
    inp.write_text(json.dumps([GOOD[0], {"instruction": "no output"}, GOOD[1]]))
    result = CliRunner().invoke(app, ["score", "-v", str(verifier_folder), "-i", str(inp), "-o", str(out),
                                      "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "skipped line 2:" in result.stderr  # list index + 1
    rows = json.loads(out.read_text())
    assert [r.get("id") for r in rows] == ["a", None] and all("cme" in r for r in rows)


def test_score_clear_errors(tmp_path, verifier_folder):
    runner = CliRunner()
    missing = runner.invoke(app, ["score", "-v", str(verifier_folder), "-i", str(tmp_path / "nope.jsonl"),
                                  "-o", str(tmp_path / "o.jsonl")])
    assert missing.exit_code == 2 and "input file not found" in missing.stderr and "nope.jsonl" in missing.stderr
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(GOOD[0]) + "\n")
    unknown = runner.invoke(app, ["score", "-v", "smollm2-135m", "-i", str(inp), "-o", str(tmp_path / "o.jsonl")])
    assert unknown.exit_code == 2
    assert "did you mean the packaged model 'smollm2-135m-instruct'" in " ".join(unknown.stderr.split())
    all_bad = tmp_path / "bad.jsonl"
    all_bad.write_text('{"prompt": 1, "response": "x"}\n')
    nothing = runner.invoke(app, ["score", "-v", str(verifier_folder), "-i", str(all_bad),
                                  "-o", str(tmp_path / "o.jsonl")])
    assert nothing.exit_code == 1 and "no usable rows" in nothing.stderr
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.e2e
def test_console_script_runs_end_to_end(tmp_path, verifier_folder):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps(GOOD[0]) + "\nnot json\n")
    cmerl = Path(sys.executable).parent / "cmerl"
    proc = subprocess.run([str(cmerl), "score", "--verifier", str(verifier_folder), "--input", str(inp),
                           "--output", str(out), "--dtype", "float32"], capture_output=True, text=True, timeout=300,
                          check=False,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stderr
    assert "skipped line 2:" in proc.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["n_tokens"] == 1


# ---------------------------------------------------------------------------------------------- cmerl.io
def test_read_records_reports_line_numbers(tmp_path):
    from cmerl.io import read_records

    p = tmp_path / "rows.jsonl"
    p.write_text('{"a": 1}\n\n{broken\n{"a": 2}\n')
    rows, bad = read_records(p)
    assert rows == [(1, {"a": 1}), (4, {"a": 2})]
    assert [(b.line, b.reason.split(":")[0]) for b in bad] == [(3, "invalid JSON")]
    not_a_list = tmp_path / "obj.json"
    not_a_list.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="must hold a list of objects"):
        read_records(not_a_list)
    with pytest.raises(FileNotFoundError, match="input file not found"):
        read_records(tmp_path / "missing.jsonl")


def test_jsonl_append_and_torn_last_line(tmp_path):
    from cmerl.io import append_jsonl, iter_jsonl, write_records

    p = tmp_path / "log.jsonl"
    append_jsonl(p, [{"i": 0}, {"i": 1}])
    with p.open("a") as f:
        f.write('{"i": 2, "torn')  # an interrupted writer
    assert [r["i"] for r in iter_jsonl(p)] == [0, 1]
    append_jsonl(p, [{"i": 2}, {"i": 3}])  # a resumed writer: the torn fragment must not swallow row 2
    assert [r["i"] for r in iter_jsonl(p)] == [0, 1, 2, 3]
    assert p.read_text().count("torn") == 0
    assert list(iter_jsonl(tmp_path / "absent.jsonl")) == []
    out = tmp_path / "out.json"
    write_records(out, [{"x": "é"}])
    assert json.loads(out.read_text(encoding="utf-8")) == [{"x": "é"}]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["log.jsonl", "out.json"]  # no temp files left


@pytest.mark.parametrize("content, kept", [(b"", b""), (b"a\n", b"a\n"), (b"a\nb", b"a\n"), (b"abc", b""),
                                           (b"x" * 70000 + b"\n" + b"y" * 70000, b"x" * 70000 + b"\n")])
def test_drop_torn_tail(tmp_path, content, kept):
    from cmerl.io import drop_torn_tail

    p = tmp_path / "f.jsonl"
    p.write_bytes(content)
    assert drop_torn_tail(p) == len(content) - len(kept)
    assert p.read_bytes() == kept
    assert drop_torn_tail(tmp_path / "missing.jsonl") == 0


def test_version_is_the_installed_distribution_version():
    from importlib.metadata import version

    import cmerl

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == f"cmerl {version('cmerl')}" == f"cmerl {cmerl.__version__}"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_interrupted_score_resumes_without_redoing_rows(tmp_path, verifier_folder, monkeypatch, suffix):
    """Rows are appended every CHUNK_ROWS; after a crash in the second chunk the first chunk is on disk,
    and a rerun scores only the rest. The result equals an uninterrupted run."""
    import cmerl.score_rows as score_cli

    rows = [{"prompt": f"Question {i}?", "response": f"Answer number {i}."} for i in range(5)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["score", "--verifier", str(verifier_folder), "--input", str(inp), "--dtype", "float32"]
    runner = CliRunner()
    # the uninterrupted reference scores in the same chunks (batch shapes move float32 rounding by CPU and
    # thread count, so an equal result is only promised for equal chunks)
    monkeypatch.setattr(score_cli, "CHUNK_ROWS", 2)
    full = tmp_path / f"full{suffix}"
    assert runner.invoke(app, [*args, "--output", str(full)]).exit_code == 0

    real_score, calls, crash = Verifier.score, [], [True]

    def crash_on_second_chunk(self, prompts, responses, **kw):
        calls.append(list(responses))
        if len(calls) == 2 and crash and crash.pop():
            raise KeyboardInterrupt  # the user pressed Ctrl-C, once
        return real_score(self, prompts, responses, **kw)

    monkeypatch.setattr(Verifier, "score", crash_on_second_chunk)
    out = tmp_path / f"out{suffix}"
    assert runner.invoke(app, [*args, "--output", str(out)]).exit_code != 0
    progress = score_cli.progress_path(out)
    from cmerl.io import iter_jsonl

    assert [r["response"] for r in iter_jsonl(progress)] == [rows[0]["response"], rows[1]["response"]]

    calls.clear()
    res = runner.invoke(app, [*args, "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert "resuming: 2 of 5 rows already scored" in res.output
    assert calls == [[r["response"] for r in rows[2:4]], [rows[4]["response"]]]  # nothing redone
    read = (lambda p: list(iter_jsonl(p))) if suffix == ".jsonl" else (lambda p: json.loads(p.read_text()))
    assert read(out) == read(full)
    assert not (suffix == ".json" and progress.exists())  # the partial file is gone once the .json is written

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "Something else?", "response": "Yes."}) + "\n")
    before = out.read_bytes()
    res = runner.invoke(app, ["score", "--verifier", str(verifier_folder), "--input", str(other),
                              "--output", str(out)])
    assert res.exit_code == 2 and "belongs to another run" in res.output  # in every output format
    assert out.read_bytes() == before
