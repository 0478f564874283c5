"""SIGKILL every long job at random points, resume it, and compare with an uninterrupted run.

For ``cmerl score``, ``cmerl generate`` and ``cmerl judge``: a real process is killed (SIGKILL, no
clean-up) once its output holds a randomly drawn number of rows (one that leaves work to do), after a
random extra delay of up to 50 ms; this is repeated ``KILLS`` times on the same output, each rerun
resuming the last. (Kills in the middle of a write are rare this way; the torn tails they leave are the
subject of the JSONL property in ``test_properties.py``.) After
each kill the rows on disk must be a duplicate-free subset of the uninterrupted run's rows, each identical
to its counterpart; the final resume must give exactly the uninterrupted output. Kill points come from
``random.Random(CMERL_KILL_SEED)`` (default 10), so CI is reproducible and a local run can try others.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _reliability import record
from _server_helpers import CMERL, save_tiny_verifier
from typer.testing import CliRunner

from cmerl.cli import app
from cmerl.io import iter_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: the children run one thread too

KILLS = int(os.environ.get("CMERL_KILLS", "2"))
SEED = int(os.environ.get("CMERL_KILL_SEED", "10"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _lines(path: Path) -> list[dict]:
    return list(iter_jsonl(path))


def kill_at_random_points(args: list[str], rows_on_disk: Callable[[], int], total: int, rng: random.Random,
                          *, step: int, check: Callable[[], None]) -> list[str]:
    """Run ``cmerl ARGS`` ``KILLS`` times, each killed once ``rows_on_disk()`` reaches a random count that
    leaves at least one append (``step`` rows) to do, plus a random delay of up to 50 ms; ``check()`` runs
    after every kill. Returns what each kill hit; at least one kill must land before the job ends."""
    hits = []
    for _ in range(KILLS):
        start = rows_on_disk()
        if start + 1 > total - step:
            break
        target = rng.randint(start + 1, total - step)
        proc = subprocess.Popen([CMERL, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        deadline = time.monotonic() + 180
        while proc.poll() is None and rows_on_disk() < target and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            hits.append(f"killed at >= {target} of {total} rows (had {rows_on_disk()})")
        else:
            hits.append(f"finished before the kill at {target} of {total}")
        proc.wait(30)
        check()
    assert any(h.startswith("killed") for h in hits), hits
    return hits


def _assert_subset(kept: list[dict], reference: list[dict], key: Callable[[dict], object]) -> None:
    keys = [key(r) for r in kept]
    assert len(keys) == len(set(keys)), "a row was written twice"
    by_key = {key(r): r for r in reference}
    for r in kept:
        assert r == by_key[key(r)], f"row {key(r)} differs from the uninterrupted run"


# --------------------------------------------------------------------------------------------- score
def test_score_killed_at_random_points(tmp_path):
    verifier = save_tiny_verifier(tmp_path / "verifier")
    inp = tmp_path / "in.jsonl"
    n = 600  # three appends of CHUNK_ROWS = 256
    inp.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} + {i}?", "response": f"It is {2 * i}."})
                           + "\n" for i in range(n)))
    base = ["score", "--verifier", str(verifier), "--input", str(inp), "--dtype", "float32"]
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    assert CliRunner().invoke(app, [*base, "--output", str(ref)]).exit_code == 0
    reference = _lines(ref)

    def check() -> None:
        kept = _lines(out)
        assert kept == reference[:len(kept)]  # a prefix of the uninterrupted run: nothing lost or repeated

    hits = kill_at_random_points([*base, "--output", str(out)], lambda: len(_lines(out)), n, random.Random(SEED),
                                 step=256, check=check)
    res = CliRunner().invoke(app, [*base, "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == ref.read_bytes()
    record("kill tests", f"cmerl score (.jsonl, {n} rows, appends of 256)", len(hits), 0, "; ".join(hits))


# --------------------------------------------------------------------------------------------- generate
def test_generate_killed_at_random_points(tmp_path):
    from _eval_helpers import save_tiny_model

    from cmerl.generation import partial_path

    model = save_tiny_model(tmp_path / "tiny")
    n = 10
    base = ["generate", "--model", str(model), "--prompts", f"alpaca_eval:{n}", "--batch-size", "1",
            "--max-new-tokens", "16", "--dtype", "float32"]
    ref, out = tmp_path / "ref.json", tmp_path / "out.json"
    assert CliRunner().invoke(app, [*base, "--output", str(ref)]).exit_code == 0
    reference = json.loads(ref.read_text())
    side = partial_path(out)

    def rows_on_disk() -> int:
        return len(json.loads(out.read_text())) if out.exists() else max(0, len(_lines(side)) - 1)

    def check() -> None:
        if out.exists():  # finished before the kill
            assert json.loads(out.read_text()) == reference
            return
        lines = _lines(side)
        assert not lines or lines[0]["kind"] == "cmerl.outputs.partial"
        _assert_subset(lines[1:], reference, key=lambda r: r["index"])

    hits = kill_at_random_points([*base, "--output", str(out)], rows_on_disk, n, random.Random(SEED + 1),
                                 step=2, check=check)
    res = CliRunner().invoke(app, [*base, "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text()) == reference and not side.exists()
    record("kill tests", f"cmerl generate ({n} prompts, batch 1)", len(hits), 0, "; ".join(hits))


# --------------------------------------------------------------------------------------------- judge
def test_judge_killed_at_random_points(tmp_path):
    from _eval_helpers import save_tiny_model

    judge = save_tiny_model(tmp_path / "judge")
    n = 16  # four appends of 4 pairs
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([{"instruction": f"Q{i}", "output": f"answer {i} from A", "generator": "A"}
                             for i in range(n)]))
    b.write_text(json.dumps([{"instruction": f"Q{i}", "output": f"B says {i * 7}", "generator": "B"}
                             for i in range(n)]))
    base = ["judge", "--a", str(a), "--b", str(b), "--judge", str(judge), "--judge-dtype", "float32"]
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    assert CliRunner().invoke(app, [*base, "--output", str(ref)]).exit_code == 0
    reference = _lines(ref)

    def check() -> None:
        lines = _lines(out)
        assert not lines or lines[0] == reference[0]  # the header (fingerprint included) is this run's
        _assert_subset(lines[1:], reference[1:], key=lambda r: r["index"])

    hits = kill_at_random_points([*base, "--output", str(out)], lambda: max(0, len(_lines(out)) - 1), n,
                                 random.Random(SEED + 2), step=4, check=check)
    res = CliRunner().invoke(app, [*base, "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == ref.read_bytes()
    record("kill tests", f"cmerl judge ({n} pairs, local tiny judge)", len(hits), 0, "; ".join(hits))
