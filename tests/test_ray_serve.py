"""``cmerl serve --ray --replicas 2`` on a local Ray instance (CPU): both replicas answer, same scores as local."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from _server_helpers import PAIRS, ServerProcess, tiny_args

from cmerl.scoring.remote import RemoteVerifier

pytest_plugins = ["_server_fixtures"]  # tiny_verifier_dir, tiny_local, tiny_server fixtures

pytest.importorskip("ray.serve")


@pytest.mark.e2e
def test_ray_serve_two_replicas_same_scores(tiny_verifier_dir, tiny_local, tmp_path):
    args = tiny_args(tiny_verifier_dir, "--ray", "--replicas", "2", "--ray-address", "local", "--replica-cpus", "0.5")
    server = ServerProcess(args, log=tmp_path / "ray.log", ready_timeout=240, ready_text="2 Ray replicas) on")
    try:
        server.start()
        prompts, responses = [p for p, _ in PAIRS], [r for _, r in PAIRS]
        want = tiny_local.score(prompts, responses)
        for protocol in ("cmerl", "openai"):
            with RemoteVerifier(server.url, tiny_local.tokenizer, protocol=protocol) as rv:
                got = rv.score(prompts, responses)
            assert [g.n_tokens for g in got] == [w.n_tokens for w in want]
            assert [g.mean_logprob for g in got] == pytest.approx([w.mean_logprob for w in want], abs=1e-4)

        async def spread():
            body = {"items": [{"prompt": p, "response": r} for p, r in PAIRS]}
            async with httpx.AsyncClient(timeout=60) as client:
                answers = await asyncio.gather(*(client.post(f"{server.url}/score", json=body) for _ in range(24)))
            assert all(a.status_code == 200 for a in answers)
            first = [s["mean_logprob"] for s in answers[0].json()["scores"]]
            for a in answers:  # every replica gives the same scores
                assert [s["mean_logprob"] for s in a.json()["scores"]] == pytest.approx(first, abs=1e-4)
            return {a.headers["x-cmerl-pid"] for a in answers}

        pids = asyncio.run(spread())
        assert len(pids) == 2, pids  # both replicas answered
        health = httpx.get(f"{server.url}/health").json()
        assert health["service"] == "cmerl" and str(health["replica_pid"]) in pids
    finally:
        rc = server.stop(timeout=90)
    assert rc == 0, server.output()
