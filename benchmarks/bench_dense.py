"""The extra cost of dense (token-level) CME rewards per GRPO step, measured against scalar CME in one run.

Part 1, GRPO steps: the demo configuration (SmolLM2-135M-Instruct policy, Qwen2.5-Coder-0.5B-Instruct
verifier: two different tokenizers, so every completion goes through character-offset alignment), run as
``scalar`` (``dense: false``) and as ``dense`` (``dense: true``, ``advantage_estimator`` position_std) side
by side, the same seed. Timed inside the real trainer: the whole step, the cme verifier pass, and the dense
extras: per-policy-token rewards (policy spans + alignment, inside the reward call) and the (B, T)
advantages (``DenseGRPOTrainer``). Each variant runs ``--steps`` steps; all but the first are averaged.

Part 2, long completions: the same dense post-processing on ``--long`` AlpacaEval reference outputs
(GPT-4 Turbo, ~500 policy tokens each), against the verifier forward that scores them, and the cost of
the offset mapping in rendering (paid by scalar runs too).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dense.py [--steps 3] [--long 16] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
import warnings


def timed(fn, timers: dict, key: str):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            timers[key] += time.perf_counter() - t0
    return wrapper


def grpo_steps(variant: str, steps: int, overrides: list[str]) -> list[dict]:
    from transformers import TrainerCallback

    from cmerl.demo import demo_config
    from cmerl.training import start

    out_dir = tempfile.mkdtemp(prefix=f"bench-dense-{variant}-")
    dense = ["dense=true", "advantage_estimator=position_std"] if variant == "dense" else []
    cfg = demo_config([f"output_dir={out_dir}", f"max_steps={steps}", "save_steps=100000", "log_completions=false",
                       *dense, *overrides])
    session = start(cfg)
    trainer = session.trainer
    keys = ("reward", "token_rewards", "advantages")
    timers = dict.fromkeys(keys, 0.0)
    for r in session.rewards:  # GuardedReward around CrossModelEntropy: time its methods on the instance
        inner = getattr(r, "reward", None)
        if hasattr(inner, "score"):
            inner.score = timed(inner.score, timers, "reward")
            inner.token_rewards = timed(inner.token_rewards, timers, "token_rewards")
    if variant == "dense":
        trainer._local_token_rewards = timed(trainer._local_token_rewards, timers, "advantages")
        trainer._dense_advantages = timed(trainer._dense_advantages, timers, "advantages")
        trainer._log_dense = timed(trainer._log_dense, timers, "advantages")
    rows: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timers.update(dict.fromkeys(keys, 0.0))
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            rows.append({"variant": variant, "step": state.global_step, "total": time.perf_counter() - self.t0,
                         **timers})

    trainer.add_callback(StepTimer())
    trainer.train()
    hist = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    for row, h in zip(rows, hist):
        row["tokens"] = h["completions/mean_length"]
        row["misses"] = h.get("dense/alignment_misses", 0.0)
    return rows


def long_completions(n: int) -> None:
    import json
    from importlib.resources import files

    from cmerl.formatting import RenderConfig, _encode, render_context, render_pair, uses_chat_template
    from cmerl.models import load_tokenizer
    from cmerl.scoring import Verifier
    from cmerl.token_rewards import policy_token_rewards

    data = json.loads((files("cmerl") / "data" / "alpaca_eval_gpt4_1106_preview.json").read_text())[:n]
    prompts, outputs = [d["instruction"] for d in data], [d["output"] for d in data]
    policy_tok = load_tokenizer("smollm2-135m-instruct")
    ids = [list(policy_tok(o, add_special_tokens=False)["input_ids"]) + [policy_tok.eos_token_id] for o in outputs]
    texts = [policy_tok.decode(x, skip_special_tokens=True) for x in ids]
    verifier = Verifier.from_pretrained("qwen2.5-coder-0.5b-instruct", dtype="auto")
    vt, cfg = verifier.tokenizer, RenderConfig()
    t0 = time.perf_counter()
    for p, t in zip(prompts, texts):
        render_pair(vt, p, t, cfg)
    with_offsets = time.perf_counter() - t0
    chat = uses_chat_template(vt, cfg)
    t0 = time.perf_counter()
    for p, t in zip(prompts, texts):
        ctx = render_context(vt, p, cfg)
        _encode(vt, ctx, chat)
        _encode(vt, ctx + t, chat)
    without = time.perf_counter() - t0
    verifier.score(prompts[:2], texts[:2])  # warm-up
    t0 = time.perf_counter()
    scores = verifier.score(prompts, texts)
    forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr = policy_token_rewards([scores], texts, ids, policy_tok, scorer_tokenizers=[vt])
    dense = time.perf_counter() - t0
    # Sampled tokenisations are not always the canonical one: split one token per completion into characters.
    odd = []
    for x in ids:
        mid = len(x) // 2
        chars = [t for ch in policy_tok.decode(x[mid:mid + 1]) for t in policy_tok(ch, add_special_tokens=False)["input_ids"]]
        odd.append(x[:mid] + chars + x[mid + 1:])
    odd_texts = [policy_tok.decode(x, skip_special_tokens=True) for x in odd]
    from cmerl.formatting import token_char_spans

    t0 = time.perf_counter()
    for x, t in zip(odd, odd_texts):
        token_char_spans(policy_tok, x, t)
    odd_spans = time.perf_counter() - t0
    t0 = time.perf_counter()
    for x, t in zip(ids, texts):
        token_char_spans(policy_tok, x, t)
    canon_spans = time.perf_counter() - t0
    tokens = sum(len(x) for x in ids)
    print(f"\nlong completions: {n} AlpacaEval reference outputs, {tokens / n:.0f} policy tokens and "
          f"{sum(s.n_tokens for s in scores) / n:.0f} verifier tokens each (SmolLM2 policy, Qwen2.5 verifier "
          f"{verifier.model.dtype}); alignment misses {tr.misses}")
    print("| what | seconds | per completion | vs verifier forward |")
    print("|---|---|---|---|")
    print(f"| verifier scoring (render + forward) | {forward:.2f} | {forward / n * 1e3:.0f} ms | 1.00x |")
    print(f"| dense: policy spans + alignment | {dense:.3f} | {dense / n * 1e3:.1f} ms | {dense / forward:.3f}x |")
    print(f"| policy spans, canonical / non-canonical ids | {canon_spans:.3f} / {odd_spans:.3f} | "
          f"{canon_spans / n * 1e3:.1f} / {odd_spans / n * 1e3:.1f} ms | {odd_spans / forward:.3f}x |")
    print(f"| rendering with offsets vs without | {with_offsets:.3f} vs {without:.3f} | "
          f"{(with_offsets - without) / n * 1e3:+.1f} ms | {(with_offsets - without) / forward:+.3f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps per variant for part 1 (0 = skip)")
    parser.add_argument("--long", type=int, default=16, help="long completions for part 2 (0 = skip)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import torch

    print(f"torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}", flush=True)
    summary = {}
    for variant in ("scalar", "dense") if args.steps else ():
        rows = grpo_steps(variant, args.steps, args.overrides)
        for r in rows:
            print(f"  {variant:6s} step {r['step']}: total {r['total']:.2f}s  verifier pass {r['reward']:.2f}s  "
                  f"token rewards {r['token_rewards'] * 1e3:.1f} ms  advantages {r['advantages'] * 1e3:.1f} ms  "
                  f"({r.get('tokens', float('nan')):.0f} tokens/completion, misses {r.get('misses', 0):.0f})",
                  flush=True)
        kept = rows[1:] or rows
        summary[variant] = {k: statistics.mean(r[k] for r in kept) for k in
                            ("total", "reward", "token_rewards", "advantages", "tokens")}
    if args.steps:
        report_steps(summary)
    if args.long:
        long_completions(args.long)
    sys.stdout.flush()


def report_steps(summary: dict) -> None:
    s, d = summary["scalar"], summary["dense"]
    extra = d["token_rewards"] + d["advantages"]
    print()
    print("| variant | step s | verifier pass s | token rewards ms | (B, T) advantages ms | tokens/completion |")
    print("|---|---|---|---|---|---|")
    for name, r in summary.items():
        print(f"| {name} | {r['total']:.2f} | {r['reward']:.2f} | {r['token_rewards'] * 1e3:.1f} | "
              f"{r['advantages'] * 1e3:.1f} | {r['tokens']:.0f} |")
    print(f"\ndense extras per step: {extra * 1e3:.1f} ms = {extra / d['total']:.2%} of a dense step, "
          f"{extra / d['reward']:.1%} of its verifier pass; dense / scalar step time {d['total'] / s['total']:.2f}x "
          f"(includes sampling noise: different completions)")


if __name__ == "__main__":
    main()
