"""``cmerl separation``: how well does a verifier's likelihood tell correct maths solutions from wrong ones?

For each problem, the policy samples k solutions; each is graded against the gold answer
(:mod:`cmerl.grading`) and scored by the verifier (and by the policy itself). For every signal the AUROC
of "correct solutions score higher" is reported: above 0.5 means the signal ranks correct solutions
above wrong ones, 0.5 is chance, below 0.5 the reverse. Ties count 1/2. Intervals are percentile
bootstrap intervals that resample whole problems (a problem's k solutions are not independent).

Signals (higher = "more likely correct" under the hypothesis):

* ``verifier_logprob_whole``: mean verifier log-prob of the solution (minus its cross-entropy: the CME
  reward); ``verifier_logprob_answer``: the same over the final answer's tokens only;
* ``verifier_neg_entropy_whole`` / ``verifier_neg_entropy_answer``: minus the mean verifier entropy at
  those positions;
* ``policy_logprob_whole`` / ``policy_logprob_answer``: the policy's own log-likelihood (self-likelihood),
  rendered as the policy saw the prompt;
* ``neg_length``: minus the solution's length in policy tokens (shorter scores higher), the baseline a
  likelihood signal must beat.

Answer-span signals on a solution without a final answer take the lowest value there is (the log-prob
floor, as the ``cme_answer`` reward does), so the "all" column rewards a signal for the answer's mere
presence; the "answered" column ranks only solutions that have an answer, which isolates what the
likelihood of the answer itself says.

Several verifiers can be compared on the same solutions: the policy samples, grades and self-scores once,
and each verifier adds its own signals. Files in the output folder: ``job.json`` (what was asked, without
the verifiers, fingerprinted: a rerun must ask the same), ``generations.json`` (resumable sampling),
``records.jsonl`` (one row per solution with its grade, the policy's and length signals; reused when
complete), ``verifier_<name>.json`` (one verifier's signals per solution, with the verifier's identity
and dtype; reused when they match, so a rerun with one more ``--verifier`` scores only that one) and
``separation.json`` (the table).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cmerl.answers import find_answer, token_indices_in_span
from cmerl.formatting import RenderConfig
from cmerl.grading import grade
from cmerl.io import iter_jsonl, name_slug, write_json_atomic, write_records
from cmerl.math_eval import (
    GENERATIONS_NAME,
    RECORDS_NAME,
    SolutionSettings,
    _model_id,
    claim_output_dir,
    prompt_items,
)
from cmerl.math_rewards import LOGPROB_FLOOR, response_offsets, token_values
from cmerl.problems import load_problems

StatusPrinter = Callable[[str], None]
RESULT_NAME = "separation.json"

#: signal name -> what it is, for tables
SIGNALS: dict[str, str] = {
    "verifier_logprob_whole": "verifier log-prob, whole solution (-cross-entropy, CME)",
    "verifier_logprob_answer": "verifier log-prob, answer span",
    "verifier_neg_entropy_whole": "verifier -entropy, whole solution",
    "verifier_neg_entropy_answer": "verifier -entropy, answer span",
    "policy_logprob_whole": "policy self-likelihood, whole solution",
    "policy_logprob_answer": "policy self-likelihood, answer span",
    "neg_length": "-length in tokens (length-only baseline)",
}


@dataclass(frozen=True)
class SeparationSettings(SolutionSettings):
    """:class:`~cmerl.math_eval.SolutionSettings` of ``cmerl separation``: ``samples`` k solutions per problem,
    sampled (``temperature`` > 0); ``n_boot`` bootstrap resamples of each AUROC interval."""

    samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 256
    n_boot: int = 2000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"separation samples solutions: temperature must be > 0 (got {self.temperature})")


def span_signal(score, response: str, signal: str, answer_format: str) -> tuple[float, float | None]:
    """(whole-solution mean, answer-span mean or None) of one scored solution for ``signal``
    (``mean_logprob`` or ``neg_entropy``)."""
    values, whole = token_values(score, signal)
    span = find_answer(response, answer_format)
    if span is None:
        return whole, None
    offsets = response_offsets(score)
    if offsets is None:
        raise ValueError("the scorer returned no per-token character offsets; answer spans cannot be scored")
    idx = token_indices_in_span(offsets, span.start, span.end)
    return whole, (sum(values[i] for i in idx) / len(idx) if idx else None)


def add_signals(records: list[dict], scores: Sequence, who: str, answer_format: str, *, entropy: bool) -> None:
    """Write ``<who>_logprob_whole/answer`` (and ``<who>_neg_entropy_*`` with ``entropy``) into records."""
    for r, s in zip(records, scores, strict=True):
        r[f"{who}_logprob_whole"], r[f"{who}_logprob_answer"] = span_signal(s, r["response"], "mean_logprob",
                                                                            answer_format)
        if entropy:
            r[f"{who}_neg_entropy_whole"], r[f"{who}_neg_entropy_answer"] = span_signal(
                s, r["response"], "neg_entropy", answer_format)


def separation_table(records: Sequence[dict], verifier_signals: Sequence[Sequence[dict]] = (),
                     verifiers: Sequence[str] = (), *, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """One row per signal: AUROC over all solutions and over answered ones, with intervals (see module
    docstring). A missing answer-span value counts as the floor in "all". ``verifier_signals[j]`` holds
    verifier ``verifiers[j]``'s signals, one row per record in the same order; its rows come first (each
    with ``"verifier"``), then the policy's and the length baseline from ``records``."""
    # deferred: numpy, via cmerl.metrics (slow import, loaded only when used)
    from cmerl.metrics import auroc_interval

    labels = [bool(r["correct"]) for r in records]
    groups = [r["problem_index"] for r in records]
    answered = [i for i, r in enumerate(records) if r["extracted"] is not None]

    def row(name: str, rows: Sequence[dict]) -> dict:
        values = [LOGPROB_FLOOR if r[name] is None else float(r[name]) for r in rows]
        have = [i for i in answered if rows[i][name] is not None]
        all_ = auroc_interval(values, labels, groups, n_boot=n_boot, seed=seed)
        ans = auroc_interval([values[i] for i in have], [labels[i] for i in have], [groups[i] for i in have],
                             n_boot=n_boot, seed=seed)
        return {"signal": name, "what": SIGNALS[name], "all": all_.to_dict(), "answered": ans.to_dict()}

    table = []
    for name_v, rows in zip(verifiers, verifier_signals, strict=True):
        if [r["index"] for r in rows] != [r["index"] for r in records]:
            raise ValueError(f"the signals of verifier {name_v} are not for these solutions")
        table += [{**row(name, rows), "verifier": name_v} for name in SIGNALS
                  if name.startswith("verifier_") and all(name in r for r in rows)]
    table += [row(name, records) for name in SIGNALS
              if not name.startswith("verifier_") and all(name in r for r in records)]
    return table


@dataclass
class SeparationResult:
    """The table and what it was computed on."""

    table: list[dict]
    n_problems: int
    n_solutions: int
    n_correct: int
    n_answered: int
    job: dict
    output_dir: Path

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output_dir"] = str(self.output_dir)
        return d


def _complete_records(path: Path, n: int) -> list[dict] | None:
    rows = list(iter_jsonl(path)) if path.is_file() else []
    return rows if len(rows) == n and all("policy_logprob_whole" in r for r in rows) else None


def verifier_signals_path(output_dir: Path, verifier: str) -> Path:
    """Where one verifier's signals live in a separation folder."""
    return output_dir / f"verifier_{name_slug(verifier)}.json"


def _saved_verifier_signals(path: Path, identity: dict, indices: list[int]) -> list[dict] | None:
    """The rows of ``path`` when it was written by the same verifier (identity, dtype) for these solutions;
    None otherwise, also for a file that is not valid JSON (a derived file: it is scored again)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if not isinstance(saved, dict) or saved.get("verifier") != identity or [r["index"] for r in saved.get("signals", [])] != indices:
        return None
    return saved["signals"]


def run_separation(policy: str, verifiers: str | Sequence[str], problem_set: str, output_dir: str | Path,
                   settings: SeparationSettings = SeparationSettings(), *, verifier_dtype: str = "auto",
                   batch_tokens: int = 4096, progress: bool = False, print_status: StatusPrinter | None = None) -> SeparationResult:
    """Sample, grade, score (the policy once, then each verifier) and tabulate; see the module docstring.
    ``verifiers``: one name or several (each adds four signals, in the order given)."""
    # deferred: torch, via cmerl.evaluation and cmerl.generation and cmerl.scoring.Verifier (slow import, loaded only when used)
    from cmerl.evaluation import generator_label
    from cmerl.generation import (
        generate_outputs,
        generator_fingerprint,
        load_generator,
        outputs_complete,
        parse_prompt_spec,
    )
    from cmerl.scoring import Verifier

    names = [verifiers] if isinstance(verifiers, str) else list(verifiers)
    if not names:
        raise ValueError("separation needs at least one verifier")
    slugs = [name_slug(v) for v in names]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"the same verifier is given twice: {names}")
    out = Path(output_dir)
    emit_status = print_status or (lambda _m: None)
    problems = load_problems(problem_set, split=settings.split)
    recorded = {k: v for k, v in asdict(settings).items() if k not in ("batch_size", "n_boot")}
    job = claim_output_dir(out, {"kind": "cmerl.separation", "policy": _model_id(policy),
                                 "problems": parse_prompt_spec(problem_set)[0], "settings": recorded})
    identities = [{**_model_id(v), "dtype": verifier_dtype} for v in names]
    items = prompt_items(problems, settings.samples)
    indices = [it.index for it in items]
    gen_path, rec_path = out / GENERATIONS_NAME, out / RECORDS_NAME
    config = settings.generation_config()
    label = generator_label(policy)
    weights = generator_fingerprint(policy)  # what the policy's weights are: other weights are refused on resume
    records = _complete_records(rec_path, len(items)) if outputs_complete(
        gen_path, items, generator=label, config=config, model_fingerprint=weights) else None
    by_problem = {p.index: p for p in problems}
    if records is None or [r["index"] for r in records] != indices:
        emit_status(f"{len(problems)} problems from {problem_set} x {settings.samples} samples from {policy}")
        model, tok = load_generator(policy, dtype=settings.dtype)
        rows = generate_outputs(model, tok, items, gen_path, generator=label, config=config, progress=progress,
                                model_fingerprint=weights)
        by_index = {r["index"]: r for r in rows}
        records = []
        for it in items:
            row, p = by_index[it.index], by_problem[it.index // settings.samples]
            g = grade(row["output"], p.answer, answer_format=settings.answer_format)
            records.append({"index": it.index, "problem_index": p.index, "sample": it.index % settings.samples,
                            "gold": p.answer, "response": row["output"], "extracted": g.extracted,
                            "correct": g.correct, "finish_reason": row.get("finish_reason"),
                            "n_tokens": row.get("n_tokens"), "neg_length": -float(row.get("n_tokens") or 0)})
        emit_status("scoring with the policy itself (self-likelihood)")
        self_scorer = Verifier(model, tok, name=f"{policy} (policy)", max_batch_tokens=batch_tokens,
                               render=RenderConfig(system_prompt=settings.system_prompt))
        add_signals(records, self_scorer.score([by_problem[r["problem_index"]].prompt for r in records],
                                               [r["response"] for r in records], progress=progress),
                    "policy", settings.answer_format, entropy=False)
        del self_scorer, model
        gc.collect()
        write_records(rec_path, records)
    prompts = [by_problem[r["problem_index"]].prompt for r in records]
    per_verifier: list[list[dict]] = []
    for name, identity in zip(names, identities, strict=True):
        path = verifier_signals_path(out, name)
        signals = _saved_verifier_signals(path, identity, indices)
        if signals is None:
            emit_status(f"scoring with the verifier {name}")
            v = Verifier.from_pretrained(name, dtype=verifier_dtype, max_batch_tokens=batch_tokens)
            signals = [{"index": r["index"], "response": r["response"]} for r in records]
            add_signals(signals, v.score(prompts, [r["response"] for r in records], entropy=True, progress=progress),
                        "verifier", settings.answer_format, entropy=True)
            for row in signals:
                del row["response"]
            del v
            gc.collect()
            write_json_atomic(path, {"verifier": identity, "signals": signals})
        per_verifier.append(signals)
    table = separation_table(records, per_verifier, names, n_boot=settings.n_boot, seed=settings.seed)
    result = SeparationResult(table=table, n_problems=len(problems), n_solutions=len(records),
                              n_correct=sum(bool(r["correct"]) for r in records),
                              n_answered=sum(r["extracted"] is not None for r in records),
                              job={**job, "selection": problem_set, "verifiers": identities}, output_dir=out)
    write_json_atomic(out / RESULT_NAME, result.to_dict())
    return result


def _cell(a: dict) -> str:
    if a["value"] is None:
        return "n/a"
    return f"{a['value']:.3f} [{a['ci_low']:.2f}, {a['ci_high']:.2f}]"


def format_table(result: SeparationResult) -> str:
    """The table as markdown (AUROC [95% interval], all solutions and answered ones; one block of rows per
    verifier, then the policy's own and the length baseline)."""
    verifiers = [v["name"] for v in result.job.get("verifiers", [])]
    lines = [(f"{result.n_solutions} solutions of {result.n_problems} problems ({result.job['selection']}): "
              f"{result.n_correct} correct, {result.n_answered} with a final answer. "
              f"Policy {result.job['policy']['name']}, verifier{'s' if len(verifiers) > 1 else ''} "
              f"{', '.join(verifiers)}."),
             "", "| signal | scored by | AUROC, all | AUROC, answered |", "|---|---|---|---|"]
    for row in result.table:
        by = row.get("verifier") or ("(length)" if row["signal"] == "neg_length" else "policy")
        lines.append(f"| {row['what']} | {by} | {_cell(row['all'])} | {_cell(row['answered'])} |")
    lines.append("")
    lines.append("AUROC > 0.5: correct solutions score higher (ties count 1/2); 95% bootstrap intervals over problems.")
    return "\n".join(lines)
