"""The typer app object shared by the command modules, and the flag vocabulary they share.

One spelling per concept in every command: ``--input/-i`` a file read, ``--output/-o`` a file written,
``--output-dir/-o`` a folder written, ``--limit`` the first N items, ``--verifier/-v``, ``--model/-m``,
``--dtype`` the dtype of the command's main model and ``--<role>-dtype`` (``--judge-dtype``,
``--verifier-dtype``) that of a model in another role; every judge option starts with ``--judge``
(``tests/test_cli_vocabulary.py`` checks it). Old spellings stay as hidden aliases (:func:`old_spelling`).
"""

import logging
import sys

import typer

from cmerl import __version__

app = typer.Typer(
    name="cmerl",
    help="Label-free RL with Cross-Model Entropy rewards: score, train, generate, judge, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def input_errors(*extra: type[Exception]) -> tuple[type[Exception], ...]:
    """Exceptions that mean the user's input or setup is wrong (a missing file, a model that cannot be
    loaded here, plus ``extra``): commands report them in one line instead of a traceback."""
    # deferred: torch, via cmerl.models (torch-free CLI start)
    from cmerl.models import ModelNotAvailableError

    return (FileNotFoundError, ModelNotAvailableError, *extra)


def _check_dtype(value: str) -> str:
    # deferred: torch, via cmerl.precision (torch-free CLI start)
    from cmerl.precision import check_dtype_name

    try:
        return check_dtype_name(value)
    except ValueError as exc:  # one line, like every other input error (not typer's usage box)
        typer.echo(f"error: --dtype: {exc}", err=True)
        raise typer.Exit(2) from None


def dtype_option(what: str, *names: str):
    """The ``--dtype`` option of every command that loads a model: ``auto`` by default, checked at parse
    time (a bad name is a one-line usage error)."""
    return typer.Option("auto", *names, callback=_check_dtype, help=(
        f"{what} dtype: auto (bfloat16 where the CPU/GPU runs it natively, else float32; the choice is "
        "printed), float32, bfloat16, float16, or int8 (dynamic int8 Linear layers for models that are not "
        "trained, on CPU; see docs/training.md)."))


def old_spelling(flag: str, of: str):
    """A hidden option for ``flag``, the old spelling of ``of`` (kept so existing commands and scripts keep
    working; not shown in ``--help``). Merge it with :func:`either_spelling`."""
    return typer.Option(None, flag, hidden=True, help=f"Old spelling of {of}.")


def either_spelling(new, old, *, new_flag: str, old_flag: str, default=None):
    """The value of an option given as ``new_flag`` or as its old spelling ``old_flag``; both with different
    values is a one-line usage error (exit 2)."""
    if old is None:
        return new
    if new is not None and new != default and new != old:
        typer.echo(f"error: give {new_flag} or its old spelling {old_flag}, not both", err=True)
        raise typer.Exit(2)
    return old


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"cmerl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the cmerl version and exit."),
) -> None:
    """Label-free RL with Cross-Model Entropy rewards."""
    show_library_log()


def show_library_log() -> None:
    """Print the library's one-line notices (``cmerl`` logger, INFO: e.g. which dtype a model loaded in and
    why) on stderr. Library calls stay quiet unless the caller configures logging; commands are not."""
    log = logging.getLogger("cmerl")
    if not any(isinstance(h, _CurrentStderr) for h in log.handlers):
        log.addHandler(_CurrentStderr())
    log.setLevel(logging.INFO)


class _CurrentStderr(logging.Handler):
    """Writes each record's message to whatever ``sys.stderr`` is at that moment (not the stream of the
    first command: test runners swap and close it between invocations)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(record.getMessage() + "\n")
        except (ValueError, OSError):  # a closed or broken stream: drop the notice, never the command
            pass
