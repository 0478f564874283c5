"""One GRPO step of the demo configuration, broken down into generation, CME scoring and policy update.

Runs the demo config (SmolLM2-135M-Instruct policy, Qwen2.5-Coder-0.5B-Instruct bf16 verifier, bundled
UltraFeedback prompts) through cmerl.training / TRL's GRPOTrainer, timing inside the real trainer:

* generation: ``GRPOTrainer._generate`` (prompt tokenisation + ``model.generate``);
* CME scoring: the reward functions (verifier rendering + forward);
* policy update: the rest of the step (policy log-prob forward, backward, optimizer step).

By default it measures full fine-tuning and LoRA side by side in one run; each variant runs
``--steps`` steps and the last one is reported (the first pays one-off warm-up costs).

    .venv/bin/python benchmarks/bench_grpo_step.py [--steps 2] [--variants full,lora] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
import warnings


def measure(variant: str, steps: int, overrides: list[str]) -> list[dict]:
    from transformers import TrainerCallback

    from cmerl.demo import demo_config
    from cmerl.training import start

    out_dir = tempfile.mkdtemp(prefix=f"bench-grpo-{variant}-")
    cfg = demo_config([f"output_dir={out_dir}", f"max_steps={steps}", "save_steps=100000",
                       f"lora={'true' if variant == 'lora' else 'false'}", "log_completions=false", *overrides])
    session = start(cfg)
    trainer = session.trainer
    timers = {"generation": 0.0, "scoring": 0.0}

    def timed(fn, key):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] += time.perf_counter() - t0
        return wrapper

    trainer._generate = timed(trainer._generate, "generation")
    for r in session.rewards:
        r.reward = timed(r.reward, "scoring")
    rows: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timers.update(generation=0.0, scoring=0.0)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - self.t0
            rows.append({"variant": variant, "step": state.global_step, "total": total, **timers,
                         "update": total - timers["generation"] - timers["scoring"]})

    trainer.add_callback(StepTimer())
    trainer.train()
    hist = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    for row, h in zip(rows, hist):
        row["completion_tokens"] = h["completions/mean_length"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variants", default="full,lora")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import torch

    from cmerl.demo import demo_config

    cfg = demo_config(args.overrides)
    print(f"demo config: policy={cfg.policy} verifier={cfg.verifiers} ({cfg.verifier_dtype}) "
          f"G={cfg.num_generations} batch={cfg.per_device_train_batch_size} "
          f"max_completion_length={cfg.max_completion_length}; torch threads={torch.get_num_threads()}, "
          f"cpus={os.cpu_count()}", flush=True)
    results = []
    for variant in args.variants.split(","):
        rows = measure(variant, args.steps, args.overrides)
        for r in rows:
            print(f"  {variant:4s} step {r['step']}: total {r['total']:.1f}s  generation {r['generation']:.1f}s  "
                  f"scoring {r['scoring']:.1f}s  update {r['update']:.1f}s  "
                  f"({r.get('completion_tokens', float('nan')):.0f} tokens/completion)", flush=True)
        results.append(rows[-1])
    print()
    print("| variant | step s | generation | CME scoring | policy update | tokens/completion |")
    print("|---|---|---|---|---|---|")
    for r in results:
        t = r["total"]
        print(f"| {r['variant']} | {t:.1f} | {r['generation']:.1f} s ({r['generation'] / t:.0%}) | "
              f"{r['scoring']:.1f} s ({r['scoring'] / t:.0%}) | {r['update']:.1f} s ({r['update'] / t:.0%}) | "
              f"{r.get('completion_tokens', float('nan')):.0f} |")
    if len(results) == 2:
        a, b = results
        print(f"\n{b['variant']} / {a['variant']} step time: {b['total'] / a['total']:.2f}x; "
              f"update: {b['update'] / a['update']:.2f}x; generation: {b['generation'] / a['generation']:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
