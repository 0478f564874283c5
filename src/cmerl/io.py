"""Reading and writing JSON / JSONL record files, with line-numbered errors and atomic writes."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass
class BadRow:
    """A row that could not be used: ``line`` is 1-based (JSONL line, or list index + 1 for JSON)."""

    line: int
    reason: str


def _check_input_file(p: Path) -> None:
    if p.is_dir():
        raise ValueError(f"{p} is a folder, not a file: pass a .jsonl or .json file")
    if not p.is_file():
        raise FileNotFoundError(f"input file not found: {p}")


def _decode_line(raw: bytes, n: int) -> tuple[str | None, BadRow | None]:
    """A line's text, or the BadRow saying where its bytes are not UTF-8."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, BadRow(n, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")


def read_records(path: str | Path) -> tuple[list[tuple[int, Any]], list[BadRow]]:
    """Rows of a ``.jsonl`` (one object per line) or ``.json`` (a list of objects) file.

    Returns ``([(line, obj)], [BadRow])``: unparseable lines (bad JSON, bytes that are not UTF-8) are
    reported, not fatal. Blank lines are skipped; a UTF-8 byte-order mark is ignored. Raises
    FileNotFoundError naming the path, or ValueError for a folder, for a .json file that is not a list,
    or for a .json file that is not UTF-8 (naming line and column).
    """
    p = Path(path)
    _check_input_file(p)
    data_bytes = p.read_bytes().removeprefix(b"\xef\xbb\xbf")
    rows: list[tuple[int, Any]] = []
    bad: list[BadRow] = []
    if p.suffix == ".json" or (p.suffix != ".jsonl" and data_bytes.lstrip().startswith(b"[")):
        try:
            text = data_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data_bytes.count(b"\n", 0, exc.start) + 1
            col = exc.start - (data_bytes.rfind(b"\n", 0, exc.start) + 1) + 1
            raise ValueError(f"{p}: line {line} column {col}: not valid UTF-8 (byte "
                             f"0x{data_bytes[exc.start]:02x})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from None
        except RecursionError:
            raise ValueError(f"{p}: not valid JSON (nested too deeply)") from None
        if not isinstance(data, list):
            raise ValueError(f"{p}: a .json input must hold a list of objects (got {type(data).__name__})")
        return [(i + 1, row) for i, row in enumerate(data)], bad
    for n, raw in enumerate(data_bytes.split(b"\n"), start=1):
        line, problem = _decode_line(raw, n)
        if problem is not None:
            bad.append(problem)
            continue
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            bad.append(BadRow(n, f"invalid JSON: {exc.msg}"))
        except RecursionError:
            bad.append(BadRow(n, "invalid JSON: nested too deeply"))
    return rows, bad


def iter_jsonl(path: str | Path, *, strict: bool = False, bad: list[BadRow] | None = None) -> Iterator[dict]:
    """Complete JSON lines of a file that may be being appended to (missing file: nothing).

    A torn last line (no newline: an interrupted write) is never yielded. Complete lines that are not JSON
    or not UTF-8 are skipped, or raise ValueError naming the file and line when ``strict`` (what a resume
    needs: appending after foreign text would hide it). ``bad`` collects a :class:`BadRow` for each line
    skipped, the torn tail included, so callers can say what they ignored.
    """
    p = Path(path)
    if not p.is_file():
        return
    with p.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                if bad is not None and raw.strip():
                    bad.append(BadRow(n, "incomplete last line (an interrupted write)"))
                break
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            line, problem = _decode_line(raw, n)
            if problem is None and line.strip():
                try:
                    yield json.loads(line)
                    continue
                except (json.JSONDecodeError, RecursionError) as exc:
                    problem = BadRow(n, f"invalid JSON: {getattr(exc, 'msg', 'nested too deeply')}")
            if problem is None:
                continue  # blank line
            if strict:
                raise ValueError(f"{p}: line {n}: {problem.reason}; the file holds something other than "
                                 "complete JSON rows, so it cannot be resumed: delete it or choose another output")
            if bad is not None:
                bad.append(problem)


def skipped_lines(path: str | Path) -> list[BadRow]:
    """The lines :func:`iter_jsonl` skips in ``path`` (corrupt lines and a torn tail), for a notice."""
    bad: list[BadRow] = []
    for _ in iter_jsonl(path, bad=bad):
        pass
    return bad


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


def write_atomic(path: str | Path, write: Callable[[IO[Any]], object], *, text: bool = True) -> None:
    """Replace ``path`` by what ``write(f)`` writes, atomically: readers see the old file or the new one,
    never a part.

    ``write`` gets a new temp file in the same folder as ``path`` (so the rename cannot cross file
    systems), opened for text (UTF-8) when ``text``, else for bytes. The temp file is flushed and fsynced,
    then renamed over ``path`` (``os.replace``). When ``write`` (or the rename) raises, the temp file is
    removed and ``path`` is left as it was. Missing parent folders are created. The new file has the
    permissions a plain ``open`` would give it (0o666 less the umask), not ``mkstemp``'s 0o600."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp_file(p)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_temp_file(p: Path) -> tuple[int, Path]:
    """``(fd, path)`` of a new empty file ``.<name>.<random>.tmp`` beside ``p`` (O_EXCL: never an existing one)."""
    for _ in range(100):
        tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temp file beside {p}")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data``, atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(data), text=False)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8), atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(text))


def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = 2) -> None:
    """Write ``data`` as JSON (UTF-8, non-ASCII kept, a final newline), atomically (:func:`write_atomic`)."""

    def dump(f: IO[str]) -> None:
        json.dump(data, f, ensure_ascii=False, indent=indent)
        f.write("\n")

    write_atomic(path, dump)


def write_records(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSONL (``.jsonl``) or a JSON list (anything else), atomically."""
    p = Path(path)
    if p.suffix == ".jsonl":
        write_atomic(p, lambda f: f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    else:
        write_json_atomic(p, rows)


def name_slug(name: str, max_chars: int = 80) -> str:
    """A file-name-safe form of a model or judge name: an existing path gives its last part, every run of
    other characters than letters, digits, ``.``, ``_`` and ``-`` becomes ``_``
    (``anthropic:claude-x@http://h`` -> ``anthropic_claude-x_http_h``); at most ``max_chars`` characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name if Path(name).exists() else name).strip("_")[:max_chars]
