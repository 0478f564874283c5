"""Bad input to the reward service and to ``cmerl serve`` / ``cmerl winrate`` gets a clear refusal.

The service (a real ``cmerl serve`` on 127.0.0.1): non-finite numbers, out-of-range floats and absurd
nesting are 400/422 in the documented error format and leave the keep-alive connection usable; unknown
routes and methods answer in that format too; ``/v1/completions`` treats every empty prompt alike and
refuses a negative ``max_tokens``. The commands: every bad flag is one line, no traceback; the "ready"
line only comes once the port listens; a busy port is one line.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import time

import httpx
import pytest
from _reliability import record
from _server_helpers import CMERL, tiny_args
from typer.testing import CliRunner

from cmerl.cli import app

pytest_plugins = ["_server_fixtures"]

GOOD = {"items": [{"prompt": "Hi", "response": "Hello."}]}


def _error(body: bytes) -> dict:
    """The documented error object of an answer (asserts its shape)."""
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    return err


# Raw bodies (not what a JSON library would write): NaN / Infinity literals, 1e400, floats out of bounds.
BAD_FLOATS = [
    ('{"items": [{"prompt": "Hi", "response": "Hello."}], "logprob_floor": NaN}', 400, "NaN"),
    ('{"items": [{"prompt": "Hi", "response": "Hello."}], "logprob_floor": 1e400}', 400, "out of range"),
    ('{"items": [{"prompt": "Hi", "response": "Hello."}], "logprob_floor": -1e400}', 400, "out of range"),
    ('{"items": [{"prompt": "Hi", "response": "Hello."}], "empty_score": Infinity}', 400, "Infinity"),
    ('{"items": [{"prompt": "Hi", "response": "Hello."}], "empty_score": -Infinity}', 400, "Infinity"),
    ('{"items": [{"prompt": "Hi", "response": "Hello."}], "logprob_floor": 5}', 422, "logprob_floor"),
    ('{"items": [{"prompt": "Hi", "response": "Hello."}], "logprob_floor": -1e300}', 422, "logprob_floor"),
    ('{"items": [{"prompt": "Hi", "response": "Hello."}], "empty_score": 1e300}', 422, "empty_score"),
    ('{"query": ["Hi Hello."], "prompts": ["Hi"], "labels": [NaN]}', 400, "NaN"),
]


def test_bad_floats_are_refused_and_the_connection_stays_usable(tiny_server):
    host, port = "127.0.0.1", tiny_server.port
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.connect()
    sock = conn.sock
    for body, status, words in BAD_FLOATS:
        path = "/get_reward" if body.startswith('{"query"') else "/score"
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        assert r.status == status, (body, raw)
        assert words in _error(raw)["message"], raw
        assert r.getheader("connection", "").lower() != "close"
        conn.request("POST", "/score", body=json.dumps(GOOD), headers={"Content-Type": "application/json"})
        ok = conn.getresponse()
        assert ok.status == 200 and json.loads(ok.read())["scores"][0]["n_tokens"] > 0
        assert conn.sock is sock  # the same keep-alive connection served both requests
    conn.close()
    record("reward service (hand-written)", "POST /score, /get_reward: non-finite and out-of-range floats",
           len(BAD_FLOATS))


def test_deep_nesting_is_a_400(tiny_server):
    deep = '{"items": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = httpx.post(f"{tiny_server.url}/score", content=deep, timeout=30)
    assert r.status_code == 400 and "nested too deeply" in _error(r.content)["message"]
    labels = "[" * 500 + "1" + "]" * 500  # deep but parseable: a schema error or an answer, never a 5xx
    r = httpx.post(f"{tiny_server.url}/get_reward", content='{"query": ["Hi Hello."], "prompts": ["Hi"], '
                   f'"labels": [{labels}]}}', timeout=30)
    assert r.status_code < 500, r.text
    assert httpx.post(f"{tiny_server.url}/score", json=GOOD, timeout=30).status_code == 200
    record("reward service (hand-written)", "POST /score, /get_reward: nesting 100,000 and 500 deep", 2)


def test_unknown_routes_and_methods_answer_in_the_error_format(tiny_server):
    r = httpx.get(f"{tiny_server.url}/no/such/route", timeout=10)
    assert r.status_code == 404 and _error(r.content)["type"] == "not_found_error"
    r = httpx.get(f"{tiny_server.url}/score", timeout=10)
    assert r.status_code == 405 and _error(r.content)["code"] == 405 and "POST" in r.headers["allow"]
    r = httpx.delete(f"{tiny_server.url}/health", timeout=10)
    assert r.status_code == 405 and _error(r.content)["type"] == "method_not_allowed"
    doc = httpx.get(f"{tiny_server.url}/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1") and "/score" in doc["paths"]
    record("reward service (hand-written)", "unknown routes and methods (404/405)", 3)


@pytest.mark.parametrize("prompt", ["", [], [[]], [""], ["", "Hi"]])
def test_every_empty_prompt_is_the_same_400(tiny_server, prompt):
    r = httpx.post(f"{tiny_server.url}/v1/completions", json={"prompt": prompt, "prompt_logprobs": 0}, timeout=10)
    assert r.status_code == 400 and "empty" in _error(r.content)["message"], r.text


def test_negative_max_tokens_is_refused(tiny_server):
    r = httpx.post(f"{tiny_server.url}/v1/completions", json={"prompt": "Hi there", "prompt_logprobs": 0,
                                                              "max_tokens": -1}, timeout=10)
    assert r.status_code == 422 and _error(r.content)["param"] == "max_tokens"
    r = httpx.post(f"{tiny_server.url}/v1/completions", json={"prompt": "Hi there", "prompt_logprobs": 0,
                                                              "max_tokens": 1}, timeout=10)
    assert r.status_code == 200


# --------------------------------------------------------------------------------------------- cmerl serve
@pytest.mark.parametrize("flags, needle", [
    (["--port", "99999"], "--port must be in 0..65535"),
    (["--port", "-1"], "--port must be in 0..65535"),
    (["--batch-items", "0"], "--batch-items"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
    (["--batch-wait-ms", "nan"], "--batch-wait-ms"),
    (["--threads", "0"], "--threads"),
    (["--max-length", "1"], "--max-length"),
    (["--batch-tokens", "0"], "--batch-tokens"),
    (["--max-items", "0"], "--max-items"),
    (["--max-body-mb", "0"], "--max-body-mb"),
    (["--logprob-floor", "nan"], "--logprob-floor"),
    (["--logprob-floor", "3"], "--logprob-floor"),
    (["--empty-score", "inf"], "--empty-score"),
    (["--prompt-mode", "nope"], "--prompt-mode"),
    (["--replicas", "0", "--ray"], "--replicas"),
    (["--log-level", "loud"], "--log-level"),
    (["--dtype", "float8"], "float8"),
])
def test_serve_flags_are_one_line_errors(tmp_path, flags, needle):
    """Refused before any model loads (the verifier named here does not even exist)."""
    res = CliRunner().invoke(app, ["serve", "--verifier", str(tmp_path / "absent"), *flags])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output and "reward service" not in res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit)
    if flags[0] != "--dtype":  # --dtype is a typer usage error (its own few-line box)
        assert len(res.output.strip().splitlines()) == 1, res.output


def test_busy_port_is_one_line_and_never_announced(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = CliRunner().invoke(app, ["serve", "--verifier", str(tmp_path / "absent"), "--port", str(port)])
    assert res.exit_code == 1 and "already in use" in res.output, res.output
    assert "reward service" not in res.output and "loading verifier" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_ready_line_comes_after_the_socket_listens(tiny_verifier_dir, tmp_path):
    """``--port 0`` binds a free port; the ready line names it, and it answers the moment it is printed."""
    proc = subprocess.Popen([CMERL, "serve", *tiny_args(tiny_verifier_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, lines = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"reward service for .* on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                assert port != 0
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
                break
        else:
            pytest.fail("no ready line")
        assert m, "".join(lines)
    finally:
        proc.terminate()
        proc.wait(60)


# --------------------------------------------------------------------------------------------- winrate
def _verdicts(path, rows: list[str]) -> None:
    header = {"kind": "cmerl.verdicts", "version": 1, "judge": {"name": "j", "settings": {"kind": "local"}},
              "decision": {"threshold": 0.2, "require_consistent": False}, "prompt": {"sha256": "0" * 64},
              "a": {}, "b": {}}
    path.write_text("\n".join([json.dumps(header), *rows]) + "\n")


def test_winrate_bad_n_boot_and_corrupt_lines(tmp_path):
    path = tmp_path / "v.jsonl"
    row = json.dumps({"index": 0, "instruction": "Q", "verdict": "a", "consistent": True})
    _verdicts(path, [row, "{torn json", row.replace('"index": 0', '"index": 1')])
    runner = CliRunner()
    for n_boot in ("0", "-1"):
        res = runner.invoke(app, ["winrate", str(path), "--n-boot", n_boot])
        assert res.exit_code == 1 and f"n_boot must be an integer >= 1 (got {n_boot})" in res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["winrate", str(path), "--n-boot", "100"])
    assert res.exit_code == 0, res.output
    assert "warning: 1 line(s)" in res.output and "line 3: invalid JSON" in res.output
    assert "n=2" in res.output
