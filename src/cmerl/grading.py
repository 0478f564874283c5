"""Is a solution's final answer right? Extraction by :mod:`cmerl.answers`, equivalence by ``math-verify``.

A solution is graded in two steps, so every record can show what was compared:

1. its final answer is found with :func:`cmerl.answers.find_answer` (the last ``\\boxed{}`` or ``#### N``;
   a solution without one is wrong, with ``extracted = None``);
2. the extracted text and the gold answer are parsed as LaTeX / plain expressions by Hugging Face's
   ``math-verify`` and compared symbolically (``\\frac{1}{2}`` = ``0.5``, ``1,000`` = ``1000``,
   ``(3, \\frac{\\pi}{2})`` = ``\\left( 3, \\frac{\\pi}{2} \\right)``); when math-verify can parse neither
   side, the two strings are compared after removing spaces and ``$`` signs.

math-verify bounds its parsing and comparison with SIGALRM timeouts, which only work in the main
thread; elsewhere they are switched off (a pathological expression may then take longer).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from cmerl.answers import find_answer

TIMEOUT_SECONDS = 5


class _NoTimeoutNotice(logging.Filter):
    """Drops math-verify's per-call warning that its timeout is off (said once in the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutNotice())


@dataclass(frozen=True)
class Grade:
    """``correct``: the extracted answer equals the gold one; ``extracted``: the answer text found in the
    solution (None = no answer); ``kind``: ``boxed`` / ``gsm8k`` / None."""

    correct: bool
    extracted: str | None
    gold: str
    kind: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _timeout() -> int | None:
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def _parse(text: str):
    from math_verify import parse  # deferred: math_verify (slow import, fast CLI start)

    wrapped = text if text.lstrip().startswith(("$", "\\(", "\\[", "\\boxed")) else f"${text}$"
    return parse(wrapped, parsing_timeout=_timeout())


def _plain(text: str) -> str:
    return "".join(text.split()).replace("$", "").rstrip(".")


def answers_match(gold: str, extracted: str) -> bool:
    """Whether two final answers (LaTeX or plain text) are mathematically equal (see module docstring)."""
    from math_verify import verify  # deferred: math_verify (slow import, fast CLI start)

    gold_parsed, pred_parsed = _parse(gold), _parse(extracted)
    if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=_timeout()):
        return True
    return _plain(gold) == _plain(extracted) and bool(_plain(gold))


def grade(solution: str, gold: str, *, answer_format: str = "auto") -> Grade:
    """Grade one solution against the gold final answer (see module docstring)."""
    if not isinstance(gold, str) or not gold.strip():
        raise ValueError(f"gold answer must be a non-empty string (got {gold!r})")
    span = find_answer(solution, answer_format)
    if span is None:
        return Grade(False, None, gold, None)
    return Grade(answers_match(gold, span.text), span.text, gold, span.kind)


def grade_all(solutions: Sequence[str], golds: Sequence[str], *, answer_format: str = "auto") -> list[Grade]:
    """:func:`grade` over parallel lists; raises when the lengths differ."""
    if len(solutions) != len(golds):
        raise ValueError(f"got {len(solutions)} solutions but {len(golds)} gold answers")
    return [grade(s, g, answer_format=answer_format) for s, g in zip(solutions, golds)]
