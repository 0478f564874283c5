"""Counts for the "Reliability" section of benchmarks/RESULTS.md.

Tests that try many inputs or kill points call :func:`record`; with ``CMERL_RELIABILITY_REPORT=FILE`` set,
each call appends one JSON line ``{"section", "what", "tried", "failed", "detail"}`` to FILE (otherwise
nothing is written). ``python tests/_reliability.py FILE`` prints the table that RESULTS.md quotes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def record(section: str, what: str, tried: int, failed: int = 0, detail: str = "") -> None:
    path = os.environ.get("CMERL_RELIABILITY_REPORT")
    if not path:
        return
    row = {"section": section, "what": what, "tried": tried, "failed": failed, "detail": detail}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| section | what | tried | failures | detail |", "|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['section']} | {r['what']} | {r['tried']} | {r['failed']} | {r['detail']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
