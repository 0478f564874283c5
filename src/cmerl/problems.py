"""Maths problem sets with gold final answers: bundled GSM8K and MATH-500, and their Hugging Face ids.

A problem set spec is a name, optionally sliced like a prompt set (``gsm8k:50`` = the first 50,
``math500[100:200]``):

* bundled (offline; provenance and licences in ``cmerl/data/README.md``): ``gsm8k`` (the 1,319 GSM8K test
  problems), ``gsm8k_train`` (the 7,473 training problems), ``math500`` (the 500 MATH-500 test problems);
* Hugging Face ids, where the hub is reachable (or cached, with ``HF_DATASETS_OFFLINE=1``):
  ``openai/gsm8k`` (config ``main``), ``HuggingFaceH4/MATH-500`` and
  ``DigitalLearningGmbH/MATH-lighteval``, read from ``split`` (default ``test``).

Every problem's prompt is the question followed by :data:`ANSWER_INSTRUCTION` (reason, then box the final
answer), the same text for training (``prompts: gsm8k_train``) and evaluation (``cmerl eval-math``), so a
policy is evaluated on the format it was trained on. Gold answers: GSM8K's number after ``####`` (commas
removed); MATH-500's ``answer`` field; MATH-lighteval's last ``\\boxed{}`` of the reference solution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from cmerl.answers import find_boxed, gsm8k_gold
from cmerl.prompt_sources import hub_unreachable_message, parse_prompt_spec

ANSWER_INSTRUCTION = "Reason step by step, then give the final answer in the form \\boxed{answer}."

#: bundled name -> (file in cmerl/data, question field, dataset family)
BUNDLED_PROBLEMS: dict[str, tuple[str, str, str]] = {
    "gsm8k": ("gsm8k_test.jsonl", "question", "gsm8k"),
    "gsm8k_train": ("gsm8k_train.jsonl", "question", "gsm8k"),
    "math500": ("math500_test.jsonl", "problem", "math"),
}
#: hub id -> (datasets config name or None, question field, dataset family)
HUB_PROBLEMS: dict[str, tuple[str | None, str, str]] = {
    "openai/gsm8k": ("main", "question", "gsm8k"),
    "HuggingFaceH4/MATH-500": (None, "problem", "math"),
    "DigitalLearningGmbH/MATH-lighteval": (None, "problem", "math"),
}


class ProblemDataError(ValueError):
    """A problem set that cannot be read, or a row without a usable question or gold answer."""


@dataclass(frozen=True)
class Problem:
    """One maths problem. ``index`` is its position in the unsliced set; ``answer`` is the gold final
    answer (GSM8K: a plain number string; MATH: LaTeX); ``solution`` the reference solution when known."""

    index: int
    question: str
    answer: str
    source: str
    solution: str | None = None
    id: str | None = None

    @property
    def prompt(self) -> str:
        """The user turn the policy answers (the question plus :data:`ANSWER_INSTRUCTION`)."""
        return format_prompt(self.question)


def format_prompt(question: str) -> str:
    """The prompt text of a question (see module docstring)."""
    return f"{question.strip()}\n\n{ANSWER_INSTRUCTION}"


def _hub_id(name: str) -> str | None:
    lowered = {k.lower(): k for k in HUB_PROBLEMS}
    return lowered.get(name.lower())


def is_problem_source(spec: str) -> bool:
    """Whether ``spec`` (optionally sliced: ``gsm8k:50``) names a problem set this module knows."""
    if not isinstance(spec, str) or not spec.strip():
        return False
    source = parse_prompt_spec(spec)[0]
    return source in BUNDLED_PROBLEMS or _hub_id(source) is not None


def _gold(row: dict, family: str, where: str) -> tuple[str, str | None]:
    """(gold answer, reference solution) of a raw row."""
    if family == "gsm8k":
        solution = row.get("answer")
        if not isinstance(solution, str):
            raise ProblemDataError(f"{where}: GSM8K row needs a string 'answer' (got {type(solution).__name__})")
        try:
            return gsm8k_gold(solution), solution
        except ValueError as exc:
            raise ProblemDataError(f"{where}: {exc}") from None
    solution = row.get("solution") if isinstance(row.get("solution"), str) else None
    answer = row.get("answer")
    if isinstance(answer, str) and answer.strip():
        return answer.strip(), solution
    span = find_boxed(solution or "")
    if span is None:
        raise ProblemDataError(f"{where}: no 'answer' field and no \\boxed{{}} answer in its 'solution'")
    return span.text, solution


def _rows(source: str, split: str) -> tuple[list[dict], str, str, str]:
    """(raw rows, question field, family, description) of an unsliced source."""
    if source in BUNDLED_PROBLEMS:
        fname, qfield, family = BUNDLED_PROBLEMS[source]
        text = resources.files("cmerl").joinpath("data", fname).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()], qfield, family, f"bundled {source}"
    hub = _hub_id(source)
    if hub is None:
        raise ProblemDataError(f"unknown problem set {source!r}; use one of "
                               f"{', '.join([*BUNDLED_PROBLEMS, *HUB_PROBLEMS])}, optionally sliced (gsm8k:50)")
    config, qfield, family = HUB_PROBLEMS[hub]
    message = hub_unreachable_message(hub)
    if message is not None:
        raise ProblemDataError(f"{message} Bundled problem sets: {', '.join(BUNDLED_PROBLEMS)}.")
    try:
        from datasets import load_dataset  # deferred: datasets (slow import, fast CLI start)

        ds = load_dataset(hub, config, split=split) if config else load_dataset(hub, split=split)
    except Exception as exc:
        raise ProblemDataError(f"could not load Hugging Face dataset {hub!r} (split {split!r}): {exc}") from exc
    return [dict(r) for r in ds], qfield, family, f"{hub} ({split})"


def load_problems(spec: str, *, split: str = "test") -> list[Problem]:
    """The problems of ``spec`` (see module docstring), sliced, in set order. ``split`` applies to hub
    ids only. Raises :class:`ProblemDataError` naming the row for an unusable row or an empty selection."""
    try:
        source, start, stop = parse_prompt_spec(spec)
    except ValueError as exc:
        raise ProblemDataError(str(exc)) from None
    rows, qfield, family, where = _rows(source, split)
    out = []
    for i, row in enumerate(rows):
        place = f"{where} row {i + 1}"
        question = row.get(qfield) if isinstance(row, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise ProblemDataError(f"{place}: needs a non-empty string {qfield!r}")
        answer, solution = _gold(row, family, place)
        uid = row.get("unique_id")
        out.append(Problem(index=i, question=question, answer=answer, source=source, solution=solution,
                           id=uid if isinstance(uid, str) else None))
    out = out[start:stop]
    if not out:
        raise ProblemDataError(f"problem set {spec!r} is empty")
    return out


def describe(problems: list[Problem]) -> dict[str, Any]:
    """A small summary of a selection for result files: source, count, first and last index."""
    return {"source": problems[0].source, "n": len(problems), "first_index": problems[0].index,
            "last_index": problems[-1].index}
