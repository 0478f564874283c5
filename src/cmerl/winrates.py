"""Win rates as numbers and as the lines every report prints.

* :func:`summarize_verdicts` / :class:`WinRateSummary`: a verdicts file summarised (win rate of A over B
  with its bootstrap interval, the length-controlled win rate, who judged and the judge's measured
  agreement with GPT-4 Turbo, :mod:`cmerl.agreement_registry`);
* :func:`agreement_text`, :func:`length_controlled_text`: the phrases reports and panels use for them;
* :class:`MatrixResult`: the win-rate matrix of several systems (``cmerl eval`` with more than two,
  :mod:`cmerl.comparison`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from cmerl.agreement_registry import lookup_agreement
from cmerl.calibration import pairs_text
from cmerl.judging import read_verdicts
from cmerl.length_control import length_controlled_win_rate
from cmerl.metrics import WinRate, format_pct, win_rate


@dataclass
class WinRateSummary:
    """A verdicts file summarised: the win rate of A over B, who judged, and how far to trust the judge."""

    winrate: WinRate
    judge: str
    judge_settings: dict
    decision: dict
    agreement: dict | None
    a: dict
    b: dict
    verdicts: str
    length_controlled: dict | None = None  # cmerl.length_control.LengthControlled.to_dict()

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """A few readable lines (what ``cmerl winrate`` prints)."""
        w = self.winrate
        name_a = self.a.get("generator") or self.a.get("path") or "A"
        name_b = self.b.get("generator") or self.b.get("path") or "B"
        lines = [f"A = {name_a}   vs   B = {name_b}   ({self.verdicts})",
                 f"judged pairs n={w.n}: wins {w.wins} / ties {w.ties} / losses {w.losses}; errors excluded: {w.errors}"]
        if w.n:
            lines.append(f"win rate of A (ties count half): {format_pct(w.win_rate)}  "
                         f"[{int(w.level * 100)}% bootstrap CI {format_pct(w.ci_low)}-{format_pct(w.ci_high)}]")
            lines.append(f"win rate without ties: {format_pct(w.win_rate_no_ties)}; "
                         f"position consistency of the judge: {format_pct(w.consistency)}")
            lines.append(f"mean length (chars): A {_whole_number(w.mean_len_a)}, B {_whole_number(w.mean_len_b)}")
            lines.append(length_controlled_text(self.length_controlled))
        lines.append(f"judge: {self.judge} ({self.judge_settings.get('kind', '?')}, "
                     f"{self.judge_settings.get('mode', '?')}); {agreement_text(self.agreement, self.judge)}")
        return "\n".join(lines)


def length_controlled_text(lc: dict | None) -> str:
    """One line with the length-controlled win rate beside the raw one (or why there is none)."""
    if not lc:
        return "length-controlled win rate: not computed"
    if lc.get("win_rate") is None:
        return f"length-controlled win rate: n/a ({lc.get('note', '')})"
    return (f"length-controlled win rate of A: {format_pct(lc['win_rate'])}  [{format_pct(lc.get('ci_low'))}-"
            f"{format_pct(lc.get('ci_high'))}, bootstrap {lc.get('n_boot')}]; raw {format_pct(lc.get('raw'))}; "
            f"length coefficient {lc.get('length_coef'):+.2f} (positive: the judge favoured longer answers)")


def agreement_text(agreement: dict | None, judge: str) -> str:
    """One phrase stating a judge's measured agreement with GPT-4 Turbo, or that it is unknown."""
    if not agreement or agreement.get("agreement") is None:
        easy = (f"agreement with GPT-4 Turbo not measured for this judge setup (run: cmerl judge-check "
                f"--judge {judge})")
    else:
        easy = (f"agreement with GPT-4 Turbo {format_pct(agreement.get('agreement'))} (95% CI "
                f"{format_pct(agreement.get('ci_low'))}-{format_pct(agreement.get('ci_high'))}, n={agreement.get('n')}, "
                f"{agreement.get('source', 'judge-check')}, {agreement.get('measured', '')}; length-only baseline "
                f"{format_pct(agreement.get('length_baseline'))})")
    return f"{easy}; {pairs_text(agreement)}"


def summarize_verdicts(path: str | Path, *, n_boot: int = 10_000, seed: int = 0) -> WinRateSummary:
    """Win rate of a verdicts file (see :func:`cmerl.metrics.win_rate`) with the judge and its agreement."""
    header, rows = read_verdicts(path)
    if header is None:
        raise ValueError(f"{path} has no cmerl verdicts header (first line); was it written by cmerl judge?")
    wr = win_rate([r["verdict"] for r in rows], consistent=[r.get("consistent") for r in rows],
                  len_a=[r.get("len_a") for r in rows], len_b=[r.get("len_b") for r in rows],
                  n_boot=n_boot, seed=seed)
    lc = length_controlled_win_rate([r["verdict"] for r in rows], [r.get("len_a") for r in rows],
                                    [r.get("len_b") for r in rows], seed=seed)
    return WinRateSummary(wr, header["judge"]["name"], header["judge"]["settings"], header.get("decision", {}),
                          lookup_agreement(header), header.get("a", {}), header.get("b", {}), str(path),
                          length_controlled=lc.to_dict())


def _whole_number(x: float | None) -> str:
    """``x`` rounded to a whole number, or "n/a" for None (a mean length of no responses)."""
    return "n/a" if x is None else f"{x:.0f}"


@dataclass
class MatrixResult:
    """``win_rate[i][j]``: mean over judges of system i's win rate over system j (``None`` when not
    judged or no judge ran; diagonal ``None``); ``pairs``: per judged pair its folder and panel summary."""

    labels: list[str]
    win_rate: list[list[float | None]]
    length_controlled: list[list[float | None]]
    pairs: list[dict] = field(default_factory=list)
    judges: list[str] = field(default_factory=list)
    prompts: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The markdown matrix: win rate of the row system over the column system, ties counting half."""
        head = "| row beats column | " + " | ".join(self.labels) + " |"
        lines = [head, "|---|" + "---|" * len(self.labels)]
        for i, a in enumerate(self.labels):
            cells = ["—" if i == j else format_pct(self.win_rate[i][j]) for j in range(len(self.labels))]
            lines.append(f"| **{a}** | " + " | ".join(cells) + " |")
        return "\n".join(lines)
