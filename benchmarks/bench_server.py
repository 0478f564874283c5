"""In-process scoring vs the reward service with 1, 8 and 32 concurrent clients, side by side in one run.

The same (prompt, response) pairs (bundled UltraFeedback rows, responses cut to ``--max-words`` words) are
scored four or five ways with the same verifier and dtype:

* in-process, one call: ``Verifier.score`` over all pairs (the engine's best case: it batches them all);
* in-process, one pair per call: what a per-sample reward function (verl) pays without a server;
* service, C clients (C = 1, 8, 32): a ``cmerl serve`` process on 127.0.0.1; each client is a
  ``RemoteVerifier`` sending one pair per request and waiting for the answer before the next, so the
  server only sees C requests at a time and must batch them dynamically.

Prints items/s, p50/p99 request latency, the mean engine batch size the server reported (/metrics), and
every rate as a ratio of the in-process one-call rate; checks every remote score against the in-process one.

    python benchmarks/bench_server.py --threads 1                  # smollm2-135m-instruct, bf16, CPU
    python benchmarks/bench_server.py --verifier qwen2.5-coder-0.5b-instruct --n-items 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import httpx
import torch

from cmerl.scoring import Verifier
from cmerl.scoring.remote import RemoteVerifier


def load_pairs(n: int, max_words: int, seed: int) -> tuple[list[str], list[str]]:
    text = resources.files("cmerl").joinpath("data/ultrafeedback_1000.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = [r for r in rows if len(r["prompt"]) <= 400]
    picked = random.Random(seed).sample(rows, n)
    return [r["prompt"] for r in picked], [" ".join(r["chosen"].split(" ")[:max_words]) for r in picked]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


async def run_clients(url: str, tokenizer, prompts: list[str], responses: list[str], n_clients: int):
    """``n_clients`` RemoteVerifiers, each sending one pair per request, pairs dealt round-robin."""
    clients = [RemoteVerifier(url, tokenizer, protocol="cmerl", max_concurrency=1, timeout=600)
               for _ in range(n_clients)]
    for rv in clients:
        await rv.ascore(["warm"], ["up"])
    answers: dict[int, float] = {}
    latencies: list[float] = []

    async def client(c: int) -> None:
        for i in range(c, len(prompts), n_clients):
            t0 = time.perf_counter()
            answers[i] = (await clients[c].ascore([prompts[i]], [responses[i]]))[0].mean_logprob
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(n_clients)))
    seconds = time.perf_counter() - t0
    for rv in clients:
        rv.close()
    return answers, latencies, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--verifier", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu", help="torch device of both the in-process and the served verifier")
    ap.add_argument("--n-items", type=int, default=192)
    ap.add_argument("--max-words", type=int, default=48)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, in-process and in the server")
    ap.add_argument("--per-item", type=int, default=32, help="pairs scored one per call in-process (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts, responses = load_pairs(args.n_items, args.max_words, args.seed)
    n = len(prompts)

    verifier = Verifier.from_pretrained(args.verifier, dtype=args.dtype, device=args.device)
    verifier.score(prompts[:4], responses[:4])  # warm-up
    t0 = time.perf_counter()
    local = verifier.score(prompts, responses)
    batch_rate = n / (time.perf_counter() - t0)
    tokens = sum(s.n_tokens for s in local)
    rows = [("in-process, one call", batch_rate, None, None, None)]
    if args.per_item:
        k = min(args.per_item, n)
        t0 = time.perf_counter()
        for p, r in zip(prompts[:k], responses[:k]):
            verifier.score([p], [r])
        rows.append(("in-process, 1 pair per call", k / (time.perf_counter() - t0), None, None, None))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "cmerl"), "serve", "--verifier", args.verifier, "--dtype", args.dtype,
           "--device", args.device, "--port", str(port)] + (["--threads", str(args.threads)] if args.threads else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"cmerl serve exited: {server.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("cmerl serve did not start in 300 s")
            time.sleep(0.5)
        worst, diffs = 0.0, []
        for c in [int(x) for x in args.clients.split(",")]:
            before = metrics(url)
            answers, lat, seconds = asyncio.run(run_clients(url, verifier.tokenizer, prompts, responses, c))
            after = metrics(url)
            batches = after["cmerl_batch_size_items_count"] - before.get("cmerl_batch_size_items_count", 0)
            items = after["cmerl_batch_size_items_sum"] - before.get("cmerl_batch_size_items_sum", 0)
            diffs += [abs(answers[i] - local[i].mean_logprob) for i in range(n)]
            worst = max(diffs)
            q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
            rows.append((f"service, {c} client{'s' if c > 1 else ''}", n / seconds, q[49], q[98], items / batches))
        t0 = time.perf_counter()  # the machine may be shared: measure the reference again at the end
        verifier.score(prompts, responses)
        rows.append(("in-process, one call (again)", n / (time.perf_counter() - t0), None, None, None))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

    print(f"\nverifier {args.verifier} ({args.dtype}), {n} pairs, {tokens} scored response tokens, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print(f"{'mode':30s} {'items/s':>9s} {'x one call':>10s} {'p50 ms':>8s} {'p99 ms':>8s} {'engine batch':>12s}")
    for name, rate, p50, p99, batch in rows:
        cells = [f"{p50 * 1000:8.1f}" if p50 is not None else f"{'':8s}",
                 f"{p99 * 1000:8.1f}" if p99 is not None else f"{'':8s}",
                 f"{batch:12.2f}" if batch is not None else f"{'':12s}"]
        print(f"{name:30s} {rate:9.2f} {rate / batch_rate:10.2f} " + " ".join(cells))
    print(f"|remote - in-process| mean log-prob: largest {worst:.2e}, mean {statistics.fmean(diffs):.2e} "
          "(bf16 results depend on how pairs are batched; fp32 agrees to ~1e-6)")


if __name__ == "__main__":
    main()
