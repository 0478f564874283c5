"""Faults: the server killed mid-load, a full queue, bad requests, authentication, graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import pytest
from _server_helpers import ServerProcess, tiny_args, torch_threads

from cmerl.scoring.remote import RemoteVerifier

pytest_plugins = ["_server_fixtures"]  # tiny_verifier_dir, tiny_local, tiny_server fixtures

API_KEY = "test-key-7f3a"


@pytest.fixture(scope="module")
def restartable_server(tiny_verifier_dir, tmp_path_factory):
    """A server this module may kill, restart and finally shut down (used by the last tests in order)."""
    server = ServerProcess(tiny_args(tiny_verifier_dir), log=tmp_path_factory.mktemp("logs") / "restart.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict_server(tiny_verifier_dir, tmp_path_factory):
    """API key required, 50 KiB bodies, 16 items per request, 8 items of queue, batches of 8."""
    args = tiny_args(tiny_verifier_dir, "--max-body-mb", str(50 / 1024), "--max-items", "16", "--max-queue", "8",
                     "--batch-items", "8")
    server = ServerProcess(args, log=tmp_path_factory.mktemp("logs") / "strict.log", env={"CMERL_API_KEY": API_KEY})
    server.start()
    yield server
    server.stop()


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ok_request(server: ServerProcess) -> None:
    """The server still answers a good request correctly."""
    r = httpx.post(f"{server.url}/score", json={"items": [{"prompt": "hi", "response": "hello"}]}, headers=auth(),
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["scores"][0]["n_tokens"] > 0


# ---------------------------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize("body,status,words", [
    (b'{"items": [{"prompt": "a", "response": "b"}', 400, "malformed JSON"),
    (b'\xff\xfe{"items": []}', 400, "not valid UTF-8"),
    (b'{"items": [{"prompt": "a", "response": 3}]}', 422, "items.0.response"),
    (b'{"items": [{"input_ids": ["x"], "response_start": 1}]}', 422, "items.0.input_ids.0"),
    (b'{"items": [{"input_ids": [1, 2, 3], "response_start": 9}]}', 422, "items.0.response_start"),
    (b'{"items": [{"prompt": [{"role": "user"}], "response": "b"}]}', 422, "items.0.prompt"),
    (b'{"items": "everything"}', 422, "items"),
    (b'{"itemz": []}', 422, "items"),
    (b'{"items": []}', 422, "items is empty"),
    (b'[1, 2, 3]', 422, "body"),
    (b'{"items": [{"prompt": "a", "response": "b"}], "entropy": "yes"}', 422, "entropy"),
])
def test_bad_requests_get_the_right_4xx(strict_server, body, status, words):
    r = httpx.post(f"{strict_server.url}/score", content=body, headers={**auth(), "content-type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    ok_request(strict_server)


def test_size_limits_give_413(strict_server):
    url = f"{strict_server.url}/score"
    big = {"items": [{"prompt": "x" * 60_000, "response": "y"}]}
    r = httpx.post(url, json=big, headers=auth())
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced on the bytes actually received
        yield b'{"items": [{"prompt": "'
        for _ in range(20):
            yield b"z" * 4096
        yield b'", "response": "y"}]}'

    r = httpx.post(url, content=chunks(), headers={**auth(), "content-type": "application/json"})
    assert r.status_code == 413
    many = {"items": [{"prompt": "a", "response": "b"}] * 17}
    r = httpx.post(url, json=many, headers=auth())
    assert r.status_code == 413 and "limit is 16" in r.json()["error"]["message"]
    r = httpx.post(f"{strict_server.url}/get_reward", json={"query": ["ab"] * 17, "prompts": ["a"] * 17},
                   headers=auth())
    assert r.status_code == 413
    ok_request(strict_server)


def test_api_key_on_every_route_but_health(strict_server):
    base = strict_server.url
    assert httpx.get(f"{base}/health").status_code == 200
    for method, path in (("POST", "/score"), ("POST", "/get_reward"), ("POST", "/v1/completions"),
                         ("POST", "/tokenize"), ("GET", "/v1/models"), ("GET", "/metrics")):
        r = httpx.request(method, f"{base}{path}", json={})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        r = httpx.request(method, f"{base}{path}", json={}, headers=auth("wrong"))
        assert r.status_code == 403, path
        r = httpx.request(method, f"{base}{path}", json={}, headers={"Authorization": "Basic abc"})
        assert r.status_code == 401, path
    assert httpx.get(f"{base}/v1/models", headers=auth()).status_code == 200
    ok_request(strict_server)


@pytest.mark.e2e
def test_full_queue_gives_503_and_clients_recover(strict_server, tiny_local):
    """16 concurrent requests of 8 long items against an 8-item queue: some get 503 + Retry-After; clients
    with retries then get every answer, equal to local scores."""
    prompts = [f"Essay {i}: write at length." for i in range(8)]
    responses = [" ".join(f"word{i}-{j}" for j in range(50)) for i in range(8)]
    payload = {"items": [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]}

    async def flood():
        async with httpx.AsyncClient(timeout=120, headers=auth()) as client:
            return await asyncio.gather(*(client.post(f"{strict_server.url}/score", json=payload)
                                          for _ in range(16)))

    answers = asyncio.run(flood())
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1
    for a in answers:
        if a.status_code == 503:
            assert int(a.headers["retry-after"]) >= 1 and "busy" in a.json()["error"]["message"]
    metrics = httpx.get(f"{strict_server.url}/metrics", headers=auth()).text
    assert 'cmerl_rejected_total{reason="queue_full"}' in metrics

    with torch_threads(1):
        want = tiny_local.score(prompts, responses)

    async def clients():
        rvs = [RemoteVerifier(strict_server.url, tiny_local.tokenizer, protocol="cmerl", api_key=API_KEY,
                              max_retries=30, backoff=0.2, max_backoff=2.0) for _ in range(6)]
        try:
            return await asyncio.gather(*(rv.ascore(prompts, responses) for rv in rvs))
        finally:
            for rv in rvs:
                rv.close()

    for got in asyncio.run(clients()):
        assert [g.mean_logprob for g in got] == pytest.approx([w.mean_logprob for w in want], abs=1e-4)
    ok_request(strict_server)


# ---------------------------------------------------------------------------------------------- kill / restart
@pytest.mark.e2e
def test_kill_and_restart_mid_load(restartable_server, tiny_local):
    """16 clients x 25 requests; the server is SIGKILLed a third of the way through and restarted on the same
    port. Clients retry (connection refused / reset) and end with every answer, each equal to the local one."""
    server = restartable_server
    n_clients, per_client = 16, 25
    pairs = [(f"Restart test {c}-{k}: count to {k}.", " ".join(str(j) for j in range(k % 7 + 1)))
             for c in range(n_clients) for k in range(per_client)]
    with torch_threads(1):
        want = [s.mean_logprob for s in tiny_local.score([p for p, _ in pairs], [r for _, r in pairs])]
    answers: dict[int, float] = {}
    done = threading.Event()
    errors: list[BaseException] = []

    async def load():
        rvs = [RemoteVerifier(server.url, tiny_local.tokenizer, protocol="cmerl", max_retries=40, backoff=0.1,
                              max_backoff=1.0, timeout=30) for _ in range(n_clients)]

        async def client(c):
            for k in range(per_client):
                i = c * per_client + k
                answers[i] = (await rvs[c].ascore([pairs[i][0]], [pairs[i][1]]))[0].mean_logprob
                await asyncio.sleep(0.01)

        try:
            await asyncio.gather(*(client(c) for c in range(n_clients)))
        finally:
            for rv in rvs:
                rv.close()

    def run():
        try:
            asyncio.run(load())
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while len(answers) < len(pairs) // 3 and time.monotonic() < deadline and not done.is_set():
        time.sleep(0.02)
    old_pid = httpx.get(f"{server.url}/health").json()["pid"]
    answered_before_kill = len(answers)
    server.kill()
    time.sleep(0.5)
    server.start()
    thread.join(240)
    assert not thread.is_alive() and not errors, errors
    assert answered_before_kill < len(pairs)
    assert httpx.get(f"{server.url}/health").json()["pid"] != old_pid
    assert sorted(answers) == list(range(len(pairs)))
    for i, w in enumerate(want):
        assert answers[i] == pytest.approx(w, abs=1e-4), i


@pytest.mark.e2e
def test_graceful_shutdown_finishes_in_flight_requests(restartable_server, tiny_local):
    """SIGTERM while a slow request is being scored: that request still gets its full answer; then the
    server stops taking connections and exits."""
    server = restartable_server
    server.wait_ready()
    prompts = [f"Long {i}" for i in range(16)]
    responses = [" ".join(f"tok{i}x{j}" for j in range(80)) for i in range(16)]
    result: dict[str, httpx.Response] = {}

    def slow():
        result["r"] = httpx.post(f"{server.url}/score",
                                 json={"items": [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]},
                                 timeout=120)

    thread = threading.Thread(target=slow)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the request is being handled
        metrics = httpx.get(f"{server.url}/metrics").text
        if "cmerl_inflight_requests 2" in metrics:  # the slow request and this scrape
            break
        time.sleep(0.01)
    else:
        pytest.fail("the slow request never showed up as in flight within 30 s")
    assert thread.is_alive() and "r" not in result  # SIGTERM lands while the request is still in flight
    server.signal(signal.SIGTERM)
    thread.join(120)
    assert not thread.is_alive()
    r = result["r"]
    assert r.status_code == 200, r.text
    with torch_threads(1):
        want = tiny_local.score(prompts, responses)
    assert [s["mean_logprob"] for s in r.json()["scores"]] == pytest.approx([w.mean_logprob for w in want], abs=1e-4)
    assert server.proc.wait(60) is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)
