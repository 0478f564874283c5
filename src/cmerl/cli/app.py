"""The typer app object shared by the command modules."""

import typer

app = typer.Typer(
    name="cmerl",
    help="Label-free RL with Cross-Model Entropy rewards: score, train, generate, judge, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main() -> None:
    """Label-free RL with Cross-Model Entropy rewards."""
