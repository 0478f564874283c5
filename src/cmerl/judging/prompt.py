"""The judge prompt (file format, placeholders, verdict parsing), one judge call and its result, the
:class:`Judge` role, and the decision rule that turns a pair's two orders into a verdict (see
:mod:`cmerl.judging` for the vocabulary and the rule)."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, Protocol

Letter = Literal["A", "B"]
DEFAULT_PROMPT = "pairwise_judge.txt"
DEFAULT_THRESHOLD = 0.2
DEFAULT_MAX_RESPONSE_CHARS = 3000
TRUNCATION_MARK = "\n[... truncated]"


# --------------------------------------------------------------------------- the prompt
def read_prompt_sections(path: str | Path | None, packaged: str, kind: str) -> tuple[str, str, dict[str, str]]:
    """``(text, source, sections)`` of a judge prompt file: ``path``, or the packaged ``prompts/<packaged>``
    when None. Sections are opened by lines ``<<<system>>>``, ``<<<user>>>`` and ``<<<assistant_prefill>>>``;
    a missing file or section raises naming it (``kind`` says which prompt, for the message)."""
    if path is None:
        text = resources.files("cmerl").joinpath("prompts", packaged).read_text(encoding="utf-8")
        source = f"cmerl/prompts/{packaged}"
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"judge prompt file not found: {p}")
        text, source = p.read_text(encoding="utf-8"), str(p)
    parts = re.split(r"^<<<(system|user|assistant_prefill)>>>[ \t]*\n", text, flags=re.MULTILINE)
    sections = dict(zip(parts[1::2], parts[2::2]))
    missing = [s for s in ("system", "user", "assistant_prefill") if s not in sections]
    if missing:
        raise ValueError(f"{kind} {source} lacks section(s) {missing}; open each with a line "
                         "<<<system>>>, <<<user>>>, <<<assistant_prefill>>>")
    return text, source, sections


@dataclass(frozen=True)
class JudgePrompt:
    """A judge prompt: system text, a user template with ``{instruction}``, ``{response_a}``,
    ``{response_b}``, and the assistant prefill whose continuation is the choice letter."""

    system: str
    user: str
    prefill: str
    text: str  # the whole file, recorded in every verdicts file
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @classmethod
    def load(cls, path: str | Path | None = None) -> JudgePrompt:
        """Load a prompt file (default: the packaged ``prompts/pairwise_judge.txt``).

        The file has three sections, each opened by a line ``<<<system>>>``, ``<<<user>>>`` and
        ``<<<assistant_prefill>>>``; the user section must hold the three placeholders.
        """
        text, source, sections = read_prompt_sections(path, DEFAULT_PROMPT, "judge prompt")
        user = sections["user"].strip("\n")
        for ph in ("{instruction}", "{response_a}", "{response_b}"):
            if ph not in user:
                raise ValueError(f"judge prompt {source}: the user section must contain {ph}")
        prefill = sections["assistant_prefill"].strip("\n").rstrip()
        return cls(sections["system"].strip("\n"), user, prefill, text, source)

    def user_message(self, instruction: str, response_a: str, response_b: str) -> str:
        """The user turn with the placeholders filled in one pass (braces inside responses are safe)."""
        values = {"instruction": instruction, "response_a": response_a, "response_b": response_b}
        return re.sub(r"\{(instruction|response_a|response_b)\}", lambda m: values[m.group(1)], self.user)

    def messages(self, instruction: str, response_a: str, response_b: str) -> list[dict]:
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": self.user_message(instruction, response_a, response_b)}]

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "text": self.text}


_VERDICT_LINE = re.compile(r"better\s+response\s+is\s*:?\s*\**\s*(?:response\s*)?\**\s*\[*\s*([AB])\b",
                           re.IGNORECASE)
_BARE = re.compile(r"^\W*(?:response\s+)?\[*\s*([AB])\s*\]*\W*$", re.IGNORECASE)


def parse_verdict(text: str) -> Letter | None:
    """The letter a judge's text picks: "The better response is Response A" (last such line wins) or a
    bare "A"/"B" (as after a pre-filled prefix); ``None`` when it says neither. Case-sensitive letters."""
    hits = [m.group(1) for m in _VERDICT_LINE.finditer(text) if m.group(1) in "AB"]
    if hits:
        return hits[-1]  # type: ignore[return-value]
    m = _BARE.match(text.strip())
    if m and m.group(1) in "AB":
        return m.group(1)  # type: ignore[return-value]
    return None


def truncate_response(text: str, max_chars: int) -> str:
    """Cut a response to ``max_chars`` characters, marking the cut; ``max_chars <= 0`` keeps it whole."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    return text[:max_chars] + TRUNCATION_MARK


# --------------------------------------------------------------------------- one order's result
@dataclass
class Job:
    """One judge call: the instruction and the two responses in the positions shown."""

    instruction: str
    response_A: str
    response_B: str


@dataclass
class OrderResult:
    """What a judge said about one order. ``choice`` is the letter picked (argmax of the two log-probs in
    log-prob mode, parsed otherwise), ``None`` when unusable; ``logprob_A``/``logprob_B`` are natural-log
    probabilities of the choice tokens (``None`` in parse mode); ``raw`` is the judge's text output."""

    choice: Letter | None
    logprob_A: float | None = None
    logprob_B: float | None = None
    raw: str = ""
    error: str | None = None
    attempts: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def has_logprobs(self) -> bool:
        return self.logprob_A is not None and self.logprob_B is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d


class Judge(Protocol):
    """Anything that judges a list of jobs, one :class:`OrderResult` each, in order."""

    name: str

    def settings(self) -> dict: ...

    def judge(self, jobs: Sequence[Job]) -> list[OrderResult]: ...


# --------------------------------------------------------------------------- decision
@dataclass(frozen=True)
class DecisionRule:
    """threshold: a pair whose summed margin (nats) has ``|margin| < threshold`` is a tie (log-prob mode);
    require_consistent: also call it a tie when the two orders prefer different systems."""

    threshold: float = DEFAULT_THRESHOLD
    require_consistent: bool = False

    def __post_init__(self) -> None:
        if self.threshold < 0 or math.isnan(self.threshold):
            raise ValueError(f"threshold must be >= 0 (got {self.threshold})")


def preferred_system(order: str, choice: Letter | None) -> str | None:
    """System ("a"/"b") behind the letter picked in ``order`` ("ab" or "ba")."""
    if choice is None:
        return None
    return order[0] if choice == "A" else order[1]


def order_margin(order: str, r: OrderResult) -> float | None:
    """Log-odds for system a in one order (positive: a preferred); ``None`` without log-probs."""
    if not r.has_logprobs:
        return None
    d = r.logprob_A - r.logprob_B  # type: ignore[operator]
    return d if order == "ab" else -d


def decide(ab: OrderResult, ba: OrderResult, rule: DecisionRule = DecisionRule()) -> tuple[str, float | None, bool | None]:
    """``(verdict, margin, consistent)`` of a pair from its two orders; see module docstring."""
    if ab.error or ba.error or ab.choice is None or ba.choice is None:
        return "error", None, None
    pa, pb = preferred_system("ab", ab.choice), preferred_system("ba", ba.choice)
    consistent = pa == pb
    if ab.has_logprobs and ba.has_logprobs:
        margin = order_margin("ab", ab) + order_margin("ba", ba)  # type: ignore[operator]
        if abs(margin) < rule.threshold or margin == 0 or (rule.require_consistent and not consistent):
            return "tie", margin, consistent
        return ("a" if margin > 0 else "b"), margin, consistent
    return (pa if consistent else "tie"), None, consistent  # type: ignore[return-value]
