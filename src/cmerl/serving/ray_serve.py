"""The reward service on Ray Serve: N replicas of the same app, each loading the verifier once.

Every replica runs :func:`cmerl.serving.app.create_app` (its own dynamic batcher and metrics); Ray
Serve's HTTP proxy spreads requests over the replicas. On a multi-node cluster, start Ray on every node
(``ray start --head`` on one, ``ray start --address=HEAD:6379`` on the others), then run
``cmerl serve --ray --ray-address auto --replicas N --replica-gpus 1`` on the head: each replica gets
its own GPU wherever Ray places it, and the proxy listens on ``--host/--port`` of the head (start the
proxy on every node with ``--ray-proxy-every-node`` and put a load balancer in front).
"""

from __future__ import annotations

import os
import signal
import threading

import ray
from ray import serve

from cmerl.serving.app import ServerConfig, create_app
from cmerl.serving.run import VerifierSpec


@serve.ingress()
class CmeReplica:
    """One replica: loads the verifier at start-up and serves the cmerl app around it."""

    def __init__(self, spec: VerifierSpec, config: ServerConfig):
        self.verifier = spec.load()
        self.config = ServerConfig(**{**config.__dict__,
                                      "extra_health": {**config.extra_health, "replica_pid": os.getpid()}})

    def __serve_build_asgi_app__(self):
        return create_app(self.verifier, self.config)


def build_application(spec: VerifierSpec, config: ServerConfig, *, replicas: int = 1, replica_cpus: float = 1.0,
                      replica_gpus: float = 0.0, max_ongoing_requests: int = 256):
    """A bound Ray Serve application of ``replicas`` copies of the service."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1 (got {replicas})")
    deployment = serve.deployment(
        CmeReplica, name="cmerl", num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        graceful_shutdown_timeout_s=config.shutdown_timeout_s)
    return deployment.bind(spec, config)


def serve_ray(spec: VerifierSpec, config: ServerConfig, *, host: str = "127.0.0.1", port: int = 8000,
              replicas: int = 1, address: str | None = None, replica_cpus: float = 1.0,
              replica_gpus: float = 0.0, proxy_every_node: bool = False, on_ready=None) -> None:
    """Start (or join) Ray, deploy the replicas behind Ray Serve's proxy on host:port, block until a signal."""

    ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location="EveryNode" if proxy_every_node else "HeadOnly",
                    http_options={"host": host, "port": port})
        app = build_application(spec, config, replicas=replicas, replica_cpus=replica_cpus,
                                replica_gpus=replica_gpus)
        serve.run(app, name="cmerl", route_prefix="/", blocking=False)
        if on_ready is not None:
            on_ready()
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
