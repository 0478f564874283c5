"""The typer app object shared by the command modules."""

import typer

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
    from cmerl.models import ModelNotAvailableError

    return (FileNotFoundError, ModelNotAvailableError, *extra)


def _print_version(value: bool) -> None:
    if value:
        from cmerl import __version__

        typer.echo(f"cmerl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the cmerl version and exit."),
) -> None:
    """Label-free RL with Cross-Model Entropy rewards."""
