"""``cmerl score``: add verifier scores to a file of (prompt, response) rows."""

from __future__ import annotations

from pathlib import Path

import typer

from cmerl.cli.app import app, dtype_option, input_errors
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


#: Rows scored between two appends to the progress file (what an interruption can cost).
CHUNK_ROWS = 256


def progress_path(output: Path) -> Path:
    """Where scored rows are appended as they finish: the output itself when it is JSONL, else a hidden
    ``.NAME.partial.jsonl`` beside it (turned into the JSON list at the end)."""
    return output if output.suffix == ".jsonl" else output.with_name(f".{output.name}.partial.jsonl")


def score_fingerprint(input: Path, verifier: str, *, dtype: str, entropy: bool, tokens: bool):
    """What a ``cmerl score`` run is made of (:mod:`cmerl.fingerprint`): the input file's content, the
    verifier (name and what its weights are), the dtype setting and the options that add fields."""
    from cmerl.fingerprint import Fingerprint, model_fingerprint, sha256_file

    return Fingerprint("score", inputs={"input": sha256_file(input)},
                       settings={"verifier": verifier, "model": model_fingerprint(verifier), "dtype": dtype,
                                 "entropy": entropy, "tokens": tokens})


def done_rows(output: Path) -> list:
    """Rows an earlier run of this output left: the progress file (complete lines; anything that is not a
    JSON row raises ValueError naming the line), or a finished ``.json`` output when no progress file is
    left."""
    from cmerl.io import iter_jsonl, read_records

    progress = progress_path(output)
    if progress.is_file() or progress == output:
        return list(iter_jsonl(progress, strict=True))
    if output.is_file() and output.stat().st_size > 0:
        rows, bad = read_records(output)
        if bad:
            raise ValueError(f"{output}: line {bad[0].line}: {bad[0].reason}")
        return [row for _, row in rows]
    return []


def resume_rows(done: list, pairs: list[tuple[object, str]], verifier: str, where: Path,
                required: tuple[str, ...] = ()) -> list[dict]:
    """The rows of an earlier run (``done``, from ``where``) to keep: they must be the first rows of this
    input, scored by this verifier with the ``required`` fields, else ValueError naming the first that
    differs."""
    if len(done) > len(pairs):
        raise ValueError(f"{where} already holds {len(done)} scored rows, more than the {len(pairs)} usable "
                         "rows of this input: it belongs to another run; remove it or choose another --output")
    for k, (row, pair) in enumerate(zip(done, pairs)):
        try:
            same = (extract_pair(row) == pair and row.get("verifier") == verifier
                    and all(key in row for key in required))
        except ValueError:
            same = False
        if not same:
            raise ValueError(f"{where} row {k + 1} is not usable row {k + 1} of this input scored by "
                             f"{verifier!r} with these options: it belongs to another run; remove it or choose another "
                             "--output")
    return done


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (also through links); False when either does not exist."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


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
    from rich.console import Console
    from rich.markup import escape

    from cmerl.io import BadRow, append_jsonl, read_records, write_records
    from cmerl.scoring import Verifier

    console = Console(stderr=True, soft_wrap=True)  # no line breaks inside paths
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
        console.print(f"[yellow]{escape(str(input))}: skipped line {b.line}: {escape(b.reason)}[/yellow]")
    if not pairs:
        console.print(f"[red]no usable rows in {input}[/red]")
        raise typer.Exit(1)
    progress = progress_path(output)
    for target in {output, progress}:
        if same_file(target, input):
            console.print(f"[red]refusing to write over the input: --output {escape(str(output))} is "
                          f"{'' if target == output else 'the progress file of '}--input {escape(str(input))}; "
                          "choose another --output[/red]")
            raise typer.Exit(2)
    try:
        from cmerl.fingerprint import guard_output

        fingerprint = score_fingerprint(input, verifier, dtype=dtype, entropy=entropy, tokens=tokens)
        done = done_rows(output)
        guard_output(output, fingerprint, has_rows=bool(done) or (output.is_file() and output.stat().st_size > 0))
        required = ("mean_entropy",) * entropy + ("token_logprobs",) * tokens
        out = resume_rows(done, pairs, verifier, progress if progress.is_file() else output, required)
    except input_errors(ValueError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    if out and progress != output and not progress.is_file():
        append_jsonl(progress, out)  # a finished .json being resumed: carry its rows on in the progress file
    if out:
        console.print(f"resuming: {len(out)} of {len(pairs)} rows already scored in {progress}")
    seconds = 0.0
    if len(out) < len(pairs):
        try:
            v = Verifier.from_pretrained(verifier, dtype=dtype, max_batch_tokens=batch_tokens)
        except input_errors(ValueError) as exc:
            console.print(f"[red]cannot load verifier {escape(repr(verifier))}: {escape(str(exc))}[/red]")
            raise typer.Exit(2) from None
        for start in range(len(out), len(pairs), CHUNK_ROWS):
            chunk = range(start, min(start + CHUNK_ROWS, len(pairs)))
            scores = v.score([pairs[k][0] for k in chunk], [pairs[k][1] for k in chunk], entropy=entropy,
                             progress=True)
            seconds += v.last_seconds
            new = []
            for k, s in zip(chunk, scores):
                row = dict(good[k][1])
                row.update({"cme": s.mean_logprob, "sum_logprob": s.sum_logprob, "n_tokens": s.n_tokens,
                            "truncated": s.truncated, "verifier": verifier})
                if entropy:
                    row["mean_entropy"] = s.mean_entropy
                if tokens:
                    row["token_logprobs"] = s.token_logprobs
                new.append(row)
            append_jsonl(progress, new)
            out.extend(new)
    if progress != output:
        write_records(output, out)
        progress.unlink(missing_ok=True)
    mean = sum(r["cme"] for r in out) / len(out)
    console.print(f"scored {len(out)} rows ({len(bad)} skipped) in {seconds:.1f}s; "
                  f"mean CME {mean:.4f}; wrote {output}")
