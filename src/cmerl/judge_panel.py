"""Several judges on the same pairs: one verdicts file per judge, per-judge win rates, and their mean.

The reference code averaged a second judge in and counted every failed call as a tie (its Claude rows
were all ties because the client was missing). Here a judge that cannot run, or stops with an
endpoint error, is reported as **failed** with its error and left out of the mean; within a judge an
unusable order is an error pair, excluded from that judge's win rate and counted (never a tie).
Each judge's line carries its own measured agreement with GPT-4 Turbo (easy pairs and system-vs-system
pairs, :func:`cmerl.winrates.agreement_text`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cmerl.io import name_slug
from cmerl.judging import DecisionRule, JudgeConnectionError, Pair, run_judge, verdicts_header
from cmerl.metrics import format_pct
from cmerl.models import ModelNotAvailableError
from cmerl.winrates import agreement_text, summarize_verdicts

PANEL_SUFFIX = ".panel.json"


def panel_paths(output: str | Path, names: Sequence[str]) -> list[Path]:
    """Verdicts file of each judge: ``output`` itself for one judge, else ``<stem>.<judge>.jsonl`` beside it."""
    out = Path(output)
    if len(names) == 1:
        return [out]
    slugs = [name_slug(n) for n in names]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"the same judge is given twice: {list(names)}")
    stem = out.name.removesuffix(".jsonl")
    return [out.with_name(f"{stem}.{s}.jsonl") for s in slugs]


@dataclass
class PanelMember:
    """One judge of a panel: its verdicts file, its summary (``cmerl.winrates.WinRateSummary.to_dict``)
    when it ran, and the error that stopped it otherwise."""

    name: str
    verdicts: str
    summary: dict | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.summary is not None and self.summary["winrate"]["n"] > 0


@dataclass
class PanelSummary:
    """Per-judge results and ``mean_win_rate``: the mean of the judges' win rates over the judges that
    ran (``None`` when none did); ``mean_length_controlled`` likewise."""

    members: list[PanelMember]
    mean_win_rate: float | None
    mean_length_controlled: float | None
    n_ok: int
    a: dict = field(default_factory=dict)
    b: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def failed(self) -> list[PanelMember]:
        return [m for m in self.members if not m.ok]

    def text(self) -> str:
        name_a = self.a.get("generator") or self.a.get("path") or "A"
        name_b = self.b.get("generator") or self.b.get("path") or "B"
        lines = [f"A = {name_a}   vs   B = {name_b}   ({len(self.members)} judges)"]
        for m in self.members:
            if m.error:
                lines.append(f"- judge {m.name}: FAILED ({m.error}); left out of the mean")
                continue
            s = m.summary or {}
            w = s.get("winrate", {})
            lc = (s.get("length_controlled") or {}).get("win_rate")
            if not w.get("n"):
                lines.append(f"- judge {m.name}: no judged pairs ({w.get('errors', 0)} errors); left out of the mean")
                continue
            lines.append(f"- judge {m.name}: win rate of A {format_pct(w['win_rate'])} [{format_pct(w['ci_low'])}-"
                         f"{format_pct(w['ci_high'])}], length-controlled {format_pct(lc)}; n={w['n']} "
                         f"(W {w['wins']} / T {w['ties']} / L {w['losses']}), errors excluded {w['errors']}; "
                         f"{agreement_text(s.get('agreement'), m.name)}")
        lines.append(f"mean over {self.n_ok} of {len(self.members)} judges: win rate {format_pct(self.mean_win_rate)}, "
                     f"length-controlled {format_pct(self.mean_length_controlled)}")
        return "\n".join(lines)


def run_panel(judges: Sequence[tuple[str, Callable[[], object]]], pairs: Sequence[Pair], output: str | Path, *,
              rule: DecisionRule = DecisionRule(), a: dict, b: dict, progress: bool = False,
              stop_after: int | None = None, seed: int = 0, log: Callable[[str], None] | None = None) -> PanelSummary:
    """Judge ``pairs`` with each ``(name, build)`` in turn (one judge loaded at a time, released after) into
    the files of :func:`panel_paths`, resumably, and summarise. A judge whose build or run raises
    :class:`JudgeConnectionError`, ``ValueError`` or ``ModelNotAvailableError`` is recorded as failed and the
    others still run; the rows it judged before failing stay in its file."""
    paths = panel_paths(output, [n for n, _ in judges])
    members = []
    for (name, build), path in zip(judges, paths):
        member = PanelMember(name, str(path))
        judge = None
        try:
            judge = build()
            header = verdicts_header(judge, rule, judge.prompt, a=a, b=b)
            run_judge(judge, pairs, path, rule=rule, header=header, progress=progress, stop_after=stop_after)
        except (JudgeConnectionError, ValueError, ModelNotAvailableError, FileNotFoundError) as exc:
            member.error = str(exc)
            if log:
                log(f"judge {name} failed: {exc}")
        finally:
            if judge is not None and hasattr(judge, "close"):
                judge.close()
            del judge
            gc.collect()
        if member.error is None:
            member.summary = summarize_verdicts(path, seed=seed).to_dict()
        members.append(member)
    ok = [m for m in members if m.ok]
    rates = [m.summary["winrate"]["win_rate"] for m in ok]  # type: ignore[index]
    lcs = [(m.summary.get("length_controlled") or {}).get("win_rate") for m in ok]  # type: ignore[union-attr]
    lcs = [x for x in lcs if x is not None]
    return PanelSummary(members, sum(rates) / len(rates) if rates else None,
                        sum(lcs) / len(lcs) if lcs and len(lcs) == len(ok) else None, len(ok), a, b)
