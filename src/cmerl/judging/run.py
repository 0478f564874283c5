"""The resumable judging loop: pairs of two outputs files, the verdicts file (header with its fingerprint,
one row per pair), judging both orders and the judge key that names a judge setup."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from cmerl.fingerprint import Fingerprint, RunMismatchError, sha256_file, sha256_json
from cmerl.io import append_jsonl, iter_jsonl, read_records
from cmerl.judging.prompt import DecisionRule, Job, Judge, JudgePrompt, decide

VERDICTS_KIND = "cmerl.verdicts"


# --------------------------------------------------------------------------- pairs and the run loop
@dataclass
class Pair:
    """Two systems' responses to one instruction; ``index`` is the row in the A file."""

    index: int
    instruction: str
    output_a: str
    output_b: str
    dataset: str | None = None
    generator_a: str | None = None
    generator_b: str | None = None


def load_pairs(a_path: str | Path, b_path: str | Path) -> tuple[list[Pair], list[str]]:
    """Pair two AlpacaEval-format outputs files by instruction (in A's order).

    Returns ``(pairs, warnings)``; rows of A without a match in B are skipped with a warning. Raises
    naming the file and line when a row lacks a string ``instruction`` or ``output``.
    """
    rows_a, rows_b = _outputs_rows(a_path), _outputs_rows(b_path)
    by_instr: dict[str, list[dict]] = {}
    for row in rows_b:
        by_instr.setdefault(row["instruction"], []).append(row)
    pairs, unmatched = [], 0
    for i, ra in enumerate(rows_a):
        cands = by_instr.get(ra["instruction"])
        if not cands:
            unmatched += 1
            continue
        rb = cands.pop(0)
        pairs.append(Pair(i, ra["instruction"], ra["output"], rb["output"], ra.get("dataset"),
                          ra.get("generator"), rb.get("generator")))
    warnings = []
    if unmatched:
        warnings.append(f"{unmatched} instruction(s) of {a_path} have no output in {b_path}; skipped")
    extra_b = sum(len(v) for v in by_instr.values())
    if extra_b:
        warnings.append(f"{extra_b} row(s) of {b_path} have no match in {a_path}; ignored")
    if not pairs:
        raise ValueError(f"{a_path} and {b_path} share no instruction; judge outputs of the same prompts")
    return pairs, warnings


def _outputs_rows(path: str | Path) -> list[dict]:
    rows, bad = read_records(path)
    if bad:
        raise ValueError(f"{path}: line {bad[0].line}: {bad[0].reason}")
    out = []
    for line, row in rows:
        if not isinstance(row, dict) or row.get("kind") == VERDICTS_KIND:
            raise ValueError(f"{path}: row {line} is not an outputs object with instruction/output")
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{path}: row {line} has no string {key!r} (AlpacaEval model_outputs format "
                                 f"needs 'instruction' and 'output')")
        out.append(row)
    return out


def verdicts_header(judge: Judge, rule: DecisionRule, prompt: JudgePrompt, *, a: dict, b: dict) -> dict:
    """First line of a verdicts file: who judged, how, with which prompt, and what was compared.

    ``a`` / ``b`` describe the two systems (``path``, ``generator``); when ``path`` is a file its content
    hash is added as ``sha256``. ``fingerprint`` (:mod:`cmerl.fingerprint`) holds those hashes and the
    judge, decision rule and prompt: :func:`run_judge` refuses to resume a file whose fingerprint differs."""
    a, b = dict(a), dict(b)
    for side in (a, b):
        path = side.get("path")
        if isinstance(path, str) and Path(path).is_file():
            side["sha256"] = sha256_file(path)
    header = {"kind": VERDICTS_KIND, "version": 1, "judge": {"name": judge.name, "settings": judge.settings()},
              "decision": asdict(rule), "prompt": prompt.to_dict(), "a": a, "b": b}
    header["fingerprint"] = Fingerprint(
        "judge", inputs={"a": a.get("sha256"), "b": b.get("sha256")},
        settings={"judge": header["judge"], "decision": header["decision"],
                  "prompt_sha256": prompt.sha256}).to_dict()
    return header


def pair_sha256(pair: Pair) -> str:
    """Content hash of what a verdict row judged (instruction and both outputs), kept in every row so a
    resume never keeps a verdict on other outputs."""
    return sha256_json([pair.instruction, pair.output_a, pair.output_b])


def read_verdicts(path: str | Path) -> tuple[dict | None, list[dict]]:
    """``(header, rows)`` of a verdicts file (complete lines only); raises when it is not one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"verdicts file not found: {path}")
    header, rows = None, []
    for i, obj in enumerate(iter_jsonl(path)):
        if i == 0 and obj.get("kind") == VERDICTS_KIND:
            header = obj
        elif "verdict" in obj and "index" in obj:
            rows.append(obj)
        else:
            raise ValueError(f"{path}: line {i + 1} is not a verdict row (needs 'index' and 'verdict')")
    return header, rows


def _same_setup(old: dict, new: dict) -> list[str]:
    if "fingerprint" in new:
        if "fingerprint" not in old:
            return ["fingerprint (the file was written by an older cmerl that did not record its inputs)"]
        diffs = Fingerprint.from_dict(new["fingerprint"]).differences(
            Fingerprint.from_dict(old["fingerprint"], where="the verdicts header's fingerprint"))
        what = {"input 'a'": "A outputs", "input 'b'": "B outputs", "setting 'judge": "judge",
                "setting 'decision": "decision", "setting 'prompt": "prompt"}
        return [next((name for start, name in what.items() if d.startswith(start)), "setup") + f" ({d})"
                for d in diffs]
    diffs = []
    for key in ("judge", "decision"):
        if old.get(key) != new.get(key):
            diffs.append(key)
    if (old.get("prompt") or {}).get("sha256") != new["prompt"]["sha256"]:
        diffs.append("prompt")
    return diffs


def run_judge(judge: Judge, pairs: Sequence[Pair], output: str | Path, *, rule: DecisionRule = DecisionRule(),
              header: dict, chunk_pairs: int = 4, progress: bool = False,
              stop_after: int | None = None) -> list[dict]:
    """Judge every pair in both orders and append one row per pair to ``output`` (JSONL), resumably.

    An existing file must carry the same fingerprint (:func:`verdicts_header`: judge, settings, decision
    rule, prompt and the content hashes of the A and B files), else
    :class:`~cmerl.fingerprint.RunMismatchError` (a ValueError) naming what differs; pairs already in it
    (same index and instruction, judged on the same outputs: ``pair_sha256``) are kept, not redone. Rows are appended
    and fsynced every ``chunk_pairs`` pairs, so an interrupted run loses at most one chunk. An order whose
    output is unusable is retried once. ``stop_after`` judges at most that many new pairs (for tests and
    budgets). Returns all rows of the file, in pair order.
    """
    out = Path(output)
    old_header, old_rows = read_verdicts(out) if out.exists() else (None, [])
    if out.exists() and out.stat().st_size > 0:
        if old_header is None:
            raise ValueError(f"{out} exists but is not a cmerl verdicts file; pass another --output")
        diffs = _same_setup(old_header, header)
        if diffs:
            raise RunMismatchError(f"{out} was judged with a different {'; '.join(diffs)}; pass another --output "
                                   "(or delete the file) to judge with these settings")
    else:
        append_jsonl(out, [header])
    current = {(p.index, p.instruction): pair_sha256(p) for p in pairs}
    for r in old_rows:
        key = (r["index"], r.get("instruction"))
        if key in current and r.get("pair_sha256") != current[key]:
            raise RunMismatchError(f"{out}: the verdict on pair {r['index']} ({str(r.get('instruction'))[:60]!r}) "
                                   "was judged on other outputs than this run's: it belongs to another run; pass "
                                   "another --output (or delete the file)")
    done = {(r["index"], r.get("instruction")) for r in old_rows}
    todo = [p for p in pairs if (p.index, p.instruction) not in done]
    if stop_after is not None:
        todo = todo[:max(0, stop_after)]
    bar = None
    if progress and todo:
        bar = tqdm(total=2 * len(todo), desc=f"judging ({judge.name})", unit="call")
        judge.progress = bar.update  # type: ignore[attr-defined]
    try:
        new_rows = []
        for s in range(0, len(todo), chunk_pairs):
            chunk = todo[s:s + chunk_pairs]
            rows = judge_pairs(judge, chunk, rule)
            append_jsonl(out, rows)
            new_rows.extend(rows)
    finally:
        if bar is not None:
            bar.close()
            judge.progress = None  # type: ignore[attr-defined]
    by_key = {(r["index"], r.get("instruction")): r for r in old_rows + new_rows}
    order = {(p.index, p.instruction): k for k, p in enumerate(pairs)}
    return sorted(by_key.values(), key=lambda r: order.get((r["index"], r.get("instruction")), 1 << 30))


def judge_pairs(judge: Judge, pairs: Sequence[Pair], rule: DecisionRule = DecisionRule()) -> list[dict]:
    """Verdict rows for pairs (both orders, one retry of unusable orders); nothing is written."""
    jobs = []
    for p in pairs:
        jobs.append(Job(p.instruction, p.output_a, p.output_b))  # order ab
        jobs.append(Job(p.instruction, p.output_b, p.output_a))  # order ba
    results = judge.judge(jobs)
    retry = [k for k, r in enumerate(results) if r.choice is None]
    if retry:
        again = judge.judge([jobs[k] for k in retry])
        for k, r in zip(retry, again):
            r.attempts = 2
            if r.choice is None:
                r.error = r.error or "unparseable judge output"
                r.extra["first_raw"] = results[k].raw
            results[k] = r
    rows = []
    for n, p in enumerate(pairs):
        ab, ba = results[2 * n], results[2 * n + 1]
        verdict, margin, consistent = decide(ab, ba, rule)
        rows.append({"index": p.index, "instruction": p.instruction, "pair_sha256": pair_sha256(p),
                     "dataset": p.dataset,
                     "generator_a": p.generator_a, "generator_b": p.generator_b,
                     "len_a": len(p.output_a), "len_b": len(p.output_b),
                     "verdict": verdict, "margin": margin, "consistent": consistent,
                     "orders": {"ab": ab.to_dict(), "ba": ba.to_dict()}})
    return rows


def judge_key(header: dict) -> str:
    """A short key for a judge setup (name, settings, decision rule, prompt), to look up its agreement.

    The weights' dtype is left out: ``auto`` picks bf16 or fp32 by hardware, which moves log-probs by
    rounding only, and a measured agreement belongs to the model, prompt and rule."""
    judge = dict(header.get("judge") or {})
    judge["settings"] = {k: v for k, v in (judge.get("settings") or {}).items() if k != "dtype"}
    prompt_hash = (header.get("prompt") or {}).get("sha256")  # absent in hand-made headers: no agreement found
    blob = json.dumps([judge, header.get("decision"), prompt_hash], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
