"""Scoring a file of (prompt, response) rows with a verifier, resumably (``cmerl score``).

Rows are read from JSONL/JSON (``prompt``/``response``, or AlpacaEval ``instruction``/``output``); each
usable row gets ``cme`` (mean log-prob), ``sum_logprob``, ``n_tokens``, ``truncated`` and ``verifier`` (plus
``mean_entropy`` / ``token_logprobs`` on request). Scored rows are appended to a progress file every
:data:`CHUNK_ROWS` rows, so an interrupted run keeps them and a rerun with the same arguments scores only the
rest; a rerun whose input, verifier or options differ is refused (:mod:`cmerl.fingerprint`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cmerl.fingerprint import Fingerprint, guard_output, model_fingerprint, sha256_file
from cmerl.formatting import as_messages
from cmerl.io import BadRow, append_jsonl, iter_jsonl, read_records, write_records


class ScoreFileError(ValueError):
    """The input or output of a scoring run cannot be used (message names the file and the problem)."""


class NoUsableRowsError(ScoreFileError):
    """The input has no row with a usable prompt and response."""


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
    return Fingerprint("score", inputs={"input": sha256_file(input)},
                       settings={"verifier": verifier, "model": model_fingerprint(verifier), "dtype": dtype,
                                 "entropy": entropy, "tokens": tokens})


def done_rows(output: Path) -> list:
    """Rows an earlier run of this output left: the progress file (complete lines; anything that is not a
    JSON row raises ValueError naming the line), or a finished ``.json`` output when no progress file is
    left."""
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


@dataclass
class ScoreFileResult:
    """What :func:`score_file` did: ``rows`` (all scored rows, in input order), ``resumed`` (how many an earlier
    run had scored), ``skipped`` (unusable input lines) and ``seconds`` (verifier time in this run)."""

    rows: list[dict]
    resumed: int
    skipped: list[BadRow]
    seconds: float

    @property
    def mean_cme(self) -> float:
        return sum(r["cme"] for r in self.rows) / len(self.rows)


def read_pairs(input: Path) -> tuple[list[dict], list[tuple[object, str]], list[BadRow]]:
    """``(rows, pairs, bad)`` of an input file: the usable rows, their (prompt, response) and the lines
    skipped with why (sorted by line). Raises FileNotFoundError / ValueError for an unreadable file."""
    records, bad = read_records(input)
    rows, pairs = [], []
    for line, row in records:
        try:
            pairs.append(extract_pair(row))
            rows.append(row)
        except ValueError as exc:
            bad.append(BadRow(line, str(exc)))
    return rows, pairs, sorted(bad, key=lambda b: b.line)


def score_file(input: str | Path, output: str | Path, verifier: str, *, dtype: str = "auto",
               entropy: bool = False, tokens: bool = False, batch_tokens: int = 4096,
               load_verifier: Callable[[], object] | None = None,
               on_skip: Callable[[BadRow], None] = lambda bad: None,
               on_resume: Callable[[int, int, Path], None] = lambda done, total, where: None) -> ScoreFileResult:
    """Score ``input`` into ``output`` (``.jsonl``, or ``.json`` written at the end) with the verifier
    ``verifier`` (a model name; ``load_verifier`` overrides how it is built), resuming an earlier run.

    Raises :class:`NoUsableRowsError` when no row is usable, :class:`ScoreFileError` when ``output`` (or its progress file) is the
    input, or when ``output`` holds another run's rows; FileNotFoundError / ValueError for unreadable files
    and model names that cannot be loaded. Nothing already on disk is lost on any error."""
    input, output = Path(input), Path(output)
    rows, pairs, bad = read_pairs(input)
    for b in bad:
        on_skip(b)
    if not pairs:
        raise NoUsableRowsError(f"no usable rows in {input}")
    progress = progress_path(output)
    for target in {output, progress}:
        if same_file(target, input):
            raise ScoreFileError(f"refusing to write over the input: --output {output} is "
                                 f"{'' if target == output else 'the progress file of '}--input {input}; "
                                 "choose another --output")
    fingerprint = score_fingerprint(input, verifier, dtype=dtype, entropy=entropy, tokens=tokens)
    done = done_rows(output)
    guard_output(output, fingerprint, has_rows=bool(done) or (output.is_file() and output.stat().st_size > 0))
    required = ("mean_entropy",) * entropy + ("token_logprobs",) * tokens
    out = resume_rows(done, pairs, verifier, progress if progress.is_file() else output, required)
    if out and progress != output and not progress.is_file():
        append_jsonl(progress, out)  # a finished .json being resumed: carry its rows on in the progress file
    resumed = len(out)
    if out:
        on_resume(len(out), len(pairs), progress)
    seconds = 0.0
    if len(out) < len(pairs):
        if load_verifier is None:
            # deferred: torch, via cmerl.scoring.Verifier (torch-free CLI start)
            from cmerl.scoring import Verifier  # torch: only once there is something to score

            try:
                v = Verifier.from_pretrained(verifier, dtype=dtype, max_batch_tokens=batch_tokens)
            except ValueError as exc:
                raise ValueError(f"cannot load verifier {verifier!r}: {exc}") from None
        else:
            v = load_verifier()
        for start in range(len(out), len(pairs), CHUNK_ROWS):
            chunk = range(start, min(start + CHUNK_ROWS, len(pairs)))
            scores = v.score([pairs[k][0] for k in chunk], [pairs[k][1] for k in chunk], entropy=entropy,
                             progress=True)
            seconds += v.last_seconds
            new = []
            for k, s in zip(chunk, scores):
                row = dict(rows[k])
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
    return ScoreFileResult(out, resumed, bad, seconds)
