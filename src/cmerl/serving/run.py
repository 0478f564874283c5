"""Running the reward service: one uvicorn process, or N replicas on Ray Serve (:mod:`cmerl.serving.ray_serve`)."""

from __future__ import annotations

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

    def load(self):
        """Load the verifier (setting this process's torch CPU threads first when ``threads`` is given)."""
        from cmerl.scoring import Verifier

        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)

        return Verifier.from_pretrained(self.name, dtype=self.dtype, device=self.device, render=self.render,
                                        max_batch_tokens=self.max_batch_tokens, max_length=self.max_length,
                                        **self.extra)


def serve_http(spec: VerifierSpec, config: ServerConfig, *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "warning", on_ready=None) -> None:
    """Load the verifier and serve it with uvicorn until SIGINT/SIGTERM.

    Shutdown is graceful: uvicorn stops accepting connections, waits up to ``config.shutdown_timeout_s``
    for requests in flight, then the batcher finishes what is queued.
    """
    import uvicorn

    verifier = spec.load()
    app = create_app(verifier, config)
    if on_ready is not None:
        on_ready(verifier)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=int(config.shutdown_timeout_s), timeout_keep_alive=30)
