"""Input and output record files: what a user's odd file gets (issue 10, item 8).

A byte that is not UTF-8 costs its line only and is reported with file and line; a folder is called a
folder; a UTF-8 byte-order mark keeps row 1; ``score`` refuses to append after foreign text in its
``.jsonl`` output.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from cmerl.cli import app
from cmerl.io import (
    iter_jsonl,
    read_records,
    skipped_lines,
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_records,
    write_text_atomic,
)

ROW = {"prompt": "Q?", "response": "A."}


def test_non_utf8_byte_costs_one_line_named_with_file_and_line(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_bytes(json.dumps(ROW).encode() + b"\n" + b'{"prompt": "caf\xe9", "response": "x"}\n'
                  + json.dumps(ROW).encode() + b"\n")
    rows, bad = read_records(p)
    assert [n for n, _ in rows] == [1, 3]
    assert len(bad) == 1 and bad[0].line == 2 and "not valid UTF-8 (byte 0xe9 at column 16)" in bad[0].reason
    j = tmp_path / "rows.json"
    j.write_bytes(b'[\n {"prompt": "ok", "response": "x"},\n {"prompt": "caf\xe9"}\n]')
    with pytest.raises(ValueError, match=r"rows\.json: line 3 column 17: not valid UTF-8 \(byte 0xe9\)"):
        read_records(j)


def test_folder_input_is_called_a_folder(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a file"):
        read_records(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_records(tmp_path / "absent.jsonl")
    res = CliRunner().invoke(app, ["score", "-v", "smollm2-135m-instruct", "-i", str(tmp_path), "-o",
                                   str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "is a folder, not a file" in res.output


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_utf8_bom_keeps_row_one(tmp_path, suffix):
    p = tmp_path / f"rows{suffix}"
    body = json.dumps([ROW, ROW]) if suffix == ".json" else json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n"
    p.write_bytes(b"\xef\xbb\xbf" + body.encode())
    rows, bad = read_records(p)
    assert [r for _, r in rows] == [ROW, ROW] and bad == []
    if suffix == ".jsonl":
        assert list(iter_jsonl(p)) == [ROW, ROW]


def test_iter_jsonl_strict_and_what_it_skipped(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_bytes(b'{"a": 1}\nnot json at all\n\xff\xfe\n{"a": 2}\n{"a": 3')
    assert list(iter_jsonl(p)) == [{"a": 1}, {"a": 2}]
    assert [(b.line, b.reason.split(" (")[0].split(":")[0]) for b in skipped_lines(p)] == [
        (2, "invalid JSON"), (3, "not valid UTF-8"), (5, "incomplete last line")]
    with pytest.raises(ValueError, match=r"out\.jsonl: line 2: invalid JSON"):
        list(iter_jsonl(p, strict=True))


def test_score_refuses_to_append_after_foreign_text(tmp_path):
    """An output .jsonl whose fingerprint matches but that someone edited: its foreign line is named,
    nothing is appended."""
    from _server_helpers import save_tiny_verifier

    verifier = save_tiny_verifier(tmp_path / "verifier")
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"Q{i}?", "response": f"A{i}."}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    args = ["score", "-v", str(verifier), "-i", str(inp), "-o", str(out), "--dtype", "float32"]
    assert CliRunner().invoke(app, args).exit_code == 0
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + "# a note someone typed in\n")  # two rows gone, text in their place
    before = out.read_bytes()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "line 2: invalid JSON" in res.output, res.output
    assert out.read_bytes() == before


# ------------------------------------------------------------------------------------------ atomic writes
def test_atomic_write_keeps_the_old_file_when_the_write_raises_midway(tmp_path):
    target = tmp_path / "result.json"
    target.write_text('{"old": true}\n', encoding="utf-8")

    def half_then_fail(f):
        f.write(b'{"new": ')
        f.flush()
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        write_atomic(target, half_then_fail, text=False)
    assert target.read_text(encoding="utf-8") == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # the temp file is gone
    # json.dump streams: the list's first item is in the temp file when the second fails to encode
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(target, [1, object()])
    assert target.read_text(encoding="utf-8") == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_writes_replace_create_folders_and_keep_plain_permissions(tmp_path):
    old_umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a" / "b" / "notes.md", "café\n")
        write_bytes_atomic(tmp_path / "blob.bin", b"\x00\xff")
        write_json_atomic(tmp_path / "r.json", {"k": "é"})
        write_records(tmp_path / "rows.jsonl", [{"i": 1}, {"i": 2}])
    finally:
        os.umask(old_umask)
    assert (tmp_path / "a" / "b" / "notes.md").read_bytes() == "café\n".encode()
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "r.json").read_text(encoding="utf-8") == '{\n  "k": "é"\n}\n'
    assert (tmp_path / "rows.jsonl").read_text(encoding="utf-8") == '{"i": 1}\n{"i": 2}\n'
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644  # what open() gives, not mkstemp's 0o600
    write_text_atomic(tmp_path / "a" / "b" / "notes.md", "second\n")
    assert (tmp_path / "a" / "b" / "notes.md").read_text(encoding="utf-8") == "second\n"
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["notes.md"]
