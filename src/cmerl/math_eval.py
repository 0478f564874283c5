"""``cmerl eval-math``: accuracy of a model on a maths problem set: greedy pass@1, or pass@k and maj@k
over k sampled solutions per problem.

Pipeline: problems (:mod:`cmerl.problems`) -> generations (:func:`cmerl.generation.generate_outputs`,
resumable) -> grades (:mod:`cmerl.grading`) -> metrics. Files in the output folder:

* ``job.json``: what was asked (model, problem set without its slice, split, settings but the batch
  size) and a fingerprint of it; a rerun into the same folder must ask the same, else it is refused (two
  evaluations never mix), while another slice of the same set is fine (its solutions are reused);
* ``generations.json``: the solutions in AlpacaEval format (``index`` = problem index x samples + sample),
  written as they finish, so an interrupted run resumes where it stopped;
* ``records.jsonl``: one row per solution: problem index and id, sample, question, gold answer,
  solution, extracted answer, whether it is correct, finish reason, tokens;
* ``summary.json``: pass@1 (mean correctness over every solution, with a bootstrap interval over
  problems), pass@k (unbiased estimator, k = samples), maj@k (the answer most solutions of a problem agree
  on, equivalence by math-verify), the fraction without a final answer, and the job.

Metrics are over the problems; a problem's k solutions are the k samples, so pass@1 with k samples is the
mean over problems of (correct solutions / k).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cmerl.fingerprint import model_fingerprint
from cmerl.grading import Grade, answers_match, grade
from cmerl.io import write_json_atomic, write_records
from cmerl.problems import Problem, load_problems
from cmerl.prompt_sources import parse_prompt_spec

#: Prints one status line for the user (e.g. ``rich.console.Console.print``); ``None`` where taken: quiet.
StatusPrinter = Callable[[str], None]
JOB_NAME = "job.json"
GENERATIONS_NAME = "generations.json"
RECORDS_NAME = "records.jsonl"
SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class SolutionSettings:
    """How solutions to maths problems are produced and graded: ``samples`` per problem at ``temperature``
    (0 = greedy), ``top_p``, ``max_new_tokens``, ``seed``, ``batch_size``, ``dtype`` of the policy,
    ``system_prompt``, the ``answer_format`` graded and the problem set's ``split``. Shared by
    :class:`MathEvalSettings` and :class:`cmerl.separation.SeparationSettings`, which set their own defaults
    and checks."""

    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    batch_size: int = 8
    dtype: str = "auto"
    system_prompt: str | None = None
    answer_format: str = "auto"
    split: str = "test"

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1 (got {self.samples})")

    def generation_config(self):
        # deferred: torch, via cmerl.generation (torch-free CLI start)
        from cmerl.generation import GenerationConfig

        return GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                seed=self.seed, batch_size=self.batch_size, dtype=self.dtype,
                                system_prompt=self.system_prompt)


@dataclass(frozen=True)
class MathEvalSettings(SolutionSettings):
    """:class:`SolutionSettings` of ``cmerl eval-math``: greedy by default; ``samples`` k > 1 needs sampling
    (``temperature`` > 0)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"samples={self.samples} with temperature 0 would repeat one greedy solution; "
                             "set a temperature > 0 to sample")


def prompt_items(problems: Sequence[Problem], samples: int):
    """One :class:`~cmerl.generation.PromptItem` per (problem, sample), indexed ``problem.index * samples + k``
    (stable under slicing, so a larger slice reuses the solutions of a smaller one)."""
    from cmerl.generation import PromptItem  # deferred: torch, via cmerl.generation (torch-free CLI start)

    return [PromptItem(p.index * samples + k, p.prompt, p.source) for p in problems for k in range(samples)]


def job_fingerprint(job: dict) -> str:
    """sha256 (hex, 16 characters) of a job description in canonical JSON."""
    return hashlib.sha256(json.dumps(job, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _model_id(name: str) -> dict:
    """What a model name is, for ``job.json``: its name (a folder: resolved; a training run folder: the
    model folder it loads) plus :func:`cmerl.fingerprint.model_fingerprint` (hub id, weights hash), so a
    folder whose weights changed is another model."""
    # deferred: torch, via cmerl.generation (torch-free CLI start)
    from cmerl.generation import resolve_trained_model

    p = Path(name).expanduser()
    if p.is_dir():
        p = resolve_trained_model(p).resolve()
        name = str(p)
    return {"name": name, **model_fingerprint(name)}


def claim_output_dir(output_dir: Path, job: dict) -> dict:
    """Write ``job.json`` (with its fingerprint) in ``output_dir``, or check that the one there describes
    the same job; raises ValueError naming the differences otherwise. Returns the job with fingerprint."""
    job = {**job, "fingerprint": job_fingerprint(job)}
    path = output_dir / JOB_NAME
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("fingerprint") != job["fingerprint"]:
            diffs = sorted(k for k in set(old) | set(job) if k != "fingerprint" and old.get(k) != job.get(k))
            raise ValueError(f"{output_dir} holds another evaluation ({', '.join(diffs)} differ); choose another "
                             "--output-dir or delete it")
        return job
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, job)
    return job


def majority_answer(grades: Sequence[Grade]) -> Grade | None:
    """The grade whose extracted answer most solutions share (equivalence by math-verify; ties: the answer
    seen first); None when no solution has an answer."""
    clusters: list[list[Grade]] = []
    for g in grades:
        if g.extracted is None:
            continue
        for c in clusters:
            if answers_match(c[0].extracted, g.extracted):  # type: ignore[arg-type]
                c.append(g)
                break
        else:
            clusters.append([g])
    if not clusters:
        return None
    return max(clusters, key=len)[0]  # max keeps the first of equal lengths


@dataclass
class MathEvalResult:
    """Summary of one evaluation (see module docstring); ``records`` are the per-solution rows."""

    n_problems: int
    samples: int
    pass_at_1: float
    pass_at_1_ci: tuple[float | None, float | None]
    pass_at_k: float | None
    maj_at_k: float | None
    no_answer_frac: float
    truncated_frac: float
    job: dict
    output_dir: Path
    records: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("records")
        d["output_dir"] = str(self.output_dir)
        return d


def summarize(records: Sequence[dict], samples: int, *, n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """pass@1 (+ interval over problems), pass@k, maj@k, no-answer and truncated fractions of records
    holding ``problem_index``, ``correct``, ``extracted``, ``gold``, ``finish_reason``."""
    # deferred: numpy, via cmerl.metrics (slow import, fast CLI start)
    from cmerl.metrics import bootstrap_ci, pass_at_k

    by_problem: dict[int, list[dict]] = {}
    for r in records:
        by_problem.setdefault(r["problem_index"], []).append(r)
    per_problem = [sum(r["correct"] for r in rs) / len(rs) for rs in by_problem.values()]
    lo, hi = bootstrap_ci(per_problem, n_boot=n_boot, seed=seed)
    out: dict[str, Any] = {
        "n_problems": len(by_problem), "samples": samples,
        "pass_at_1": sum(per_problem) / len(per_problem), "pass_at_1_ci": (lo, hi),
        "pass_at_k": None, "maj_at_k": None,
        "no_answer_frac": sum(r["extracted"] is None for r in records) / len(records),
        "truncated_frac": sum(r["finish_reason"] == "length" for r in records) / len(records),
    }
    if samples > 1:
        out["pass_at_k"] = sum(pass_at_k(len(rs), sum(r["correct"] for r in rs), len(rs))
                               for rs in by_problem.values()) / len(by_problem)
        majority = 0
        for rs in by_problem.values():
            grades = [Grade(r["correct"], r["extracted"], r["gold"], r.get("kind")) for r in rs]
            top = majority_answer(grades)
            majority += bool(top is not None and top.correct)
        out["maj_at_k"] = majority / len(by_problem)
    return out


def evaluate_math(model: str, problem_set: str, output_dir: str | Path, settings: MathEvalSettings = MathEvalSettings(),
                  *, progress: bool = False, print_status: StatusPrinter | None = None, n_boot: int = 10_000) -> MathEvalResult:
    """Generate (or resume), grade and summarise; see the module docstring. ``model``: a model name or a
    training output folder (:func:`cmerl.generation.load_generator`)."""
    # deferred: torch, via cmerl.evaluation (torch-free CLI start)
    from cmerl.evaluation import ensure_outputs, generator_label

    out = Path(output_dir)
    problems = load_problems(problem_set, split=settings.split)
    recorded = {k: v for k, v in asdict(settings).items() if k != "batch_size"}
    job = claim_output_dir(out, {"kind": "cmerl.eval_math", "model": _model_id(model),
                                 "problems": parse_prompt_spec(problem_set)[0], "settings": recorded})
    items = prompt_items(problems, settings.samples)
    if print_status:
        print_status(f"{len(problems)} problems from {problem_set} x {settings.samples} solution(s); "
             f"{'greedy' if settings.temperature == 0 else f'temperature {settings.temperature}'}")
    rows = ensure_outputs(model, items, out / GENERATIONS_NAME, settings.generation_config(),
                          generator=generator_label(model), progress=progress)
    by_index = {r["index"]: r for r in rows}
    records = []
    for p in problems:
        for k in range(settings.samples):
            row = by_index[p.index * settings.samples + k]
            g = grade(row["output"], p.answer, answer_format=settings.answer_format)
            records.append({"problem_index": p.index, "id": p.id, "sample": k, "question": p.question,
                            "gold": p.answer, "response": row["output"], "extracted": g.extracted, "kind": g.kind,
                            "correct": g.correct, "finish_reason": row.get("finish_reason"),
                            "n_tokens": row.get("n_tokens")})
    write_records(out / RECORDS_NAME, records)
    summary = summarize(records, settings.samples, n_boot=n_boot)
    result = MathEvalResult(output_dir=out, job={**job, "selection": problem_set}, records=records, **summary)
    write_json_atomic(out / SUMMARY_NAME, result.to_dict())
    return result


def format_summary(result: MathEvalResult) -> str:
    """A few lines for the console."""
    from cmerl.metrics import format_pct  # deferred: numpy, via cmerl.metrics (slow import, fast CLI start)

    lo, hi = result.pass_at_1_ci
    lines = [(f"pass@1 {format_pct(result.pass_at_1)} [{format_pct(lo)}, {format_pct(hi)}] on "
              f"{result.n_problems} problems ({result.job['selection']}, model {result.job['model']['name']})")]
    if result.samples > 1:
        lines.append(f"pass@{result.samples} {format_pct(result.pass_at_k)}   maj@{result.samples} "
                     f"{format_pct(result.maj_at_k)}")
    lines.append(f"no final answer in {format_pct(result.no_answer_frac)} of solutions; "
                 f"{format_pct(result.truncated_frac)} stopped at max_new_tokens")
    return "\n".join(lines)
