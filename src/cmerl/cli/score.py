"""``cmerl score``: add verifier scores to a file of (prompt, response) rows (:mod:`cmerl.score_rows`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from cmerl.cli.app import app, dtype_option, input_errors
from cmerl.score_rows import NoUsableRowsError, ScoreFileError, score_file


@app.command()
def score(
    verifier: str = typer.Option(..., "--verifier", "-v", help="Model name: packaged alias, HF folder, .gguf, hub id."),
    input: Path = typer.Option(..., "--input", "-i", help="JSONL or JSON rows with prompt/response (or instruction/output)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the rows plus scores (.jsonl or .json); rerun to resume."),
    dtype: str = dtype_option("Verifier weights"),
    entropy: bool = typer.Option(False, help="Also compute the verifier's mean entropy at response positions."),
    tokens: bool = typer.Option(False, help="Include per-token log-probs in the output."),
    batch_tokens: int = typer.Option(4096, help="Token budget of one forward batch."),
) -> None:
    """Score (prompt, response) rows with a verifier: CME (mean log-prob), sum, token count, truncation.

    Scored rows are appended to the output (or a partial file beside a .json output) every few hundred
    rows, so an interrupted run keeps them and a rerun with the same arguments scores only the rest."""
    console = Console(stderr=True, soft_wrap=True)  # no line breaks inside paths
    try:
        result = score_file(
            input, output, verifier, dtype=dtype, entropy=entropy, tokens=tokens, batch_tokens=batch_tokens,
            on_skip=lambda b: console.print(f"[yellow]{escape(str(input))}: skipped line {b.line}: "
                                            f"{escape(b.reason)}[/yellow]"),
            on_resume=lambda done, total, where: console.print(
                f"resuming: {done} of {total} rows already scored in {escape(str(where))}"))
    except ScoreFileError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1 if isinstance(exc, NoUsableRowsError) else 2) from None
    except input_errors(ValueError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    console.print(f"scored {len(result.rows)} rows ({len(result.skipped)} skipped) in {result.seconds:.1f}s; "
                  f"mean CME {result.mean_cme:.4f}; wrote {output}")
