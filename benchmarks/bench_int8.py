"""int8 vs float32 (and bf16 where native) for the frozen models: the verifier's reward and the judge's verdicts.

``dtype: int8`` (:mod:`cmerl.quantization`) is an opt-in speed path; float32 is the reference. This runs the
same work under each dtype, one model loaded at a time, and prints the ratios side by side:

Part 1, verifier (``--verifier``): the reward check on the first ``--pairs`` bundled UltraFeedback pairs
(``cmerl reward-check`` with the ``mean_logprob`` signal: raw CME). Per dtype: scoring seconds and speed-up
over float32, how often CME prefers chosen, how many pairs keep float32's preference, and the mean / max
absolute difference from float32's mean per-token log-likelihood (nats/token) over all 2 x pairs responses.

Part 2, judge (``--judge``): ``cmerl judge-check --pairs`` on the first ``--judge-pairs`` system-vs-system
pairs of ``--judge-set`` (|GPT-4 Turbo margin| >= 0.3, instruction + both outputs at most
``--max-pair-chars``). Per dtype: judging seconds and speed-up, agreement with GPT-4 Turbo (a tie counts
half), how many verdicts equal float32's, and the mean absolute difference of the log-prob margin (nats).

Bounds (printed as PASS/FAIL per dtype, stated before measuring): a dtype is within bounds of float32 when
at least 90% of the reward-check preferences and 85% of the judge verdicts are unchanged, and the reward
check's accuracy and the judge's agreement with GPT-4 Turbo each move by at most 5 points.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_int8.py [--pairs 48] [--judge-pairs 16] \
        [--dtypes float32,bfloat16,int8] [--output benchmarks/results/int8/bench_int8.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

#: The bounds of a fast dtype against float32 (fractions), fixed before any measurement.
MIN_SAME_PREFERENCE = 0.90
MIN_SAME_VERDICT = 0.85
MAX_RATE_SHIFT = 0.05


def verifier_part(name: str, dtype: str, n_pairs: int) -> dict:
    """Reward check (mean_logprob) of ``name`` under ``dtype``: seconds and per-response values."""
    from cmerl.checks import load_preference_pairs, reward_check
    from cmerl.scoring import Verifier

    t0 = time.perf_counter()
    verifier = Verifier.from_pretrained(name, dtype=dtype)
    load_s = time.perf_counter() - t0
    pairs = load_preference_pairs(n=n_pairs)
    verifier.score([pairs[0].prompt], [pairs[0].chosen])  # warm-up: first-call allocations, not the dtype
    result = reward_check(verifier, pairs, signals=["mean_logprob"])
    values = result.values["mean_logprob"]
    del verifier
    gc.collect()
    return {"dtype": dtype, "load_seconds": load_s, "seconds": result.seconds,
            "accuracy": result.signals["mean_logprob"].accuracy.value, "values": values, "n": result.n}


def judge_part(name: str, dtype: str, pairs_set: str, n_pairs: int, max_chars: int, workdir: str) -> dict:
    """``judge-check --pairs`` of ``name`` under ``dtype``: seconds, agreement and per-pair verdicts."""
    from cmerl.calibration import pairs_check
    from cmerl.judging import JudgeSpec, read_verdicts

    t0 = time.perf_counter()
    judge = JudgeSpec(name, dtype=dtype).build()
    load_s = time.perf_counter() - t0
    output = Path(workdir) / f"verdicts-{dtype}.jsonl"
    t0 = time.perf_counter()
    result = pairs_check(judge, pairs_set, output=output, n=n_pairs, max_pair_chars=max_chars, remember=False)
    seconds = time.perf_counter() - t0
    _, rows = read_verdicts(output)
    del judge
    gc.collect()
    return {"dtype": dtype, "load_seconds": load_s, "seconds": seconds, "agreement": result.agreement.value,
            "n": result.n, "ties": result.ties, "verdicts": [r["verdict"] for r in rows],
            "margins": [r.get("margin") for r in rows]}


def compare_verifier(runs: list[dict]) -> list[dict]:
    ref = runs[0]
    n = ref["n"]

    def prefs(values):
        return [values[i] > values[n + i] for i in range(n)]

    ref_prefs = prefs(ref["values"])
    out = []
    for r in runs:
        diffs = [abs(a - b) for a, b in zip(r["values"], ref["values"])]
        same = sum(p == q for p, q in zip(prefs(r["values"]), ref_prefs)) / n
        shift = abs(r["accuracy"] - ref["accuracy"])
        out.append({"dtype": r["dtype"], "seconds": r["seconds"], "speedup": ref["seconds"] / r["seconds"],
                    "accuracy": r["accuracy"], "same_preference": same,
                    "mean_abs_diff": sum(diffs) / len(diffs), "max_abs_diff": max(diffs),
                    "within_bounds": same >= MIN_SAME_PREFERENCE and shift <= MAX_RATE_SHIFT,
                    "load_seconds": r["load_seconds"]})
    return out


def compare_judge(runs: list[dict]) -> list[dict]:
    ref = runs[0]
    out = []
    for r in runs:
        n = min(len(r["verdicts"]), len(ref["verdicts"]))
        same = sum(a == b for a, b in zip(r["verdicts"], ref["verdicts"])) / n
        diffs = [abs(a - b) for a, b in zip(r["margins"], ref["margins"]) if a is not None and b is not None]
        shift = abs(r["agreement"] - ref["agreement"])
        out.append({"dtype": r["dtype"], "seconds": r["seconds"], "speedup": ref["seconds"] / r["seconds"],
                    "agreement": r["agreement"], "ties": r["ties"], "same_verdict": same,
                    "mean_abs_margin_diff": sum(diffs) / len(diffs) if diffs else None,
                    "within_bounds": same >= MIN_SAME_VERDICT and shift <= MAX_RATE_SHIFT,
                    "load_seconds": r["load_seconds"]})
    return out


def write(report: dict, output: str | None) -> None:
    """Save ``report`` as JSON at ``output`` (nothing when None); the file is replaced whole."""
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    print("| " + " | ".join(label for label, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for _, key in columns:
            v = row[key]
            if isinstance(v, bool):
                cells.append("PASS" if v else "FAIL")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}")
            else:
                cells.append(str(v))
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verifier", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--judge", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--pairs", type=int, default=48, help="UltraFeedback pairs of the reward check (0: skip)")
    ap.add_argument("--judge-pairs", type=int, default=16, help="system-vs-system pairs judged (0: skip)")
    ap.add_argument("--judge-set", default="fusechat", help="bundled model-pairs file: phi2 or fusechat")
    ap.add_argument("--max-pair-chars", type=int, default=3000)
    ap.add_argument("--dtypes", default="float32,bfloat16,int8",
                    help="comma-separated; float32 first (the reference); bfloat16 is skipped on a CPU "
                         "without native bf16")
    ap.add_argument("--output", default=None, help="write the measurements as JSON here")
    args = ap.parse_args(argv)

    import torch

    from cmerl.precision import cpu_bf16_support, describe_cpu_bf16
    from cmerl.study import machine_info

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or dtypes[0] != "float32":
        ap.error("--dtypes must start with float32, the reference")
    if "bfloat16" in dtypes and not cpu_bf16_support().native:
        print("bfloat16 skipped: this CPU has no native bf16 matrix products")
        dtypes.remove("bfloat16")
    header = {**machine_info(), "torch": torch.__version__, "bf16": describe_cpu_bf16(), "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv)}
    print(json.dumps(header))
    report: dict = {"header": header, "bounds": {"min_same_preference": MIN_SAME_PREFERENCE,
                                                "min_same_verdict": MIN_SAME_VERDICT,
                                                "max_rate_shift": MAX_RATE_SHIFT}}
    if args.pairs:
        runs = []
        for d in dtypes:
            runs.append(verifier_part(args.verifier, d, args.pairs))
            print(f"[verifier {d}] {runs[-1]['seconds']:.1f}s", flush=True)
        rows = compare_verifier(runs)
        report["verifier"] = {"model": args.verifier, "pairs": args.pairs, "rows": rows}
        print_table(f"verifier {args.verifier}: reward check (mean_logprob) on {args.pairs} UltraFeedback pairs",
                    rows, [("dtype", "dtype"), ("seconds", "seconds"), ("speed-up vs fp32", "speedup"),
                           ("prefers chosen", "accuracy"), ("same preference as fp32", "same_preference"),
                           ("mean abs diff, nats/token", "mean_abs_diff"), ("max abs diff", "max_abs_diff"),
                           ("within bounds", "within_bounds")])
        write(report, args.output)  # each part is saved as it finishes
    if args.judge_pairs:
        runs = []
        with tempfile.TemporaryDirectory(prefix="bench-int8-") as workdir:
            for d in dtypes:
                runs.append(judge_part(args.judge, d, args.judge_set, args.judge_pairs, args.max_pair_chars,
                                       workdir))
                print(f"[judge {d}] {runs[-1]['seconds']:.1f}s", flush=True)
        rows = compare_judge(runs)
        report["judge"] = {"model": args.judge, "pairs_set": args.judge_set, "pairs": runs[0]["n"],
                           "max_pair_chars": args.max_pair_chars, "rows": rows}
        print_table(f"judge {args.judge}: {runs[0]['n']} {args.judge_set} pairs (|margin| >= 0.3)", rows,
                    [("dtype", "dtype"), ("seconds", "seconds"), ("speed-up vs fp32", "speedup"),
                     ("agreement with GPT-4 Turbo", "agreement"), ("ties", "ties"),
                     ("same verdict as fp32", "same_verdict"), ("mean abs margin diff, nats", "mean_abs_margin_diff"),
                     ("within bounds", "within_bounds")])
        write(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
