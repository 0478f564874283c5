"""Helpers for the evaluation tests: tiny model folders, outputs files, and a real OpenAI-compatible judge
server process on 127.0.0.1.

The judge server (run this file as a script: ``python _eval_helpers.py --port N [--api-key K]``) is a
stdlib ``ThreadingHTTPServer`` speaking ``POST /v1/completions`` and ``POST /v1/chat/completions`` the way
vLLM / OpenAI do (``choices[0].text`` + ``logprobs.top_logprobs`` for completions; ``choices[0].message``
+ ``logprobs.content[*].top_logprobs`` for chat). It judges by a deterministic rule, so tests can derive
every expected number by hand:

* quality ``q(r)`` = number of times the word ``GOOD`` occurs in a response;
* logits of the choice tokens: ``z_A = 2 q(A) + 0.5`` (a constant position bias toward A), ``z_B = 2 q(B)``,
  and a third token ``" The"`` with logit ``-1``; log-probs are the log-softmax over these three.

So in order ab, ``logprob_A - logprob_B = 2 (q(a) - q(b)) + 0.5``; in order ba it is ``2 (q(b) - q(a)) + 0.5``;
the summed margin for system a is exactly ``4 (q(a) - q(b))`` (the bias cancels).

The ``model`` field picks the behaviour: ``rules`` (log-probs as above when asked, verdict text always),
``rules-text`` (never returns logprobs), ``positional`` (always says A, no logprobs), ``garbage`` (never a
verdict), ``flaky`` (no verdict on the first request for a given prompt, a rules verdict afterwards); any
other model name gets HTTP 404. ``GET /stats`` returns request counts per model; ``GET /health`` is 200.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

from _server_helpers import ChildServer, JSONHandler

SMOLLM = "smollm2-135m-instruct"
CMERL = str(Path(sys.executable).parent / "cmerl")
MODELS = ("rules", "rules-text", "positional", "garbage", "flaky")


# --------------------------------------------------------------------------- the rule
def quality(text: str) -> int:
    return text.count("GOOD")


def rule_logprobs(resp_a: str, resp_b: str) -> dict[str, float]:
    """Log-probs of the tokens " A", " B", " The" for a prompt showing ``resp_a`` first."""
    z = {" A": 2 * quality(resp_a) + 0.5, " B": 2.0 * quality(resp_b), " The": -1.0}
    lse = math.log(sum(math.exp(v) for v in z.values()))
    return {k: v - lse for k, v in z.items()}


def split_responses(text: str) -> tuple[str, str]:
    """The two responses in a prompt rendered from cmerl's packaged judge prompt."""
    a = re.search(r"# Response A\n\n(.*?)\n\n# End of Response A", text, re.DOTALL)
    b = re.search(r"# Response B\n\n(.*?)\n\n# End of Response B", text, re.DOTALL)
    if not a or not b:
        raise ValueError("prompt does not hold '# Response A' / '# Response B' sections")
    return a.group(1), b.group(1)


# --------------------------------------------------------------------------- the server
class _Handler(JSONHandler):
    server_version = "cmerl-test-judge/1"
    stats: ClassVar[dict[str, int]] = {}
    seen: ClassVar[set[str]] = set()
    lock = threading.Lock()
    api_key: str | None = None

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"ok": True})
        elif self.path == "/stats":
            with self.lock:
                self._send(200, dict(self.stats))
        else:
            self._send(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        if self.api_key and self.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._send(401, {"error": "missing or wrong API key"})
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        model = body.get("model")
        if model not in MODELS:
            return self._send(404, {"error": {"message": f"model {model!r} does not exist"}})
        with self.lock:
            self.stats[model] = self.stats.get(model, 0) + 1
            self.stats[self.path] = self.stats.get(self.path, 0) + 1
        if self.path == "/v1/completions":
            return self._completions(model, body)
        if self.path == "/v1/chat/completions":
            return self._chat(model, body)
        self._send(404, {"error": f"no route {self.path}"})

    def _verdict(self, model: str, prompt: str) -> tuple[str | None, dict[str, float]]:
        ra, rb = split_responses(prompt)
        lps = rule_logprobs(ra, rb)
        if model == "garbage":
            return None, lps
        if model == "flaky":
            with self.lock:
                first = prompt not in self.seen
                self.seen.add(prompt)
            if first:
                return None, lps
        if model == "positional":
            return "A", lps
        return ("A" if lps[" A"] >= lps[" B"] else "B"), lps

    def _completions(self, model: str, body: dict) -> None:
        prompt = body["prompt"]
        letter, lps = self._verdict(model, prompt)
        text = f" {letter}" if letter else " I cannot decide"
        choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
        if body.get("logprobs") and model in ("rules", "flaky") and letter:
            k = int(body["logprobs"])
            top = dict(sorted(lps.items(), key=lambda kv: -kv[1])[:k])
            choice["logprobs"] = {"tokens": [text], "token_logprobs": [lps.get(text, -9.0)],
                                  "top_logprobs": [top], "text_offset": [0]}
        self._send(200, {"id": "cmpl-test", "object": "text_completion", "model": model, "choices": [choice]})

    def _chat(self, model: str, body: dict) -> None:
        msgs = body["messages"]
        if [m["role"] for m in msgs] != ["system", "user"]:
            return self._send(400, {"error": "expected system + user messages"})
        letter, lps = self._verdict(model, msgs[1]["content"])
        content = f"The better response is Response {letter}" if letter else "Both responses have merits."
        logprobs = None
        if body.get("logprobs") and model in ("rules", "flaky") and letter:
            k = int(body.get("top_logprobs") or 1)
            pieces = ["The", " better", " response", " is", " Response", f" {letter}"]
            entries = [{"token": t, "logprob": -0.01, "top_logprobs": [{"token": t, "logprob": -0.01}]}
                       for t in pieces[:-1]]
            top = sorted(lps.items(), key=lambda kv: -kv[1])[:k]
            entries.append({"token": f" {letter}", "logprob": lps[f" {letter}"],
                            "top_logprobs": [{"token": t, "logprob": v} for t, v in top]})
            logprobs = {"content": entries}
        self._send(200, {"id": "chat-test", "object": "chat.completion", "model": model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "logprobs": logprobs, "finish_reason": "stop"}]})


def serve(port: int, api_key: str | None = None) -> None:
    _Handler.api_key = api_key
    ThreadingHTTPServer(("127.0.0.1", port), _Handler).serve_forever()


class JudgeServer(ChildServer):
    """The rule-based judge server as a child process on a free 127.0.0.1 port (started on construction)."""

    def __init__(self, api_key: str | None = None):
        super().__init__([sys.executable, __file__, "--port", "{port}", *(["--api-key", api_key] if api_key else [])],
                         ready_timeout=20.0)
        self.base_url = f"{self.url}/v1"
        self.start()

    def stats(self) -> dict[str, int]:
        import httpx

        return httpx.get(f"{self.url}/stats", timeout=5).json()


# --------------------------------------------------------------------------- files and tiny models
def _single_thread():
    """Run tiny models on one intra-op thread: on a shared 2-core machine, OpenMP threads that spin while
    another process holds a core make a (227 x 32) @ (32 x 32) matmul take ~60 ms instead of ~0.1 ms."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


try:
    import pytest

    single_thread = pytest.fixture(_single_thread)
except ImportError:  # running as the server script without pytest
    single_thread = None


def save_tiny_model(folder: Path, *, alias: str = SMOLLM, arch: str = "llama", seed: int = 0) -> Path:
    """An HF folder with a tiny random causal LM and the real tokenizer of ``alias``."""
    from cmerl.models import load_tokenizer
    from cmerl.testing import tiny_for_tokenizer

    tok = load_tokenizer(alias)
    model = tiny_for_tokenizer(tok, arch=arch, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def write_outputs(path: Path, rows: list[tuple[str, str]], generator: str) -> Path:
    """An AlpacaEval-format outputs file from (instruction, output) tuples."""
    data = [{"instruction": i, "output": o, "generator": generator, "dataset": "test"} for i, o in rows]
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--api-key", default=os.environ.get("JUDGE_TEST_KEY"))
    a = ap.parse_args()
    serve(a.port, a.api_key)
