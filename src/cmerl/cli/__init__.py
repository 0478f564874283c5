"""The ``cmerl`` command line: one typer app; each command lives in a submodule and is a thin call."""

from cmerl.cli import score as _score  # noqa: F401  (registers commands)
from cmerl.cli.app import app

for _mod in ("train", "evaluate", "serve", "study", "maths"):
    try:
        __import__(f"cmerl.cli.{_mod}")
    except ModuleNotFoundError as _exc:  # a command group not written yet
        if _exc.name != f"cmerl.cli.{_mod}":
            raise

__all__ = ["app"]
