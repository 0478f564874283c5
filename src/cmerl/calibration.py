"""Judge calibration on system-vs-system pairs: does a judge pick the system GPT-4 Turbo liked more?

``cmerl judge-check`` on the bundled easy sample asks whether a judge tells GPT-4 Turbo from gemma-2b-it.
A trained-vs-base comparison is a much smaller gap between two similar systems. The bundled
``data/model_pairs/*.jsonl`` files (derived from AlpacaEval 2.0 results, CC BY-NC 4.0, see
``data/README.md``) hold two systems' answers to the same instruction with GPT-4 Turbo's preference for
each over the same reference answer; ``gpt4t_margin_a_minus_b`` = pref(a vs ref) - pref(b vs ref) in
[-1, 1]. On prompts with ``|margin| >= min_margin`` the system with the larger preference is the label.

:func:`pairs_check` judges those pairs (both orders, resumable) and reports the judge's agreement with a
bootstrap interval next to two baselines on the same pairs: **length only** (the longer answer wins) and
**position only** (the answer shown first wins, with AlpacaEval's one random order per pair, seeded by
the instruction: what a fully position-biased judge scores under a single-order protocol).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from cmerl.agreement_registry import update_registry
from cmerl.io import read_records
from cmerl.judging import DecisionRule, Judge, JudgePrompt, Pair, judge_key, run_judge, verdicts_header
from cmerl.metrics import Rate, format_pct, rate

#: Bundled model-pair files (``cmerl/data/model_pairs/<stem>.jsonl``) and their short aliases.
BUNDLED_PAIRS = {
    "phi-2-sft__vs__phi-2": ("phi2",),
    "FuseChat-Llama-3.2-1B-Instruct__vs__gemma-2b-it": ("fusechat",),
}
DEFAULT_MIN_MARGIN = 0.3
_FIELDS = ("instruction", "output_a", "output_b", "gpt4t_margin_a_minus_b")


def resolve_pairs_file(spec: str | Path) -> tuple[Path, str]:
    """``(path, name)`` of a model-pairs file: a bundled stem or alias (``phi2``, ``fusechat``) or a path.
    Raises FileNotFoundError listing the bundled names when it is neither."""
    s = str(spec)
    for stem, aliases in BUNDLED_PAIRS.items():
        if s in (stem, f"{stem}.jsonl", *aliases):
            path = resources.files("cmerl").joinpath("data", "model_pairs", f"{stem}.jsonl")
            return Path(str(path)), stem
    p = Path(s).expanduser()
    if p.is_file():
        return p, p.stem
    names = ", ".join(f"{a[0]} ({stem})" for stem, a in BUNDLED_PAIRS.items())
    raise FileNotFoundError(f"model-pairs file not found: {s} (bundled: {names})")


@dataclass
class MarginPair:
    """A judged pair with GPT-4 Turbo's margin: ``reference`` is "a" (margin > 0), "b" or "tie"."""

    pair: Pair
    margin: float
    reference: str


def load_margin_pairs(spec: str | Path, *, min_margin: float = DEFAULT_MIN_MARGIN, n: int | None = None,
                      max_pair_chars: int | None = None) -> tuple[list[MarginPair], dict]:
    """Pairs of a model-pairs file with ``|margin| >= min_margin`` (file order), optionally only those whose
    instruction + both outputs have at most ``max_pair_chars`` characters, first ``n`` kept.

    Returns ``(pairs, info)``; ``info`` records the file, its sha256, the selection and how many rows each
    filter kept. Rows without a numeric margin are skipped. Raises ValueError naming a row without the
    fields, or when nothing is left.
    """
    if min_margin < 0:
        raise ValueError(f"--min-margin must be >= 0 (got {min_margin})")
    path, name = resolve_pairs_file(spec)
    rows, bad = read_records(path)
    if bad:
        raise ValueError(f"{path}: line {bad[0].line}: {bad[0].reason}")
    out, with_margin = [], 0
    for line, r in rows:
        if not isinstance(r, dict) or any(k not in r for k in _FIELDS):
            raise ValueError(f"{path}: row {line} lacks {[k for k in _FIELDS if not isinstance(r, dict) or k not in r]}"
                             " (expected a model-pairs row: instruction, output_a, output_b, gpt4t_margin_a_minus_b)")
        m = r["gpt4t_margin_a_minus_b"]
        if not isinstance(m, (int, float)) or isinstance(m, bool):
            continue
        with_margin += 1
        if abs(m) < min_margin:
            continue
        a, b = r["output_a"] or "", r["output_b"] or ""
        if max_pair_chars is not None and len(r["instruction"]) + len(a) + len(b) > max_pair_chars:
            continue
        ref = "a" if m > 0 else "b" if m < 0 else "tie"
        out.append(MarginPair(Pair(line - 1, r["instruction"], a, b, r.get("dataset"), r.get("generator_a"),
                                   r.get("generator_b")), float(m), ref))
    selected = len(out)
    if n is not None:
        out = out[:n]
    if not out:
        raise ValueError(f"{path}: no pair has |margin| >= {min_margin}"
                         + (f" and at most {max_pair_chars} characters" if max_pair_chars else ""))
    info = {"file": name, "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "min_margin": min_margin, "max_pair_chars": max_pair_chars, "n_requested": n,
            "rows": len(rows), "rows_with_margin": with_margin, "rows_selected": selected}
    return out, info


def position_first_shown(instruction: str, seed: int = 0) -> str:
    """The system ("a" or "b") shown first in AlpacaEval's one-random-order protocol: a coin flip seeded by
    the instruction (and ``seed``), so it is the same on every run."""
    digest = hashlib.sha256(f"{seed}:{instruction}".encode()).digest()
    return "b" if digest[0] & 1 else "a"


def agreement(verdict: str, reference: str) -> float:
    """1 when a verdict matches the reference, 0.5 when exactly one of them is a tie, 0 otherwise."""
    if verdict == reference:
        return 1.0
    return 0.5 if "tie" in (verdict, reference) else 0.0


def _longer(a: str, b: str) -> str:
    return "a" if len(a) > len(b) else "b" if len(b) > len(a) else "tie"


@dataclass
class PairsCheckResult:
    """Agreement of a judge with GPT-4 Turbo's margins on ``n`` system-vs-system pairs (errors excluded).

    agreement: ties count half; consistency: share of pairs whose two orders agreed; length_baseline /
    position_baseline: the two baselines on the same pairs; reference_a: pairs where system a was the label.
    """

    judge: str
    key: str
    pairs_file: str
    generator_a: str | None
    generator_b: str | None
    n: int
    errors: int
    ties: int
    reference_a: int
    agreement: Rate
    consistency: Rate
    length_baseline: Rate
    position_baseline: Rate
    selection: dict
    verdicts: str
    settings: dict = field(default_factory=dict)
    measured: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        a = self.agreement
        m = self.selection.get("min_margin")
        return (f"judge {self.judge} on {self.pairs_file} (|margin| >= {m}, n={self.n}, {self.ties} ties, "
                f"{self.errors} errors): agreement with GPT-4 Turbo {format_pct(a.value)} (95% CI "
                f"{format_pct(a.ci_low)}-{format_pct(a.ci_high)}); position consistency "
                f"{format_pct(self.consistency.value)}; length-only baseline {format_pct(self.length_baseline.value)}; "
                f"position-only baseline {format_pct(self.position_baseline.value)}")


def pairs_check(judge: Judge, pairs_file: str | Path, *, output: str | Path, min_margin: float = DEFAULT_MIN_MARGIN,
                n: int | None = None, max_pair_chars: int | None = None, rule: DecisionRule = DecisionRule(),
                prompt: JudgePrompt | None = None, seed: int = 0, progress: bool = False,
                remember: bool = True) -> PairsCheckResult:
    """Judge the selected pairs of ``pairs_file`` (resumably, into ``output``) and compare with the labels.

    The judge sees system a's answer as output A in order ab, exactly as ``cmerl judge --a --b`` would.
    """
    selected, info = load_margin_pairs(pairs_file, min_margin=min_margin, n=n, max_pair_chars=max_pair_chars)
    prompt = prompt or getattr(judge, "prompt", None) or JudgePrompt.load()
    first = selected[0].pair
    header = verdicts_header(judge, rule, prompt, a={"path": info["path"], "generator": first.generator_a},
                             b={"path": info["path"], "generator": first.generator_b})
    rows = run_judge(judge, [s.pair for s in selected], output, rule=rule, header=header, progress=progress)
    by_key = {(r["index"], r["instruction"]): r for r in rows}
    judged = [(s, by_key[(s.pair.index, s.pair.instruction)]) for s in selected
              if (s.pair.index, s.pair.instruction) in by_key]
    ok = [(s, r) for s, r in judged if r["verdict"] != "error"]
    result = PairsCheckResult(
        judge=judge.name, key=judge_key(header), pairs_file=info["file"], generator_a=first.generator_a,
        generator_b=first.generator_b, n=len(ok), errors=len(judged) - len(ok),
        ties=sum(1 for _, r in ok if r["verdict"] == "tie"),
        reference_a=sum(1 for s, _ in ok if s.reference == "a"),
        agreement=rate([agreement(r["verdict"], s.reference) for s, r in ok], seed=seed),
        consistency=rate([1.0 if r["consistent"] else 0.0 for _, r in ok], seed=seed),
        length_baseline=rate([agreement(_longer(s.pair.output_a, s.pair.output_b), s.reference) for s, _ in ok],
                             seed=seed),
        position_baseline=rate([agreement(position_first_shown(s.pair.instruction), s.reference) for s, _ in ok],
                               seed=seed),
        selection=info, verdicts=str(output),
        settings={"judge": header["judge"]["settings"], "decision": header["decision"],
                  "prompt_sha256": prompt.sha256},
        measured=time.strftime("%Y-%m-%d"))
    if remember:
        remember_pairs_agreement(result)
    return result


def pairs_summary(result: PairsCheckResult) -> dict:
    """The registry entry of a pairs check (what win-rate reports print)."""
    return {"judge": result.judge, "pairs_file": result.pairs_file, "min_margin": result.selection.get("min_margin"),
            "agreement": result.agreement.value, "ci_low": result.agreement.ci_low,
            "ci_high": result.agreement.ci_high, "n": result.n,
            "length_baseline": result.length_baseline.value,
            "position_baseline": result.position_baseline.value, "measured": result.measured,
            "source": "cmerl judge-check --pairs"}


def remember_pairs_agreement(result: PairsCheckResult) -> None:
    """Store the result in ``$CMERL_CACHE/judge_checks.json`` under the judge key, ``pairs.<file>``."""
    def add(entry: dict) -> None:
        entry.setdefault("pairs", {})[result.pairs_file] = pairs_summary(result)

    update_registry(result.key, add)


def pairs_text(agreement: dict | None) -> str:
    """One phrase with a judge's agreement on system-vs-system pairs (the hardest file measured first:
    phi-2-sft vs phi-2), or that it was never measured."""
    pairs = (agreement or {}).get("pairs") or {}
    if not pairs:
        return ("agreement on system-vs-system pairs not measured (run: cmerl judge-check --pairs phi2 "
                "with this judge)")
    order = list(BUNDLED_PAIRS) + sorted(k for k in pairs if k not in BUNDLED_PAIRS)
    parts = []
    for name in order:
        p = pairs.get(name)
        if p:
            parts.append(f"{name} {format_pct(p.get('agreement'))} (95% CI {format_pct(p.get('ci_low'))}-"
                         f"{format_pct(p.get('ci_high'))}, n={p.get('n')}, |margin|>={p.get('min_margin')}; "
                         f"length-only {format_pct(p.get('length_baseline'))})")
    return "agreement on system-vs-system pairs: " + "; ".join(parts)
