"""Scoring engine vs a naive reward function, side by side in one run.

64 (prompt, response) pairs from the bundled UltraFeedback sample: 8 prompts x 8 responses (the prompt's
own chosen and rejected answers plus six other rows' answers), each response cut to ``--max-words``
words. Both scorers use the same rendered token ids and the same model object:

* engine: ``Verifier.score_requests`` (length-sorted token-budget batches, output projection on response
  rows only, chunked gather - logsumexp, fp32 head);
* naive (``--against naive``, the default): one sequence at a time,
  ``torch.log_softmax(model(ids).logits.float(), -1)`` over the full vocabulary, gather the response tokens;
* or the engine with one of its optimisations switched off, to measure that optimisation alone:
  ``--against no-share-prefix`` (each response re-runs the prompt) or ``--against no-padding-limit``
  (``max_padding=1.0``: any length may join a batch).

First it prints the machine's bf16 and fp32 GEMM rates (the probe of :mod:`cmerl.precision`) and the dtype
``auto`` picks. Then, per dtype, scored response tokens per second for both scorers, the engine's achieved
FLOP/s as a fraction of the faster GEMM rate, the speed ratio and the largest absolute difference of
the per-pair mean log-probs (and each one's difference from the fp32 naive reference). The scorers
alternate one prompt group (``--per-prompt`` pairs, like one GRPO reward call) at a time, so load from
other processes on a shared machine affects both alike.

    python benchmarks/bench_scoring.py                      # smollm2-135m-instruct: auto, bf16 and fp32
    python benchmarks/bench_scoring.py --verifier qwen2.5-coder-0.5b-instruct --dtypes bfloat16
    python benchmarks/bench_scoring.py --dtypes bfloat16 --against no-share-prefix
"""

from __future__ import annotations

import argparse
import json
import random
import time
from importlib import resources

import torch

from cmerl.precision import PROBE_SHAPE, cpu_bf16_support, gemm_gflops, resolve_dtype
from cmerl.scoring import ScoreRequest, Verifier


def load_pairs(n_prompts: int, per_prompt: int, max_words: int, seed: int) -> tuple[list[str], list[str]]:
    """``n_prompts * per_prompt`` (prompt, response) pairs from the bundled UltraFeedback rows."""
    text = resources.files("cmerl").joinpath("data/ultrafeedback_1000.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = [r for r in rows if len(r["prompt"]) <= 400]  # keep prompts short: the response is what is scored
    rng = random.Random(seed)
    chosen_rows = rng.sample(rows, n_prompts + per_prompt)
    targets, donors = chosen_rows[:n_prompts], chosen_rows[n_prompts:]

    def cut(s: str) -> str:
        return " ".join(s.split(" ")[:max_words])

    prompts, responses = [], []
    for i, row in enumerate(targets):
        answers = [row["chosen"], row["rejected"]]
        answers += [donors[(i + j) % len(donors)]["chosen"] for j in range(per_prompt - 2)]
        for a in answers[:per_prompt]:
            prompts.append(row["prompt"])
            responses.append(cut(a))
    return prompts, responses


def naive_scores(model, requests: list[ScoreRequest]) -> list[float]:
    """The reward function one writes first: full-vocab fp32 log-softmax per sequence."""
    out = []
    with torch.no_grad():
        for r in requests:
            ids = torch.tensor([r.input_ids])
            logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
            target = ids[0, r.response_start:]
            lp = logp[r.response_start - 1:-1].gather(-1, target[:, None]).squeeze(-1)
            out.append(float(lp.clamp_min(-20.0).mean()))
    return out


def forward_flops(model, requests: list[ScoreRequest]) -> float:
    """FLOPs of scoring ``requests`` one by one, counted from the model config: 2 x (parameters outside the
    embeddings and head) x tokens, plus causal attention (QK^T and AV: 2 x layers x len^2 x attention width
    per request), plus the output projection on response positions (2 x hidden x vocab per response token).
    Prefix sharing does less work than this, so the engine's rate can read above what the chips compute."""
    cfg = model.config
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - embed.numel() - (0 if head is embed else head.numel())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    width = cfg.num_attention_heads * head_dim
    flops = 0.0
    for r in requests:
        n = len(r.input_ids)
        flops += 2.0 * body * n + 2.0 * cfg.num_hidden_layers * n * n * width
        flops += 2.0 * head.shape[1] * head.shape[0] * r.n_response_tokens
    return flops


#: ``--against`` choices other than ``naive``: the engine option each one switches off.
ENGINE_VARIANTS = {"no-share-prefix": {"share_prefix": False}, "no-padding-limit": {"max_padding": 1.0}}


def baseline_scorer(against: str, v: Verifier):
    """The scorer the engine is compared with: mean log-prob per request, same model object."""
    if against == "naive":
        return lambda group: naive_scores(v.model, group)
    variant = Verifier(v.model, v.tokenizer, max_batch_tokens=v.max_batch_tokens, **ENGINE_VARIANTS[against])
    return lambda group: [s.mean_logprob for s in variant.score_requests(group)]


def measure(args: argparse.Namespace, dtype: str, prompts: list[str], responses: list[str]) -> tuple:
    """Time the engine and the ``--against`` baseline on all pairs with one verifier dtype; both see the
    same token ids.

    The two scorers alternate group by group (one prompt's responses at a time, the batch a GRPO reward
    call sees), and each group keeps its best of ``args.repeats`` runs, so load from other processes on a
    shared machine hits both alike.
    """
    kwargs = {} if args.max_batch_tokens is None else {"max_batch_tokens": args.max_batch_tokens}
    v = Verifier.from_pretrained(args.verifier, dtype=dtype, **kwargs)
    requests = [v.render(p, r) for p, r in zip(prompts, responses)]
    n_resp = sum(r.n_response_tokens for r in requests)
    n_all = sum(len(r.input_ids) for r in requests)
    baseline = baseline_scorer(args.against, v)
    v.score_requests(requests[:2])  # warm-up (allocations, fp32 head copy, the prefix-sharing self-check)
    baseline(requests[:2])
    t_engine = t_naive = 0.0
    engine_means: list[float] = []
    naive: list[float] = []
    for g in range(0, len(requests), args.per_prompt):
        group = requests[g:g + args.per_prompt]
        best_e = best_n = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            scores = v.score_requests(group)
            best_e = min(best_e, time.perf_counter() - t0)
            t0 = time.perf_counter()
            naive_group = baseline(group)
            best_n = min(best_n, time.perf_counter() - t0)
        t_engine, t_naive = t_engine + best_e, t_naive + best_n
        engine_means += [s.mean_logprob for s in scores]
        naive += naive_group
    diff = max(abs(a - b) for a, b in zip(engine_means, naive))
    flops = forward_flops(v.model, requests)
    return dtype, n_resp, n_all, t_engine, t_naive, diff, engine_means, naive, flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--verifier", default="smollm2-135m-instruct")
    ap.add_argument("--dtypes", default="auto,bfloat16,float32", help="comma-separated: auto, bfloat16, float32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--max-words", type=int, default=120, help="responses are cut to this many words")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="engine token budget (default: engine's)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per group and scorer; the best counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--against", default="naive", choices=["naive", *ENGINE_VARIANTS],
                    help="baseline: the naive reward function, or the engine without one optimisation")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--vs-fp32", action="store_true",
                    help="with --against other than naive: also score once with the naive fp32 function and "
                         "report both scorers' errors against it (one extra untimed pass)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    support = cpu_bf16_support()
    bf16_rate, fp32_rate = gemm_gflops(torch.bfloat16), gemm_gflops(torch.float32)
    peak = max(bf16_rate, fp32_rate)
    print(f"GEMM {PROBE_SHAPE[0]}x{PROBE_SHAPE[1]}->{PROBE_SHAPE[2]}: bf16 {bf16_rate:.1f} GFLOP/s, fp32 "
          f"{fp32_rate:.1f} GFLOP/s (bf16/fp32 {bf16_rate / fp32_rate:.2f}x); oneDNN bf16 query {support.api}; "
          f"auto picks {resolve_dtype('auto')}")
    prompts, responses = load_pairs(args.prompts, args.per_prompt, args.max_words, args.seed)
    print(f"verifier {args.verifier}; {len(prompts)} pairs ({args.prompts} prompts x {args.per_prompt} "
          f"responses, <= {args.max_words} words); engine vs {args.against}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows, fp32_naive = [], None
    if args.vs_fp32 and args.against != "naive":
        ref = Verifier.from_pretrained(args.verifier, dtype="float32")
        fp32_naive = naive_scores(ref.model, [ref.render(p, r) for p, r in zip(prompts, responses)])
        del ref
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        row = measure(args, dtype, prompts, responses)
        dtype, n_resp, _, t_engine, t_naive, diff, _, naive, flops = row
        if dtype == "auto":
            dtype = f"auto={resolve_dtype('auto').name}"
            row = (dtype, *row[1:])
        if dtype in ("float32", "fp32") and args.against == "naive":
            fp32_naive = naive
        rows.append(row)
        print(f"  {dtype}: engine {n_resp / t_engine:8.1f} response tok/s ({t_engine:.2f} s, "
              f"{flops / t_engine / 1e9:.1f} GFLOP/s = {flops / t_engine / 1e9 / peak:.0%} of the faster GEMM)   "
              f"{args.against} {n_resp / t_naive:8.1f} tok/s ({t_naive:.2f} s)   ratio {t_naive / t_engine:.2f}x   "
              f"max |d mean logprob| {diff:.2e}", flush=True)

    def vs32(means: list[float]) -> str:
        """Max / mean absolute difference from the fp32 naive reference."""
        if not fp32_naive:
            return "n/a"
        d = [abs(a - b) for a, b in zip(means, fp32_naive)]
        return f"{max(d):.2e} / {sum(d) / len(d):.2e}"

    b = args.against
    print(f"\n| dtype | response tokens (all tokens) | engine tok/s | engine GFLOP/s (of faster GEMM) | {b} tok/s "
          f"| speed-up | max abs diff of "
          f"mean log-prob, engine vs {b} | engine vs fp32 naive (max / mean) | {b} vs fp32 naive (max / mean) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype, n_resp, n_all, t_e, t_n, diff, means, naive, flops in rows:
        rate = flops / t_e / 1e9
        print(f"| {dtype} | {n_resp} ({n_all}) | {n_resp / t_e:.1f} | {rate:.1f} ({rate / peak:.0%}) | "
              f"{n_resp / t_n:.1f} | {t_n / t_e:.2f}x | "
              f"{diff:.2e} | {vs32(means)} | {vs32(naive)} |")


if __name__ == "__main__":
    main()
