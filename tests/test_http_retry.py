"""cmerl's one HTTP retry policy against a real HTTP server on 127.0.0.1 that answers from a script:
503 + Retry-After then 200 is retried after the hinted delay; 400 is returned at once; exhausted retries
name the URL and the last status; the remote verifier and the judge both follow it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import httpx
import pytest
from _server_helpers import free_port

from cmerl.http_retry import (
    RetriesExhaustedError,
    RetryPolicy,
    async_send_with_retries,
    send_with_retries,
)


class ScriptedServer:
    """Answers each request with the next ``(status, headers, body)`` of ``script`` (the last one repeats);
    ``hits`` keeps the ``time.monotonic()`` of every request."""

    def __init__(self, script: list[tuple[int, dict[str, str], dict]]):
        self.script, self.hits = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                outer.hits.append(time.monotonic())
                status, headers, body = outer.script[min(len(outer.hits), len(outer.script)) - 1]
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


BUSY = (503, {"Retry-After": "0.4"}, {"error": {"message": "busy, come back"}})
OK = (200, {}, {"ok": True})
BAD = (400, {}, {"detail": "bad field x"})


def test_503_with_retry_after_then_200_waits_the_hinted_delay():
    policy = RetryPolicy(retries=3, backoff=0.001, max_backoff=5.0)  # backoff alone would not wait 0.4 s
    with ScriptedServer([BUSY, OK]) as server, httpx.Client() as client:
        r = send_with_retries(lambda: client.get(server.url + "/x"), policy, method="GET", url=server.url + "/x")
    assert r.status_code == 200 and r.json() == {"ok": True} and len(server.hits) == 2
    assert server.hits[1] - server.hits[0] >= 0.38


def test_retry_after_is_capped_by_max_backoff():
    policy = RetryPolicy(retries=2, backoff=0.001, max_backoff=0.05)
    with ScriptedServer([(503, {"Retry-After": "120"}, {}), OK]) as server, httpx.Client() as client:
        t0 = time.monotonic()
        r = send_with_retries(lambda: client.get(server.url), policy, method="GET", url=server.url)
    assert r.status_code == 200 and time.monotonic() - t0 < 5


def test_400_is_returned_at_once_not_retried():
    with ScriptedServer([BAD, OK]) as server, httpx.Client() as client:
        r = send_with_retries(lambda: client.post(server.url, json={}), RetryPolicy(retries=5, backoff=2.0),
                              method="POST", url=server.url)
    assert r.status_code == 400 and len(server.hits) == 1


def test_exhausted_retries_name_url_and_status():
    url_path = "/v1/thing"
    with ScriptedServer([BUSY]) as server, httpx.Client() as client, \
            pytest.raises(RetriesExhaustedError) as info:
        send_with_retries(lambda: client.post(server.url + url_path, json={}),
                          RetryPolicy(retries=2, backoff=0.001, max_backoff=0.01), method="POST",
                          url=server.url + url_path)
    err = info.value
    assert len(server.hits) == 3 and err.attempts == 3 and err.status == 503
    assert f"POST {server.url}{url_path} failed after 3 attempts" in str(err)
    assert "HTTP 503: busy, come back" in str(err)


def test_connection_errors_are_retried_then_reported_without_status():
    url = f"http://127.0.0.1:{free_port()}/nothing-listens"
    with httpx.Client() as client, pytest.raises(RetriesExhaustedError) as info:
        send_with_retries(lambda: client.get(url), RetryPolicy(retries=1, backoff=0.01), method="GET", url=url)
    assert info.value.status is None and info.value.attempts == 2 and "ConnectError" in str(info.value)


def test_async_form_follows_the_same_policy():
    async def go(server: ScriptedServer) -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient() as client:
            policy = RetryPolicy(retries=3, backoff=0.001)
            ok = await async_send_with_retries(lambda: client.get(server.url), policy, method="GET", url=server.url)
            bad = await async_send_with_retries(lambda: client.get(server.url), policy, method="GET", url=server.url)
            return ok, bad

    with ScriptedServer([BUSY, OK, BAD]) as server:
        ok, bad = asyncio.run(go(server))
    assert ok.status_code == 200 and bad.status_code == 400 and len(server.hits) == 3
    assert server.hits[1] - server.hits[0] >= 0.38


def test_policy_refuses_negative_settings():
    with pytest.raises(ValueError, match="retries, backoff and max_backoff"):
        RetryPolicy(retries=-1)


def test_remote_verifier_and_judge_use_the_policy():
    """Both clients wait out a 503 + Retry-After and succeed; both give up at once on a 400 with their own
    error naming the status."""
    from cmerl.judging import JudgeConnectionError, OpenAIJudge
    from cmerl.scoring.remote import RemoteScoringError, RemoteVerifier

    health = (200, {}, {"service": "cmerl", "model": "scripted", "max_length": 64, "vocab_size": 100})
    answer = (200, {}, {"scores": [{"token_logprobs": [-1.0, -3.0], "truncated": False}]})
    with ScriptedServer([health, BUSY, answer]) as server, \
            RemoteVerifier(server.url, None, protocol="cmerl", max_retries=2, backoff=0.001) as rv:
        got = rv.score(["p"], ["r"])
        assert got[0].mean_logprob == -2.0 and len(server.hits) == 3
        assert server.hits[2] - server.hits[1] >= 0.38
    with ScriptedServer([health, BAD]) as server, \
            RemoteVerifier(server.url, None, protocol="cmerl", max_retries=5, backoff=2.0) as rv:
        with pytest.raises(RemoteScoringError, match="HTTP 400.*bad field x") as info:
            rv.score(["p"], ["r"])
        assert info.value.status == 400 and len(server.hits) == 2

    chat = (200, {}, {"choices": [{"message": {"content": "Response A"}}]})
    with ScriptedServer([BUSY, chat]) as server:
        judge = OpenAIJudge(server.url, "scripted", retries=2, logprobs=False)
        try:
            assert judge._post("/chat/completions", {"model": "scripted"}) == chat[2]
        finally:
            judge.close()
        assert len(server.hits) == 2 and server.hits[1] - server.hits[0] >= 0.38
    with ScriptedServer([BAD, chat]) as server:
        judge = OpenAIJudge(server.url, "scripted", retries=3)
        try:
            with pytest.raises(JudgeConnectionError, match="answered HTTP 400"):
                judge._post("/chat/completions", {})
        finally:
            judge.close()
        assert len(server.hits) == 1
