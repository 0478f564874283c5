"""A real Anthropic Messages API server for tests: stdlib HTTP on 127.0.0.1, run as a child process.

``POST /v1/messages`` checks the key (``x-api-key``, or ``Authorization: Bearer`` as the 2.x client sends
it) and the ``anthropic-version`` header and answers like the
Messages API (``{"type": "message", "content": [{"type": "text", "text": ...}], ...}``; errors as
``{"type": "error", "error": {"type", "message"}}``). It judges by the rule of ``_eval_helpers``
(quality = count of ``GOOD``; the position bias toward A only breaks ties). Models: ``claude-rules``
(says "The better response is Response X"; after an assistant prefill, only " X"), ``claude-garbage``
(never a verdict); any other model is a 404 ``not_found_error``. ``GET /stats`` counts requests per model.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).parent))
from _eval_helpers import quality, split_responses
from _server_helpers import ChildServer, JSONHandler

KEY = "test-anthropic-key"


class _Handler(JSONHandler):
    extra_headers: ClassVar[dict[str, str]] = {"request-id": "req_test"}
    stats: ClassVar[dict[str, int]] = {}
    lock = threading.Lock()

    def _error(self, code: int, kind: str, message: str) -> None:
        self._send(code, {"type": "error", "error": {"type": kind, "message": message}})

    def do_GET(self) -> None:
        if self.path == "/health":
            return self._send(200, {"ok": True})
        if self.path == "/stats":
            with self.lock:
                return self._send(200, dict(self.stats))
        self._error(404, "not_found_error", f"no route {self.path}")

    def do_POST(self) -> None:
        if self.path != "/v1/messages":
            return self._error(404, "not_found_error", f"no route {self.path}")
        if KEY not in (self.headers.get("x-api-key"), (self.headers.get("Authorization") or "").removeprefix("Bearer ")):
            return self._error(401, "authentication_error", "invalid API key")
        if not self.headers.get("anthropic-version"):
            return self._error(400, "invalid_request_error", "anthropic-version header is required")
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        model = body.get("model")
        with self.lock:
            self.stats[model] = self.stats.get(model, 0) + 1
        if model not in ("claude-rules", "claude-garbage"):
            return self._error(404, "not_found_error", f"model: {model}")
        msgs = body.get("messages") or []
        if not isinstance(body.get("system"), str) or not msgs or msgs[0].get("role") != "user" \
                or not isinstance(body.get("max_tokens"), int):
            return self._error(400, "invalid_request_error", "expected system, messages[0] user, max_tokens")
        ra, rb = split_responses(msgs[0]["content"])
        letter = "A" if quality(ra) >= quality(rb) else "B"
        prefilled = len(msgs) > 1 and msgs[-1].get("role") == "assistant"
        if model == "claude-garbage":
            text = "Both responses have their merits."
        else:
            text = f" {letter}" if prefilled else f"The better response is Response {letter}"
        self._send(200, {"id": "msg_test", "type": "message", "role": "assistant", "model": model,
                         "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                         "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 5}})


class AnthropicServer(ChildServer):
    """The server above as a child process on a free port (started on construction); ``base_url`` has no
    ``/v1`` (as the client wants)."""

    def __init__(self):
        super().__init__([sys.executable, __file__, "{port}"], ready_timeout=20.0)
        self.base_url = self.url
        self.start()

    def stats(self) -> dict[str, int]:
        import httpx

        return httpx.get(f"{self.base_url}/stats", timeout=5).json()


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), _Handler).serve_forever()
