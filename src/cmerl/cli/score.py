"""``cmerl score``: add verifier scores to a file of (prompt, response) rows."""

from __future__ import annotations

from pathlib import Path

import typer

from cmerl.cli.app import app
from cmerl.formatting import as_messages


def extract_pair(row: object) -> tuple[object, str]:
    """(prompt, response) of a row with prompt/response or AlpacaEval instruction/output fields."""
    if not isinstance(row, dict):
        raise ValueError(f"row is not a JSON object (got {type(row).__name__})")
    prompt = row.get("prompt", row.get("instruction"))
    response = row.get("response", row.get("output", row.get("completion")))
    if prompt is None:
        raise ValueError("missing field 'prompt' (or 'instruction')")
    if response is None:
        raise ValueError("missing field 'response' (or 'output')")
    if not isinstance(prompt, (str, list)):
        raise ValueError(f"'prompt' must be a string or a message list (got {type(prompt).__name__})")
    if isinstance(prompt, list):
        try:
            as_messages(prompt)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"'prompt': {exc}") from None
    if not isinstance(response, str):
        raise ValueError(f"'response' must be a string (got {type(response).__name__})")
    return prompt, response


@app.command()
def score(
    verifier: str = typer.Option(..., "--verifier", "-v", help="Model name: packaged alias, HF folder, .gguf, hub id."),
    input: Path = typer.Option(..., "--input", "-i", help="JSONL or JSON rows with prompt/response (or instruction/output)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the rows plus scores (.jsonl or .json)."),
    dtype: str = typer.Option("bfloat16", help="Verifier weights dtype: bfloat16 or float32."),
    entropy: bool = typer.Option(False, help="Also compute the verifier's mean entropy at response positions."),
    tokens: bool = typer.Option(False, help="Include per-token log-probs in the output."),
    batch_tokens: int = typer.Option(4096, help="Token budget of one forward batch."),
) -> None:
    """Score (prompt, response) rows with a verifier: CME (mean log-prob), sum, token count, truncation."""
    from rich.console import Console
    from rich.markup import escape

    from cmerl.io import BadRow, read_records, write_records
    from cmerl.models import ModelNotAvailableError
    from cmerl.scoring import Verifier

    console = Console(stderr=True)
    try:
        rows, bad = read_records(input)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    good, pairs = [], []
    for line, row in rows:
        try:
            pairs.append(extract_pair(row))
            good.append((line, row))
        except ValueError as exc:
            bad.append(BadRow(line, str(exc)))
    for b in sorted(bad, key=lambda b: b.line):
        console.print(f"[yellow]skipped line {b.line}: {escape(b.reason)}[/yellow]")
    if not pairs:
        console.print(f"[red]no usable rows in {input}[/red]")
        raise typer.Exit(1)
    try:
        v = Verifier.from_pretrained(verifier, dtype=dtype, max_batch_tokens=batch_tokens)
    except (FileNotFoundError, ValueError, ModelNotAvailableError) as exc:
        console.print(f"[red]cannot load verifier {escape(repr(verifier))}: {escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    scores = v.score([p for p, _ in pairs], [r for _, r in pairs], entropy=entropy, progress=True)
    out = []
    for (line, row), s in zip(good, scores):
        row = dict(row)
        row.update({"cme": s.mean_logprob, "sum_logprob": s.sum_logprob, "n_tokens": s.n_tokens,
                    "truncated": s.truncated, "verifier": verifier})
        if entropy:
            row["mean_entropy"] = s.mean_entropy
        if tokens:
            row["token_logprobs"] = s.token_logprobs
        out.append(row)
    write_records(output, out)
    mean = sum(r["cme"] for r in out) / len(out)
    console.print(f"scored {len(out)} rows ({len(bad)} skipped) in {v.last_seconds:.1f}s; "
                  f"mean CME {mean:.4f}; wrote {output}")

