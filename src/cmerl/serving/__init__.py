"""The CME reward service: HTTP app, dynamic batcher, metrics, and runners (uvicorn, Ray Serve)."""

from cmerl.serving.app import ServerConfig, create_app
from cmerl.serving.batcher import DynamicBatcher, Options, QueueFull, ShuttingDown
from cmerl.serving.run import VerifierSpec, serve_http

__all__ = ["DynamicBatcher", "Options", "QueueFull", "ServerConfig", "ShuttingDown", "VerifierSpec", "create_app",
           "serve_http"]
