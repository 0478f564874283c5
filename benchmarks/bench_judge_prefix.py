"""The local judge with and without shared-prefix KV reuse (``LocalJudge(prefix_reuse=True)``), side by side.

Every context the judge reads starts with the same tokens (the judge prompt's system turn and the opening of
the user turn). With ``prefix_reuse`` they run through the model once and each batch runs only its own
suffix. This loads the judge once and runs ``cmerl judge-check --pairs`` on the first ``--pairs``
system-vs-system pairs of ``--pairs-set`` (both orders) with the plain path (the reference), then with reuse,
then the plain path again (so a machine that slows down during the run shows up as two different plain
times). It prints the speed-up over the mean plain time, the shared prefix's share of the context tokens, how
many verdicts equal the plain path's and the largest difference of a log-prob margin (nats).

Bound (stated before measuring): every verdict equal to the plain path's and every margin within 0.05 nats.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_judge_prefix.py [--pairs 12] [--dtype auto] \
        [--output benchmarks/results/judge_prefix/bench_judge_prefix.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_int8 import print_table, write

#: Largest margin difference (nats) the reuse path may show against the plain one; verdicts must all agree.
MAX_MARGIN_DIFF = 0.05


def run(judge, reuse: bool, pairs_set: str, n: int, max_chars: int, output: Path) -> dict:
    """One ``pairs_check`` pass with ``judge.prefix_reuse = reuse``: seconds, verdicts and margins."""
    from cmerl.calibration import pairs_check
    from cmerl.judging import read_verdicts

    judge.prefix_reuse = reuse
    judge._prefix = None  # each pass builds its own prefix, inside its own timing
    t0 = time.perf_counter()
    result = pairs_check(judge, pairs_set, output=output, n=n, max_pair_chars=max_chars, remember=False)
    seconds = time.perf_counter() - t0
    _, rows = read_verdicts(output)
    return {"prefix_reuse": reuse, "seconds": seconds, "agreement": result.agreement.value, "n": result.n,
            "verdicts": [r["verdict"] for r in rows], "margins": [r.get("margin") for r in rows]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--pairs-set", default="fusechat", help="bundled model-pairs file: phi2 or fusechat")
    ap.add_argument("--max-pair-chars", type=int, default=3000)
    ap.add_argument("--output", default=None, help="write the measurements as JSON here")
    args = ap.parse_args(argv)

    import torch

    from cmerl.calibration import load_margin_pairs
    from cmerl.judging import Job, JudgeSpec
    from cmerl.precision import describe_cpu_bf16
    from cmerl.study import machine_info

    header = {**machine_info(), "torch": torch.__version__, "bf16": describe_cpu_bf16(),
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    print(json.dumps(header))
    judge = JudgeSpec(args.judge, dtype=args.dtype).build()
    selected, _ = load_margin_pairs(args.pairs_set, n=args.pairs, max_pair_chars=args.max_pair_chars)
    jobs = [Job(s.pair.instruction, s.pair.output_a, s.pair.output_b) for s in selected]
    lengths = [len(judge.encode_job(j)[0]) for j in jobs]
    judge.next_token_logprobs([judge.encode_job(j)[0] for j in jobs[:2]])  # warm-up, outside every timing

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-judge-prefix-") as workdir:
        for i, reuse in enumerate([False, True, False]):
            runs.append(run(judge, reuse, args.pairs_set, args.pairs, args.max_pair_chars,
                            Path(workdir) / f"verdicts-{i}.jsonl"))
            print(f"[prefix_reuse={reuse}] {runs[-1]['seconds']:.1f}s", flush=True)
            if reuse:
                prefix_tokens = len(judge._prefix[0]) if judge._prefix is not None else 0
    plain = (runs[0]["seconds"] + runs[2]["seconds"]) / 2
    ref = runs[0]
    rows = []
    for r in runs:
        diffs = [abs(a - b) for a, b in zip(r["margins"], ref["margins"]) if a is not None and b is not None]
        same = sum(a == b for a, b in zip(r["verdicts"], ref["verdicts"])) / len(ref["verdicts"])
        rows.append({"prefix_reuse": "on" if r["prefix_reuse"] else "off", "seconds": r["seconds"], "speedup": plain / r["seconds"],
                     "agreement": r["agreement"], "same_verdict": same, "max_margin_diff": max(diffs),
                     "within_bounds": same == 1.0 and max(diffs) <= MAX_MARGIN_DIFF})
    report = {"header": header, "judge": args.judge, "dtype": judge.dtype, "pairs_set": args.pairs_set,
              "pairs": ref["n"], "contexts": 2 * len(jobs), "prefix_tokens": prefix_tokens,
              "mean_context_tokens": sum(lengths) / len(lengths), "bound_max_margin_diff": MAX_MARGIN_DIFF,
              "rows": rows}
    print(f"\nshared prefix: {prefix_tokens} tokens of {report['mean_context_tokens']:.0f} per context on average")
    print_table(f"judge {args.judge} ({judge.dtype}): {ref['n']} {args.pairs_set} pairs, both orders", rows,
                [("prefix reuse", "prefix_reuse"), ("seconds", "seconds"), ("speed-up vs mean plain", "speedup"),
                 ("agreement with GPT-4 Turbo", "agreement"), ("same verdict as plain", "same_verdict"),
                 ("max margin diff, nats", "max_margin_diff"), ("within bounds", "within_bounds")])
    write(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
