"""Running the reward service: one uvicorn process, or N replicas on Ray Serve (:mod:`cmerl.serving.ray_serve`)."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field
from typing import Any

from cmerl.formatting import RenderConfig
from cmerl.serving.app import ServerConfig, create_app


@dataclass(frozen=True)
class VerifierSpec:
    """How to load the served verifier: a model name plus :meth:`Verifier.from_pretrained` arguments.

    Plain data, so it travels to Ray replicas, each of which loads the verifier once.
    """

    name: str
    dtype: str = "auto"
    device: str = "cpu"
    render: RenderConfig = field(default_factory=RenderConfig)
    max_batch_tokens: int = 4096
    max_length: int | None = None
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse settings that cannot serve, before any model is loaded (ValueError naming the value)."""
        # deferred: torch, via cmerl.precision (slow import, loaded only when used)
        from cmerl.precision import check_dtype_name

        check_dtype_name(self.dtype)
        if not isinstance(self.max_batch_tokens, int) or self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be an integer >= 1 (got {self.max_batch_tokens!r})")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens (got {self.max_length})")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (got {self.threads})")

    def load(self):
        """Load the verifier (setting this process's torch CPU threads first when ``threads`` is given)."""
        # deferred: torch, via cmerl.scoring.Verifier (slow import, loaded only when used)
        from cmerl.scoring import Verifier

        if self.threads is not None:
            import torch  # deferred: torch (slow import, loaded only when used)

            torch.set_num_threads(self.threads)

        return Verifier.from_pretrained(self.name, dtype=self.dtype, device=self.device, render=self.render,
                                        max_batch_tokens=self.max_batch_tokens, max_length=self.max_length,
                                        **self.extra)


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class PortUnavailableError(OSError):
    """The address to serve on cannot be bound (in use, not an address of this machine, no permission)."""


def check_port(port: int) -> int:
    """A TCP port number: 0 (any free port, reported once bound) to 65535; ValueError otherwise."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535 (got {port!r}; 0 picks a free port)")
    return port


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound (not yet listening) to ``host:port``; PortUnavailableError naming the address
    when that fails (busy port, unknown host). Connections are refused until the server listens."""
    check_port(port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise PortUnavailableError(f"cannot serve on {host}:{port}: unknown host ({exc})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise PortUnavailableError(f"cannot serve on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def serve_http(spec: VerifierSpec, config: ServerConfig, *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "warning", on_ready=None, on_bound=None) -> None:
    """Bind ``host:port``, load the verifier and serve it with uvicorn until SIGINT/SIGTERM.

    The address is bound before the model loads, so a busy port fails at once (PortUnavailableError);
    ``on_bound()`` is called once it is bound (before loading), ``on_ready(verifier, url)`` is called only once uvicorn listens on it (``url`` carries the bound port,
    which matters for ``port=0``). Shutdown is graceful: uvicorn stops accepting connections, waits up to
    ``config.shutdown_timeout_s`` for requests in flight, then the batcher finishes what is queued.
    """
    import uvicorn  # deferred: uvicorn (server only)

    if log_level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)} (got {log_level!r})")
    sock = bind_socket(host, port)
    try:
        if on_bound is not None:
            on_bound()
        verifier = spec.load()
        app = create_app(verifier, config)
        bound = sock.getsockname()[1]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{bound}"
        server_config = uvicorn.Config(app, log_level=log_level, access_log=False,
                                       timeout_graceful_shutdown=int(config.shutdown_timeout_s),
                                       timeout_keep_alive=30)

        class _Server(uvicorn.Server):
            async def startup(self, sockets=None) -> None:
                await super().startup(sockets=sockets)
                if self.started and not self.should_exit and on_ready is not None:
                    on_ready(verifier, url)

        _Server(server_config).run(sockets=[sock])
    finally:
        sock.close()
