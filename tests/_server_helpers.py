"""Real ``cmerl serve`` processes for tests: a tiny random verifier saved to a folder, a free port on
127.0.0.1, start / wait for ``/health`` / kill / restart. The fixtures built on these live in
``_server_fixtures.py`` (load them with ``pytest_plugins = ["_server_fixtures"]``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar, Self

import httpx

SMOLLM = "smollm2-135m-instruct"
CMERL = str(Path(sys.executable).parent / "cmerl")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_verifier(folder: Path, *, alias: str = SMOLLM, seed: int = 1) -> Path:
    """An HF folder with a tiny random model (hidden 32, 2 layers) and the real tokenizer of ``alias``."""
    from cmerl.models import load_tokenizer
    from cmerl.testing import tiny_for_tokenizer

    tok = load_tokenizer(alias)
    model = tiny_for_tokenizer(tok, seed=seed)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


class JSONHandler(BaseHTTPRequestHandler):
    """Base of the scripted test servers' handlers: quiet, and ``_send(code, obj)`` writes ``obj`` as a
    JSON answer (plus the class's ``extra_headers``)."""

    extra_headers: ClassVar[dict[str, str]] = {}

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in self.extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class ChildServer:
    """One HTTP server child process on 127.0.0.1 (any command; the one helper every test that starts a
    server uses): start, wait until ``GET {health_path}`` answers 200 (and ``ready_text`` is in its output),
    signal / kill / restart, stop gracefully. Its output goes to ``log`` (shown when it fails)."""

    def __init__(self, cmd: list[str], *, log: Path | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, ready_timeout: float = 120.0, ready_text: str | None = None,
                 health_path: str = "/health"):
        self.port = port or free_port()
        self.cmd = [part.replace("{port}", str(self.port)) for part in cmd]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or Path(tempfile.mkdtemp(prefix="cmerl-test-server-")) / "server.log"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.ready_timeout = ready_timeout
        self.ready_text = ready_text  # also wait for this line in the log (e.g. all Ray replicas up)
        self.health_path = health_path
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Self:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.kill_group()
                raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}{self.health_path}", timeout=2.0).status_code == 200 and (
                        self.ready_text is None or self.ready_text in self.output()):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {self.ready_timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the server (no graceful shutdown) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful shutdown); SIGKILL after ``timeout``. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        return self.proc.returncode

    def kill_group(self) -> None:
        """SIGKILL the server and every process it started (its session: Ray workers included)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def restart(self) -> None:
        self.kill()
        self.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess(ChildServer):
    """One ``cmerl serve`` child process on 127.0.0.1; output goes to ``log`` (shown when it fails)."""

    def __init__(self, args: list[str], *, log: Path, port: int | None = None, env: dict[str, str] | None = None,
                 ready_timeout: float = 120.0, ready_text: str | None = None):
        self.args = list(args)
        super().__init__([CMERL, "serve", *self.args, "--host", "127.0.0.1", "--port", "{port}"], log=log,
                         port=port, env=env, ready_timeout=ready_timeout, ready_text=ready_text)


def tiny_args(folder: Path, *extra: str) -> list[str]:
    """``cmerl serve`` arguments for the tiny verifier: fp32, one torch thread (the test machine is shared,
    and oversubscribed OpenMP threads make each engine call hundreds of times slower)."""
    return ["--verifier", str(folder), "--dtype", "float32", "--threads", "1", *extra]


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch threads (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Pairs that exercise the renderer: string and chat prompts, system turns, unicode, an empty response.
PAIRS: list[tuple[object, str]] = [
    ("What is 2+2?", "2 + 2 = 4."),
    ("Name a colour.", "Blue"),
    ("Translate 'cat' to French.", "chat — le chat 🐱"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}], "Hi!"),
    ([{"role": "user", "content": "Write two lines"}], "line one\nline two\n"),
    ("Empty answer please.", ""),
    ("东京在哪里？", "东京在日本。"),
    ("Tabs\tand spaces", "   leading spaces and trailing   "),
]
