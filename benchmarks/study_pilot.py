"""The study's learning-rate pilot, evaluated on held-out UltraFeedback prompts (never AlpacaEval, never the judge).

Each RUN_DIR is a short `cmerl train` run of one study row's train settings at one learning rate. For each
run's ``final/`` and for the untrained policy, greedy completions of the first ``--n`` held-out prompts of
the run's config (the last ``heldout_prompts`` prompts that fit, never trained on) are generated with the
training system prompt and length, scored by ``--verifier`` (held-out CME, nats/token) and summarised with
:func:`cmerl.metrics.drift_stats`; the training curves add the mean reward of the first and second half of
the steps, mean completion length and distinct-2. Outputs are resumable (``--work``).

    OMP_NUM_THREADS=2 python benchmarks/study_pilot.py runs/study-pilot/lr2e-4 runs/study-pilot/lr8e-4 \\
        runs/study-pilot/lr3.2e-3 --n 16 --output benchmarks/results/study/pilot/pilot.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cmerl.generation import GenerationConfig
from cmerl.io import iter_jsonl, write_json_atomic
from cmerl.study import _generate, heldout_items, heldout_scores
from cmerl.training import read_run_config


def curve_summary(metrics: Path) -> dict:
    rows = list(iter_jsonl(metrics))
    half = len(rows) // 2 or 1

    def mean(key: str, part: list[dict]) -> float | None:
        vals = [r[key] for r in part if isinstance(r.get(key), (int, float))]
        return statistics.fmean(vals) if vals else None

    return {"steps": len(rows), "reward_first_half": mean("reward", rows[:half]),
            "reward_second_half": mean("reward", rows[half:]),
            "length_mean": mean("diagnostics/completion_length_mean", rows),
            "distinct_2_mean": mean("diagnostics/distinct_2", rows),
            "repeated_4gram_mean": mean("diagnostics/repeated_4gram_share", rows)}


#: The rule that picks the learning rate, fixed before the pilot ran (docs/study.md): the largest learning
#: rate whose held-out greedy answers did not degrade against the untrained policy's; else the smallest.
TOLERANCE = {"distinct_2": 0.05, "repeated_4gram_share": 0.05, "cme": 0.05, "chars_ratio": (0.5, 2.0)}


def choose_learning_rate(result: dict) -> tuple[float, list[str]]:
    """Apply the rule to a pilot result; returns the learning rate and one line of reasons per run."""
    base = result["runs"]["base"]
    bd = base["drift"]
    ok, why = [], []
    for name, e in result["runs"].items():
        if name == "base":
            continue
        d = e["drift"]
        fails = []
        if d["distinct_2"] is not None and bd["distinct_2"] is not None and d["distinct_2"] < bd["distinct_2"] - TOLERANCE["distinct_2"]:
            fails.append(f"distinct-2 {d['distinct_2']:.3f} < base {bd['distinct_2']:.3f} - 0.05")
        if d["repeated_4gram_share"] > bd["repeated_4gram_share"] + TOLERANCE["repeated_4gram_share"]:
            fails.append(f"repeated 4-grams {d['repeated_4gram_share']:.3f} > base + 0.05")
        ratio = d["chars_mean"] / bd["chars_mean"] if bd["chars_mean"] else None
        lo, hi = TOLERANCE["chars_ratio"]
        if ratio is not None and not lo <= ratio <= hi:
            fails.append(f"mean length {ratio:.2f}x the base's")
        if e["cme_mean"] is not None and base["cme_mean"] is not None and e["cme_mean"] < base["cme_mean"] - TOLERANCE["cme"]:
            fails.append(f"held-out CME {e['cme_mean']:.3f} < base {base['cme_mean']:.3f} - 0.05")
        why.append(f"{name} (lr {e['learning_rate']}): " + ("; ".join(fails) if fails else "no degradation"))
        if not fails:
            ok.append(e["learning_rate"])
    lrs = [e["learning_rate"] for n, e in result["runs"].items() if n != "base"]
    return (max(ok) if ok else min(lrs)), why


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=16, help="held-out prompts (the first n of the held-out split)")
    ap.add_argument("--verifier", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--work", type=Path, default=Path("runs/study-pilot/heldout"))
    ap.add_argument("--output", type=Path, default=Path("benchmarks/results/study/pilot/pilot.json"))
    args = ap.parse_args()
    cfgs = {run.name: read_run_config(run) for run in args.runs}
    first = next(iter(cfgs.values()))
    items = heldout_items(first)[:args.n]
    for name, cfg in cfgs.items():
        if [i.instruction for i in heldout_items(cfg)[:args.n]] != [i.instruction for i in items]:
            raise SystemExit(f"{name} has another held-out split than {args.runs[0]}")
    gen = GenerationConfig(max_new_tokens=first.max_completion_length, system_prompt=first.system_prompt)
    files = {"base": args.work / "base.json"}
    print(f"[pilot] {len(items)} held-out prompts; base {first.policy}")
    _generate(first.policy, items, files["base"], gen, generator=first.policy, stop_after=None, progress=True)
    for run in args.runs:
        files[run.name] = args.work / f"{run.name}.json"
        print(f"[pilot] {run.name}: greedy held-out completions of {run / 'final'}")
        _generate(str(run / "final"), items, files[run.name], gen, generator=run.name, stop_after=None, progress=True)
    scores = heldout_scores(args.verifier, files, print_status=print)
    base_out = [r["output"] for r in json.loads(files["base"].read_text())]
    result = {"n": len(items), "verifier": args.verifier, "generation": gen.to_dict(), "runs": {}}
    for name, s in scores["systems"].items():
        outs = [r["output"] for r in json.loads(files[name].read_text())]
        entry = {k: v for k, v in s.items() if k != "cme"}
        entry["changed_vs_base"] = sum(a != b for a, b in zip(outs, base_out))
        if name != "base":
            entry["learning_rate"] = cfgs[name].learning_rate
            entry["curves"] = curve_summary(Path(cfgs[name].output_dir) / "metrics.jsonl")
        result["runs"][name] = entry
    lr, why = choose_learning_rate(result)
    result["chosen_learning_rate"], result["rule"], result["reasons"] = lr, TOLERANCE, why
    result["chosen_run"] = next(n for n, e in result["runs"].items() if e.get("learning_rate") == lr)
    write_json_atomic(args.output, result)
    print("| run | lr | held-out CME | changed outputs | chars mean | distinct-2 | rep-4gram | train reward 1st / 2nd half |")
    print("|---|---|---|---|---|---|---|---|")
    for name, e in result["runs"].items():
        d, c = e["drift"], e.get("curves") or {}
        fmt = lambda x, f="{:.3f}": "n/a" if x is None else f.format(x)
        print(f"| {name} | {e.get('learning_rate', '-')} | {fmt(e['cme_mean'])} | {e['changed_vs_base']}/{e['n']} | "
              f"{fmt(d['chars_mean'], '{:.0f}')} | {fmt(d['distinct_2'])} | {fmt(d['repeated_4gram_share'])} | "
              f"{fmt(c.get('reward_first_half'))} / {fmt(c.get('reward_second_half'))} |")
    print("\n".join(why))
    print(f"chosen learning rate: {lr}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
