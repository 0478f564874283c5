"""A markdown report with PNG figures from a training run folder or an evaluation results folder.

What it looks for in the folder (each part is optional; the report says what it did not find):

* ``metrics.jsonl`` (here or one folder down): one JSON object per logged training step with TRL metric
  names (``step``, ``reward``, ``rewards/<name>/mean``, ``completions/mean_length``, ...). Missing keys and
  non-numeric values are skipped. → reward and length curves.
* ``*verdicts*.jsonl`` (cmerl judge output): win / tie / loss bars with bootstrap intervals, and the length
  distributions of A and B.
* AlpacaEval outputs files written by ``cmerl generate`` (``*.json`` lists with ``generation``): length,
  truncation and repetition statistics per generator.
* ``judge_check*.json`` and ``reward_check*.json`` results (from ``cmerl judge-check`` / ``reward-check``).

Figures go to ``<folder>/figures/``; the report is ``<folder>/report.md`` unless told otherwise.
Matplotlib runs on the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cmerl.checks import RewardCheckResult
from cmerl.io import iter_jsonl, read_records, write_text_atomic
from cmerl.judging import read_verdicts
from cmerl.metrics import drift_stats, format_pct, rate
from cmerl.plots import CurvePanel, plot_curves, pyplot, save_figure
from cmerl.training.checkpoints import find_metrics
from cmerl.winrates import MatrixResult, agreement_text, length_controlled_text, summarize_verdicts

REWARD_KEYS = ("reward",)
LENGTH_KEYS = ("completions/mean_length", "completions/min_length", "completions/max_length",
               "diagnostics/completion_length_mean")
#: Fractions in [0, 1] that show degeneration (cmerl training diagnostics, TRL's clipped ratio).
DEGENERATION_KEYS = ("diagnostics/distinct_2", "diagnostics/repeated_4gram_share", "diagnostics/truncated_frac",
                     "completions/clipped_ratio")


@dataclass
class Report:
    """Where the report was written and which inputs it used."""

    path: Path
    figures: list[Path] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)

    @property
    def figure_dir(self) -> Path:
        return self.path.parent / "figures"

    def link(self, p: Path) -> str:
        """``p`` relative to the report's folder, as a markdown link target."""
        return Path(p).resolve().relative_to(self.path.parent.resolve()).as_posix()


def read_training_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl``: numeric values only, each with a ``step`` (``step``/``global_step``,
    else the row number). Torn or invalid lines are skipped."""
    rows = []
    for k, obj in enumerate(iter_jsonl(path)):
        if not isinstance(obj, dict):
            continue
        row = {key: float(v) for key, v in obj.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        row["step"] = row.get("step", row.get("global_step", float(k)))
        rows.append(row)
    return rows


def training_curves(rows: list[dict], figure: Path) -> tuple[Path | None, list[str]]:
    """Plot reward curves (``reward``, ``rewards/*/mean``), completion length curves and degeneration
    diagnostics (when logged); returns the figure path (``None`` when no plotted key exists) and the
    plotted keys."""
    keys = sorted({k for r in rows for k in r})
    reward_keys = [k for k in keys if k in REWARD_KEYS or (k.startswith("rewards/") and k.endswith("/mean"))]
    length_keys = [k for k in LENGTH_KEYS if k in keys]
    degen_keys = [k for k in DEGENERATION_KEYS if k in keys]
    panels = [CurvePanel(tuple(ks), title=title) for title, ks in (
        ("reward", reward_keys), ("completion length (tokens)", length_keys),
        ("degeneration (fractions)", degen_keys)) if ks]
    if not plot_curves(rows, panels, figure, markersize=3):
        return None, []
    return figure, [k for p in panels for k in p.keys]


def winrate_figure(summary, rows: list[dict], figure: Path, seed: int = 0) -> Path:
    """Bars of the win, tie and loss fractions of A (errors excluded), each with its bootstrap interval,
    and the tie-adjusted win rate with its interval."""
    judged = [r["verdict"] for r in rows if r["verdict"] != "error"]
    labels = ["win (A)", "tie", "loss (A)", "win rate\n(ties half)"]
    vals, los, his = [], [], []
    for v in ("a", "tie", "b"):
        r = rate([1.0 if x == v else 0.0 for x in judged], seed=seed)
        vals.append(r.value or 0.0)
        los.append(r.ci_low or 0.0)
        his.append(r.ci_high or 0.0)
    w = summary.winrate
    vals.append(w.win_rate or 0.0)
    los.append(w.ci_low or 0.0)
    his.append(w.ci_high or 0.0)
    fig, ax = pyplot().subplots(figsize=(6, 3.8))
    err = [[v - lo for v, lo in zip(vals, los)], [hi - v for v, hi in zip(vals, his)]]
    ax.bar(labels, vals, color=["#4c72b0", "#999999", "#c44e52", "#55a868"], yerr=err, capsize=5)
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of judged pairs")
    a = summary.a.get("generator") or "A"
    b = summary.b.get("generator") or "B"
    ax.set_title(f"{a} vs {b} (n={w.n}, judge {summary.judge})", fontsize=9)
    return save_figure(fig, figure)


def length_histogram(series: Sequence[tuple[str, Sequence[float]]], figure: Path, *,
                     center: Literal["mean", "median"] = "mean", noun: str = "response", alpha: float = 0.5) -> Path:
    """Overlaid histograms of lengths in characters, one per ``(label, lengths)`` series, on 20 equal bins
    from 0 to the longest length (at least 1).

    center: what each legend entry states, rounded: the series' ``mean`` or its ``median`` (the upper
    one for an even count); 0 for an empty series. noun: what was measured, for the axis labels
    ("response" gives "response length (characters)" and "responses"). alpha: bar opacity."""
    fig, ax = pyplot().subplots(figsize=(6, 3.8))
    hi = max([1.0, *[x for _, lens in series for x in lens]])
    bins = [hi * k / 20 for k in range(21)]
    for label, lens in series:
        if center == "mean":
            value = sum(lens) / max(1, len(lens))
        else:
            value = sorted(lens)[len(lens) // 2] if lens else 0
        ax.hist(lens, bins=bins, alpha=alpha, label=f"{label} ({center} {value:.0f})")
    ax.set_xlabel(f"{noun} length (characters)")
    ax.set_ylabel(f"{noun}s")
    ax.legend(fontsize=8)
    return save_figure(fig, figure)


def _is_outputs_file(path: Path) -> list[dict] | None:
    try:
        rows, _ = read_records(path)
    except (ValueError, OSError, UnicodeDecodeError):
        return None
    objs = [r for _, r in rows]
    if objs and all(isinstance(r, dict) and "instruction" in r and "output" in r for r in objs):
        return objs
    return None


def write_report(directory: str | Path, *, output: str | Path | None = None, metrics: str | Path | None = None,
                 seed: int = 0, outputs: Sequence[str | Path] = ()) -> Report:
    """Write ``report.md`` (and figures) for a run or results folder; see the module docstring.

    ``output``: a ``.md`` path, or a folder that gets ``report.md``; figures go to ``figures/`` beside the
    report. Default: ``directory/report.md``. ``outputs``: more outputs files (anywhere) for the drift table."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"report folder not found: {d}")
    out = Path(output).expanduser() if output else d / "report.md"
    if out.suffix.lower() != ".md":
        out = out / "report.md"
    rep = Report(out)
    lines = [f"# cmerl report: {d.resolve().name}", ""]
    missing = []
    verdicts = _verdicts_section(d, rep, seed)
    if verdicts is None:
        missing.append("no `*verdicts*.jsonl` (run `cmerl judge` or `cmerl eval`)")
    lines += _matrix_section(d, rep) + (verdicts or []) + _outputs_section(d, rep, outputs) + _checks_section(d, rep)
    mpath = Path(metrics) if metrics else find_metrics(d)
    if mpath and Path(mpath).is_file():
        lines += _training_section(Path(mpath), rep)
    else:
        missing.append("no `metrics.jsonl` (a training run writes one)")
    if missing:
        lines += ["## Not found", ""] + [f"- {m}" for m in missing] + [""]
    write_text_atomic(out, "\n".join(lines))
    return rep


def _verdicts_section(d: Path, rep: Report, seed: int) -> list[str] | None:
    """Win rate table and figures of each ``*verdicts*.jsonl`` in ``d``; None when there is none."""
    verdict_files = sorted(d.glob("*verdicts*.jsonl"))
    if not verdict_files:
        return None
    lines = ["## Pairwise evaluation", ""]
    for vf in verdict_files:
        try:
            summary = summarize_verdicts(vf, seed=seed)
        except ValueError as exc:
            lines += [f"- `{vf.name}`: skipped ({exc})", ""]
            continue
        _, rows = read_verdicts(vf)
        rep.inputs.append(vf)
        w = summary.winrate
        a = summary.a.get("generator") or "A"
        b = summary.b.get("generator") or "B"
        stem = vf.name.removesuffix(".jsonl").replace(".", "_")
        lines += [f"### {a} (A) vs {b} (B) — `{vf.name}`", "",
                  (f"Judge: **{summary.judge}** ({summary.judge_settings.get('kind')}, "
                   f"{summary.judge_settings.get('mode')} mode, tie threshold {summary.decision.get('threshold')} nats"
                   f"{', ties when orders disagree' if summary.decision.get('require_consistent') else ''}); "
                   f"{agreement_text(summary.agreement, summary.judge)}."), "",
                  ("| pairs judged | wins | ties | losses | errors (excluded) | win rate, ties half | 95% CI | "
                   "win rate w/o ties | position consistency | mean chars A | mean chars B |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|",
                  (f"| {w.n} | {w.wins} | {w.ties} | {w.losses} | {w.errors} | {format_pct(w.win_rate)} | "
                   f"{format_pct(w.ci_low)}-{format_pct(w.ci_high)} | {format_pct(w.win_rate_no_ties)} | "
                   f"{format_pct(w.consistency)} | {w.mean_len_a or 0:.0f} | {w.mean_len_b or 0:.0f} |"), "",
                  length_controlled_text(summary.length_controlled) + ".", ""]
        if w.n:
            f1 = winrate_figure(summary, rows, rep.figure_dir / f"{stem}_winrate.png", seed=seed)
            judged = [r for r in rows if r["verdict"] != "error" and r.get("len_a") is not None]
            f2 = length_histogram([(a, [r["len_a"] for r in judged]), (b, [r["len_b"] for r in judged])],
                                  rep.figure_dir / f"{stem}_lengths.png", center="mean", alpha=0.55)
            rep.figures += [f1, f2]
            lines += [f"![win / tie / loss]({rep.link(f1)})", "", f"![response lengths]({rep.link(f2)})", "",
                      "LLM judges favour longer responses; compare the lengths before reading the win rate.", ""]
    return lines


def _outputs_section(d: Path, rep: Report, extra: Sequence[str | Path] = ()) -> list[str]:
    """Drift statistics (:func:`cmerl.metrics.drift_stats`) of each AlpacaEval-format outputs file in ``d``
    and of the ``extra`` files, with a figure of the diversity and degeneration fractions and one of the
    length distributions."""
    found = [(p, rows) for p in sorted(d.glob("*.json")) if (rows := _is_outputs_file(p))]
    for e in extra:
        rows = _is_outputs_file(Path(e))
        if rows is None:
            raise ValueError(f"{e} is not an AlpacaEval outputs file (a list of objects with instruction and output)")
        found.append((Path(e), rows))
    if not found:
        return []
    lines = ["## Generated outputs: length and drift", "",
             ("| file | generator | n | mean chars | median chars | std chars | mean words | distinct-1 | distinct-2 | "
              "self-BLEU | repeated 4-grams | empty | stopped at max length |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    stats = []
    for p, rows in found:
        rep.inputs.append(p)
        reasons = [r.get("finish_reason") for r in rows]
        st = drift_stats([str(r.get("output", "")) for r in rows],
                         finish_reasons=reasons if any(x is not None for x in reasons) else None)
        label = str(rows[0].get("generator", p.stem))
        stats.append((label, st, [len(str(r.get("output", ""))) for r in rows]))
        sb = "n/a" if st["self_bleu"] is None else f"{st['self_bleu']:.1f}"
        lines.append(f"| `{p.name}` | {label} | {st['n']} | {st['chars_mean']:.0f} | {st['chars_median']:.0f} | "
                     f"{st['chars_std']:.0f} | {st['words_mean']:.0f} | {format_pct(st['distinct_1'])} | "
                     f"{format_pct(st['distinct_2'])} | {sb} | {format_pct(st['repeated_4gram_share'])} | "
                     f"{format_pct(st['empty_frac'])} | {format_pct(st['truncated_frac'])} |")
    lines += ["", ("distinct-n: unique word n-grams / all word n-grams over the file; self-BLEU: sacrebleu sentence "
                   "BLEU (0-100) of each output against the others (100 sampled outputs at most): higher means the "
                   "outputs look alike; repeated 4-grams: share of a text's word 4-grams seen earlier in it, mean "
                   "over texts.")]
    f1 = drift_figure(stats, rep.figure_dir / "outputs_drift.png")
    f2 = length_histogram([(label, lens) for label, _, lens in stats], rep.figure_dir / "outputs_lengths.png",
                          center="median", noun="output")
    rep.figures += [f1, f2]
    lines += ["", f"![drift statistics]({rep.link(f1)})", "", f"![output lengths]({rep.link(f2)})"]
    gen = found[0][1][0].get("generation")
    if gen:
        lines += ["", f"Generation settings: `{json.dumps(gen, sort_keys=True)}`"]
    return lines + [""]


def drift_figure(stats: list[tuple[str, dict, list[int]]], figure: Path) -> Path:
    """Grouped bars per outputs file: distinct-1, distinct-2, self-BLEU / 100, repeated 4-gram share, empty
    and truncated fractions (all in [0, 1])."""
    keys = [("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("self_bleu", "self-BLEU/100"),
            ("repeated_4gram_share", "rep. 4-grams"), ("empty_frac", "empty"), ("truncated_frac", "truncated")]
    fig, ax = pyplot().subplots(figsize=(max(6, 1.4 * len(keys)), 3.8))
    width = 0.8 / max(1, len(stats))
    for k, (label, st, _) in enumerate(stats):
        vals = [((st[key] or 0.0) / (100 if key == "self_bleu" else 1)) for key, _ in keys]
        ax.bar([x + k * width for x in range(len(keys))], vals, width=width, label=label)
    ax.set_xticks([x + width * (len(stats) - 1) / 2 for x in range(len(keys))], [name for _, name in keys])
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction")
    ax.legend(fontsize=8)
    return save_figure(fig, figure)


def _matrix_section(d: Path, rep: Report) -> list[str]:
    """The comparison matrix of ``cmerl eval`` with several systems (``matrix.json``), if there is one."""
    path = d / "matrix.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        result = MatrixResult(**data)
    except (ValueError, TypeError):
        return []
    rep.inputs.append(path)
    lines = ["## Comparison matrix", "", (f"Win rate of the row system over the column system (ties count half), "
                                          f"mean over the judges {', '.join(result.judges)}; per-pair reports under "
                                          "`pairs/`."), "",
             result.table(), ""]
    for p in result.pairs:
        folder = Path(p["folder"])
        if (folder / "report.md").is_file():
            lines.append(f"- [{p['a']} vs {p['b']}]({rep.link(folder / 'report.md')})")
    return lines + [""]


def _checks_section(d: Path, rep: Report) -> list[str]:
    """Tables of the ``judge_check*.json`` and ``reward_check*.json`` results under ``d``; other JSON
    files with those names are skipped."""
    lines = []
    for p in sorted(d.glob("**/judge_check*.json")):
        try:
            res = json.loads(p.read_text())
            ag, cons, lb = res["agreement"], res["consistency"], res["length_baseline"]
        except (ValueError, KeyError, TypeError):
            continue
        rep.inputs.append(p)
        lines += [f"## Judge check: {res['judge']} (`{p.relative_to(d)}`)", "",
                  ("| pairs | agreement with GPT-4 Turbo | 95% CI | ties | errors | position consistency | "
                   "length-only baseline |"), "|---|---|---|---|---|---|---|",
                  (f"| {res['n']} | {format_pct(ag['value'])} | {format_pct(ag['ci_low'])}-{format_pct(ag['ci_high'])} | "
                   f"{res['ties']} | {res['errors']} | {format_pct(cons['value'])} | {format_pct(lb['value'])} |"), ""]
    for p in sorted(d.glob("**/reward_check*.json")):
        try:
            res = RewardCheckResult.from_dict(json.loads(p.read_text()))
        except (ValueError, KeyError, TypeError):
            continue
        rep.inputs.append(p)
        lines += [f"## Reward check: {res.verifier} (`{p.relative_to(d)}`, {res.n} pairs)", "", res.table(), ""]
    return lines


def _training_section(mpath: Path, rep: Report) -> list[str]:
    """Reward and length curves of a training run's ``metrics.jsonl``, with first and last values."""
    rows = read_training_metrics(mpath)
    fig, keys = training_curves(rows, rep.figure_dir / "training_curves.png")
    rep.inputs.append(mpath)
    lines = ["## Training", "", f"{len(rows)} logged steps from `{mpath}`.", ""]
    if not fig:
        return lines + ["No reward or length metrics in it.", ""]
    rep.figures.append(fig)
    lines += [f"![training curves]({rep.link(fig)})", "", "| metric | first | last |", "|---|---|---|"]
    for k in keys:
        first = next((r[k] for r in rows if k in r), None)
        final = next((r[k] for r in reversed(rows) if k in r), None)
        lines.append(f"| {k} | {first:.4g} | {final:.4g} |")
    return lines + ["", f"Last logged step: {rows[-1]['step']:.0f}.", ""]
