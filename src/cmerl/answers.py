"""Where the final answer of a maths solution is: character spans of ``\\boxed{...}`` and GSM8K's ``#### N``.

Pure string code (no torch). A span is half-open character offsets ``[start, end)`` into the text it was
found in, so ``text[span.start:span.end] == span.text``. Rules:

* ``boxed``: the content of the *last complete* ``\\boxed{...}`` (or ``\\fbox{...}``) whose content is not
  blank. Braces nest (``\\boxed{\\frac{1}{2}}`` is ``\\frac{1}{2}``); escaped braces ``\\{`` ``\\}`` are
  literal characters, not nesting. A box that never closes is ignored (an earlier complete one is used);
  surrounding whitespace inside the braces is not part of the span.
* ``gsm8k``: the number after the last ``####``: an optional minus sign, digits with optional thousands
  commas and decimals (``#### 1,234.5``). A ``$`` before it and a full stop after it are not part of the
  span. :func:`normalize_number` turns the span into a plain number string (``"1234.5"``).
* ``auto``: whichever of the two ends last in the text (a solution that boxes its answer and then
  repeats it after ``####`` gets the ``####`` one; either way the same answer).

:func:`token_indices_in_span` maps a span onto tokens given their character offsets (a token belongs to
the answer when it overlaps the span by at least one character).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

AnswerFormat = Literal["auto", "boxed", "gsm8k"]
ANSWER_FORMATS: tuple[str, ...] = ("auto", "boxed", "gsm8k")

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K = re.compile(r"####\s*\$?\s*(-?\s*\d[\d,]*(?:\.\d+)?|-?\s*\.\d+)")


@dataclass(frozen=True)
class AnswerSpan:
    """The final answer inside a text: ``text == source[start:end]``; ``kind`` is ``boxed`` or ``gsm8k``."""

    start: int
    end: int
    text: str
    kind: str


def _matching_brace(text: str, open_at: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_at`` (nesting counted, ``\\{``/``\\}`` skipped)."""
    depth, i = 0, open_at
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def find_boxed(text: str) -> AnswerSpan | None:
    """The last complete, non-blank ``\\boxed{...}`` content of ``text`` (see module docstring), or None."""
    best = None
    for m in _BOX_OPEN.finditer(text):
        close = _matching_brace(text, m.end() - 1)
        if close is None:
            continue
        start, end = _strip(text, m.end(), close)
        if end > start and (best is None or close >= best[2]):
            best = (start, end, close)
    if best is None:
        return None
    return AnswerSpan(best[0], best[1], text[best[0]:best[1]], "boxed")


def find_gsm8k(text: str) -> AnswerSpan | None:
    """The number after the last ``####`` in ``text`` (see module docstring), or None."""
    last = None
    for m in _GSM8K.finditer(text):
        last = m
    if last is None:
        return None
    start, end = last.span(1)
    while end > start and text[end - 1] == ",":  # "#### 18, since ..." : the comma is punctuation
        end -= 1
    return AnswerSpan(start, end, text[start:end], "gsm8k")


def find_answer(text: str, answer_format: str = "auto") -> AnswerSpan | None:
    """The final answer of ``text`` in ``answer_format`` (``auto``, ``boxed`` or ``gsm8k``), or None when
    the text has none. Raises ValueError naming an unknown format."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"unknown answer format {answer_format!r}; use one of {', '.join(ANSWER_FORMATS)}")
    if not isinstance(text, str):
        raise TypeError(f"text must be a string (got {type(text).__name__})")
    if answer_format == "boxed":
        return find_boxed(text)
    if answer_format == "gsm8k":
        return find_gsm8k(text)
    found = [s for s in (find_boxed(text), find_gsm8k(text)) if s is not None]
    return max(found, key=lambda s: s.end) if found else None


def normalize_number(text: str) -> str:
    """A GSM8K number as plain digits: commas and spaces removed (``"1,234"`` -> ``"1234"``, ``"- 5"`` -> ``"-5"``)."""
    return text.replace(",", "").replace(" ", "")


def gsm8k_gold(solution: str) -> str:
    """The gold final answer of a GSM8K solution (the number after its ``####``), normalised; raises
    ValueError when the solution has none."""
    span = find_gsm8k(solution)
    if span is None:
        raise ValueError(f"GSM8K solution has no '#### <number>' line: {solution[-80:]!r}")
    return normalize_number(span.text)


def token_indices_in_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose character range ``[s, e)`` overlaps ``[start, end)``.

    ``offsets[i]`` are token i's character offsets into the same text the span was found in; zero-width
    tokens (``s == e``: special tokens such as an end-of-turn marker) never belong to a span. A token
    that straddles the span's edge (``"{18"``) counts as an answer token.
    """
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
