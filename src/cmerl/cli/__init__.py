"""The ``cmerl`` command line: one typer app; each command lives in a submodule and is a thin call."""

from cmerl.cli import evaluate, maths, score, serve, study, train  # noqa: F401  (each registers its commands)
from cmerl.cli.app import app

__all__ = ["app"]
