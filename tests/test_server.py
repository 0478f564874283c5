"""The reward service over a real process: /score, /v1/completions, /get_reward, /metrics, and a load test."""

from __future__ import annotations

import asyncio
import re
import statistics
import time

import httpx
import pytest
from _server_helpers import PAIRS, ServerProcess, tiny_args, torch_threads

from cmerl.scoring.remote import RemoteVerifier
from cmerl.scoring.types import ScoreRequest

pytest_plugins = ["_server_fixtures"]  # tiny_verifier_dir, tiny_local, tiny_server fixtures


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


# ---------------------------------------------------------------------------------------------- /score
def test_score_route_text_and_token_items(tiny_server, tiny_local):
    local = tiny_local.score([p for p, _ in PAIRS], [r for _, r in PAIRS], entropy=True)
    reqs = [tiny_local.render(p, r) for p, r in PAIRS]
    items = [{"prompt": p, "response": r} for p, r in PAIRS]
    items += [{"input_ids": q.input_ids, "response_start": q.response_start} for q in reqs]
    r = httpx.post(f"{tiny_server.url}/score", json={"items": items, "entropy": True, "tokens": True}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == str(tiny_server.args[1]) and body["usage"]["items"] == 2 * len(PAIRS)
    assert len(body["scores"]) == len(items) == 2 * len(local)
    for got, want in zip(body["scores"], local + local):
        assert got["n_tokens"] == want.n_tokens
        assert got["mean_logprob"] == pytest.approx(want.mean_logprob, abs=1e-4)
        assert got["mean_entropy"] == pytest.approx(want.mean_entropy, abs=1e-4)
        assert got["token_logprobs"] == pytest.approx(want.token_logprobs, abs=1e-4)
    r = httpx.post(f"{tiny_server.url}/score", json={"items": items[:2]}, timeout=60)
    assert "token_logprobs" not in r.json()["scores"][0] and "mean_entropy" not in r.json()["scores"][0]


# ---------------------------------------------------------------------------------------------- /v1/completions
@pytest.mark.parametrize("k", [0, 1, 5])
def test_completions_prompt_logprobs_match_vllm_layout(k, tiny_server, tiny_local):
    """Every position's actual token and top-k (ids, log-probs, ranks) equal the local engine's."""
    reqs = [tiny_local.render(p, r) for p, r in PAIRS[:3]]
    greedy = reqs[0].input_ids[:8]  # + 4 tokens that are the local top-1: actual tokens inside the top-k
    for _ in range(4):
        greedy.append(tiny_local.score_requests([ScoreRequest(greedy + [0], len(greedy))],
                                                top_k=1)[0].extra["top_logprobs"][0][0][0])
    reqs.append(ScoreRequest(greedy, 1))
    full = tiny_local.score_requests([ScoreRequest(q.input_ids, 1) for q in reqs],  # every position but 0
                                     top_k=k)
    payload = {"prompt": [q.input_ids for q in reqs], "max_tokens": 1, "prompt_logprobs": k, "temperature": 1.0}
    r = httpx.post(f"{tiny_server.url}/v1/completions", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and len(body["choices"]) == len(reqs)
    assert body["usage"]["prompt_tokens"] == sum(len(q.input_ids) for q in reqs)
    tok = tiny_local.tokenizer
    assert len(full) == len(reqs)
    for q, want, choice in zip(reqs, full, body["choices"]):
        plp = choice["prompt_logprobs"]
        assert len(plp) == len(q.input_ids) and plp[0] is None
        want_top = want.extra["top_logprobs"] if k else [[] for _ in q.input_ids[1:]]
        assert len(want_top) == len(q.input_ids) - 1
        for pos in range(1, len(q.input_ids)):
            entry = plp[pos]
            actual = entry[str(q.input_ids[pos])]
            assert actual["logprob"] == pytest.approx(want.token_logprobs[pos - 1], abs=1e-4)
            assert actual["decoded_token"] == tok.decode([q.input_ids[pos]])
            ranked = sorted(((int(t), v) for t, v in entry.items() if v["rank"] is not None and v["rank"] <= k),
                            key=lambda tv: tv[1]["rank"])
            want_ids = [t for t, _ in want_top[pos - 1]]
            in_top = q.input_ids[pos] in want_ids
            assert len(entry) == k + (not in_top)  # the top-k, plus the actual token when outside it
            assert [v["rank"] for _, v in ranked] == list(range(1, k + 1))
            assert [t for t, _ in ranked] == want_ids
            assert [v["logprob"] for _, v in ranked] == pytest.approx([lp for _, lp in want_top[pos - 1]], abs=1e-4)
            assert [v["decoded_token"] for _, v in ranked] == [tok.decode([t]) for t in want_ids]
            assert actual["rank"] == (want_ids.index(q.input_ids[pos]) + 1 if in_top else k + 1 if k else None)


def test_completions_text_prompt_and_refusals(tiny_server, tiny_local):
    url = f"{tiny_server.url}/v1/completions"
    text = "Hello there, general Kenobi."
    ids = tiny_local.tokenizer(text)["input_ids"]
    by_text = httpx.post(url, json={"prompt": text, "prompt_logprobs": 0}, timeout=30).json()
    by_ids = httpx.post(url, json={"prompt": ids, "prompt_logprobs": 0}, timeout=30).json()
    assert by_text["choices"][0]["prompt_logprobs"] == by_ids["choices"][0]["prompt_logprobs"]
    cases = [({"prompt": ids}, 400, "prompt_logprobs"),
             ({"prompt": ids, "prompt_logprobs": 1, "stream": True}, 400, "stream"),
             ({"prompt": ids, "prompt_logprobs": 99}, 400, "prompt_logprobs"),
             ({"prompt": ids, "prompt_logprobs": 1, "model": "nope"}, 404, "nope"),
             ({"prompt": [1] * 600, "prompt_logprobs": 1}, 400, "maximum context length"),
             ({"prompt": [1, 2, 10 ** 6], "prompt_logprobs": 1}, 422, "outside the vocabulary"),
             ({"prompt": [], "prompt_logprobs": 1}, 400, "prompt is empty")]
    for payload, status, words in cases:
        r = httpx.post(url, json=payload, timeout=30)
        assert r.status_code == status, (payload, r.text)
        assert words in r.json()["error"]["message"], r.text


def test_models_and_tokenize_routes(tiny_server, tiny_local):
    models = httpx.get(f"{tiny_server.url}/v1/models").json()["data"]
    assert models[0]["id"] == str(tiny_server.args[1]) and models[0]["max_model_len"] == tiny_local.max_length
    r = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": "naïve café", "add_special_tokens": False}).json()
    assert r["tokens"] == tiny_local.tokenizer("naïve café", add_special_tokens=False)["input_ids"]
    assert r["count"] == len(r["tokens"])


# ---------------------------------------------------------------------------------------------- /get_reward
def test_get_reward_openrlhf_protocol(tiny_server, tiny_local):
    """OpenRLHF sends query = prompt + response + EOS; rewards equal the local CME of (prompt, response)."""
    prompts = ["What is 2+2?", "Name a colour.", "Say nothing."]
    responses = ["2 + 2 = 4.", "Blue, like the sky.", ""]
    queries = [p + r + "<|im_end|>" for p, r in zip(prompts, responses)]
    queries[1] += "<|endoftext|>"
    r = httpx.post(f"{tiny_server.url}/get_reward", json={"query": queries, "prompts": prompts,
                                                          "labels": ["", "", ""]}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    want = tiny_local.score(prompts, responses)
    assert body["rewards"] == pytest.approx([s.mean_logprob for s in want], abs=1e-4)
    assert body["scores"] == pytest.approx([min(1.0, 2.718281828 ** s.mean_logprob) for s in want], rel=1e-3)
    assert body["extra_logs"]["cme_response_tokens"] == [float(s.n_tokens) for s in want]
    bad = httpx.post(f"{tiny_server.url}/get_reward", json={"query": ["abc", "xyz"], "prompts": ["abc", "q"],
                                                             "labels": ["", ""]})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "query.1"


# ---------------------------------------------------------------------------------------------- /metrics
def test_metrics_exposition(tiny_server):
    before = metric_values(httpx.get(f"{tiny_server.url}/metrics").text)
    httpx.post(f"{tiny_server.url}/score", json={"items": [{"prompt": "a", "response": "b c d"}] * 3})
    r = httpx.get(f"{tiny_server.url}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    after = metric_values(r.text)
    key = 'cmerl_requests_total{route="/score",status="200"}'
    assert after[key] == before.get(key, 0) + 1
    assert after['cmerl_items_total{route="/score"}'] >= before.get('cmerl_items_total{route="/score"}', 0) + 3
    assert after["cmerl_tokens_total"] > before.get("cmerl_tokens_total", 0)
    for name in ("cmerl_batch_size_items_count", "cmerl_queue_depth_items", "cmerl_inflight_requests",
                 'cmerl_request_latency_seconds_count{route="/score"}',
                 'cmerl_request_latency_seconds_bucket{route="/score",le="+Inf"}'):
        assert name in after, name
    assert re.search(r"# TYPE cmerl_request_latency_seconds histogram", r.text)


# ---------------------------------------------------------------------------------------------- load
N_CLIENTS, PER_CLIENT = 32, 50


def load_pairs(n_clients: int, per_client: int) -> list[tuple[str, str]]:
    return [(f"Client {c}, request {k}: what is {c} times {k}?", f"{c * k}.")
            for c in range(n_clients) for k in range(per_client)]


async def run_load(url: str, tokenizer, pairs: list[tuple[str, str]], n_clients: int, **client_kwargs):
    """``n_clients`` RemoteVerifiers, each sending its share of ``pairs`` one request at a time."""
    per_client = len(pairs) // n_clients
    clients = [RemoteVerifier(url, tokenizer, protocol="cmerl", max_concurrency=1, **client_kwargs)
               for _ in range(n_clients)]
    answers: dict[int, float] = {}
    latencies: list[float] = []

    async def client(c: int) -> None:
        for k in range(per_client):
            i = c * per_client + k
            t0 = time.perf_counter()
            got = await clients[c].ascore([pairs[i][0]], [pairs[i][1]])
            latencies.append(time.perf_counter() - t0)
            assert len(got) == 1 and i not in answers
            answers[i] = got[0].mean_logprob

    for rv in clients:  # connect and check each client before timing
        await rv.ascore(["warm"], ["up"])
    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(n_clients)))
    seconds = time.perf_counter() - t0
    for rv in clients:
        rv.close()
    return answers, latencies, seconds


def summary(latencies: list[float], n: int, seconds: float) -> str:
    q = statistics.quantiles(latencies, n=100)
    return f"{n / seconds:7.1f} req/s, p50 {q[49] * 1000:6.1f} ms, p99 {q[98] * 1000:6.1f} ms, {seconds:5.2f} s"


@pytest.fixture(scope="module")
def unbatched_server(tiny_verifier_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-logs") / "unbatched.log"
    server = ServerProcess(tiny_args(tiny_verifier_dir, "--no-batching"), log=log).start()
    yield server
    server.stop()


@pytest.mark.e2e
def test_load_32_clients_dynamic_batching_vs_off(tiny_server, unbatched_server, tiny_local, capsys):
    """32 clients x 50 requests against each server: every answer right, none lost or duplicated."""
    pairs = load_pairs(N_CLIENTS, PER_CLIENT)
    with torch_threads(1):
        want = [s.mean_logprob for s in tiny_local.score([p for p, _ in pairs], [r for _, r in pairs])]
    assert len({round(w, 6) for w in want}) > 0.99 * len(want)  # distinct answers: a swap would be seen
    lines = []
    for label, server in (("batching on ", tiny_server), ("batching off", unbatched_server)):
        before = metric_values(httpx.get(f"{server.url}/metrics").text)
        answers, latencies, seconds = asyncio.run(run_load(server.url, tiny_local.tokenizer, pairs, N_CLIENTS))
        after = metric_values(httpx.get(f"{server.url}/metrics").text)
        assert sorted(answers) == list(range(len(pairs)))
        for i, w in enumerate(want):
            assert answers[i] == pytest.approx(w, abs=1e-4), i
        batches = after["cmerl_batch_size_items_count"] - before.get("cmerl_batch_size_items_count", 0)
        items = after["cmerl_batch_size_items_sum"] - before.get("cmerl_batch_size_items_sum", 0)
        lines.append(f"{label}: {summary(latencies, len(pairs), seconds)}, mean engine batch {items / batches:5.2f}")
        if server is unbatched_server:
            assert items == batches  # every engine call scored one request
        else:
            assert items / batches > 1.5  # concurrent requests were merged
    with capsys.disabled():
        print("\n[load 32x50] " + "\n[load 32x50] ".join(lines))
