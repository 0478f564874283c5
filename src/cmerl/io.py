"""Reading and writing JSON / JSONL record files, with line-numbered errors and atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class BadRow:
    """A row that could not be used: ``line`` is 1-based (JSONL line, or list index + 1 for JSON)."""

    line: int
    reason: str


def read_records(path: str | Path) -> tuple[list[tuple[int, Any]], list[BadRow]]:
    """Rows of a ``.jsonl`` (one object per line) or ``.json`` (a list of objects) file.

    Returns ``([(line, obj)], [BadRow])``: unparseable lines are reported, not fatal. Blank lines are
    skipped. Raises FileNotFoundError naming the path, or ValueError when a .json file is not a list.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input file not found: {p}")
    text = p.read_text(encoding="utf-8")
    rows: list[tuple[int, Any]] = []
    bad: list[BadRow] = []
    if p.suffix == ".json" or (p.suffix != ".jsonl" and text.lstrip().startswith("[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise ValueError(f"{p}: a .json input must hold a list of objects (got {type(data).__name__})")
        return [(i + 1, row) for i, row in enumerate(data)], bad
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            bad.append(BadRow(n, f"invalid JSON: {exc.msg}"))
    return rows, bad


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """Complete JSON lines of a file that may be being appended to; a torn last line is skipped."""
    p = Path(path)
    if not p.is_file():
        return
    with p.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn write from an interrupted run
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


def drop_torn_tail(path: str | Path) -> int:
    """Cut a file back to the end of its last complete line (what a writer killed mid-line leaves);
    returns the number of bytes removed (0 when the file ends with a newline, is empty or is missing)."""
    p = Path(path)
    if not p.is_file():
        return 0
    with p.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        pos, keep = size, 0
        while pos > 0 and not keep:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = pos + cut + 1
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append rows and flush + fsync, so an interrupted run keeps every row it reported. A torn last line
    left by an earlier interrupted writer is removed first, so it cannot swallow the next row."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(p)
    with p.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = 2) -> None:
    """Write JSON to a temp file in the same folder and rename it into place."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=indent)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_records(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSONL (``.jsonl``) or a JSON list (anything else), atomically."""
    p = Path(path)
    if p.suffix == ".jsonl":
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, p)
    else:
        write_json_atomic(p, rows)
