"""``cmerl eval`` with any number of systems: generate what is missing, judge every requested pair, and
write one matrix of win rates (row over column) plus a report per pair.

A *system* is one of (:func:`parse_system`):

* a model (a training run folder, a packaged alias, an HF folder or hub id): its outputs are generated
  on the prompt set (resumably, ``outputs_<label>.json``);
* an AlpacaEval outputs file (``.json``/``.jsonl`` with ``instruction`` and ``output``), e.g. another
  system's answers: its rows for the prompt set are used as they are (a missing prompt is an error);
* ``gpt4_1106_preview``: the bundled AlpacaEval 2.0 reference answers (GPT-4 Turbo, CC BY-NC 4.0).

``LABEL=SPEC`` names a system; otherwise the label is the folder/file name. Pairs: every pair of systems
(default), or only those with ``against`` (each system vs one baseline). Each pair (row system = A,
column system = B) is judged in both orders by every judge into ``pairs/<A>__vs__<B>/`` with its own
``report.md``; the matrix cell (A, B) is the mean over judges of A's tie-adjusted win rate, and (B, A)
is one minus it. ``matrix.json`` holds every number, ``matrix.md`` the table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cmerl.evaluation import ensure_outputs
from cmerl.generation import GenerationConfig, PromptItem, load_prompt_items
from cmerl.io import read_records, write_json_atomic, write_records, write_text_atomic
from cmerl.judge_panel import run_panel
from cmerl.judging import DecisionRule, load_pairs
from cmerl.metrics import format_pct
from cmerl.report import write_report
from cmerl.winrates import MatrixResult

BUNDLED_OUTPUTS = {"gpt4_1106_preview": "alpaca_eval_gpt4_1106_preview.json"}
MATRIX_JSON = "matrix.json"
MATRIX_MD = "matrix.md"


@dataclass(frozen=True)
class System:
    """``kind``: "model" (generate with ``source``) or "outputs" (read answers from the file ``source``)."""

    label: str
    kind: str
    source: str


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "system"


def parse_system(spec: str) -> System:
    """A :class:`System` from ``[LABEL=]SPEC`` (see module docstring). Raises ValueError on an empty spec."""
    label, sep, source = spec.partition("=")
    if not sep or "/" in label or not label:
        label, source = "", spec
    source = source.strip()
    if not source:
        raise ValueError(f"empty system spec {spec!r}")
    if source in BUNDLED_OUTPUTS:
        path = resources.files("cmerl").joinpath("data", BUNDLED_OUTPUTS[source])
        return System(_label(label or source), "outputs", str(path))
    p = Path(source).expanduser()
    if p.is_file() and p.suffix in (".json", ".jsonl"):
        return System(_label(label or p.stem), "outputs", str(p))
    name = p.resolve().name if p.is_dir() else source
    return System(_label(label or name), "model", source)


def outputs_for(system: System, items: Sequence[PromptItem], output: Path) -> Path:
    """Copy the rows of an outputs-file system for ``items`` (matched by instruction, in prompt order) to
    ``output``; raises ValueError naming how many prompts it lacks and the first of them."""
    rows, bad = read_records(system.source)
    if bad:
        raise ValueError(f"{system.source}: line {bad[0].line}: {bad[0].reason}")
    by_instr: dict[str, dict] = {}
    for line, r in rows:
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise ValueError(f"{system.source}: row {line} needs string 'instruction' and 'output'")
        by_instr.setdefault(r["instruction"], r)
    missing = [it.instruction for it in items if it.instruction not in by_instr]
    if missing:
        raise ValueError(f"system {system.label} ({system.source}) has no output for {len(missing)} of the "
                         f"{len(items)} prompts, e.g. {missing[0][:80]!r}")
    picked = [{**by_instr[it.instruction], "index": it.index,
               "generator": by_instr[it.instruction].get("generator") or system.label} for it in items]
    write_records(output, picked)
    return output


def requested_pairs(labels: Sequence[str], against: str | None = None) -> list[tuple[int, int]]:
    """Index pairs (row, column) to judge: every unordered pair in the given order, or with ``against``
    each other system (row) vs that one (column). Raises naming an unknown ``against`` or a repeated label."""
    if len(set(labels)) != len(labels):
        raise ValueError(f"two systems have the same label: {list(labels)}; name them LABEL=SPEC")
    if len(labels) < 2:
        raise ValueError(f"a comparison needs at least 2 systems (got {len(labels)})")
    if against is not None:
        if against not in labels:
            raise ValueError(f"--against {against!r} is not one of the systems {list(labels)}")
        j = labels.index(against)
        return [(i, j) for i in range(len(labels)) if i != j]
    return [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))]


def run_matrix(systems: Sequence[System], judges: Sequence[tuple[str, Callable[[], object]]], *, prompts: str,
               output_dir: str | Path, generation: GenerationConfig, rule: DecisionRule = DecisionRule(),
               against: str | None = None, seed: int = 0, progress: bool = True,
               log: Callable[[str], None] = print) -> MatrixResult:
    """Run the comparison (each step resumable; see module docstring) and return the matrix."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [s.label for s in systems]
    todo = requested_pairs(labels, against)
    items = load_prompt_items(prompts)
    paths: dict[str, Path] = {}
    for k, s in enumerate(systems):
        path = out / f"outputs_{s.label}.json"
        if s.kind == "outputs":
            log(f"[1/3] system {k + 1}/{len(systems)} {s.label}: answers from {s.source}")
            outputs_for(s, items, path)
        else:
            log(f"[1/3] system {k + 1}/{len(systems)} {s.label}: generating {len(items)} outputs with {s.source}")
            ensure_outputs(s.source, items, path, generation, generator=s.label, progress=progress)
        paths[s.label] = path
    n = len(systems)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    lc: list[list[float | None]] = [[None] * n for _ in range(n)]
    pair_results = []
    for k, (i, j) in enumerate(todo):
        a, b = labels[i], labels[j]
        folder = out / "pairs" / f"{a}__vs__{b}"
        folder.mkdir(parents=True, exist_ok=True)
        log(f"[2/3] pair {k + 1}/{len(todo)}: {a} (A) vs {b} (B) -> {folder}")
        pairs, warnings = load_pairs(paths[a], paths[b])
        for w in warnings:
            log(f"warning: {w}")
        panel = run_panel(judges, pairs, folder / "verdicts.jsonl", rule=rule, progress=progress, seed=seed,
                          a={"path": str(paths[a]), "generator": a}, b={"path": str(paths[b]), "generator": b},
                          log=log)
        write_json_atomic(folder / "panel.json", panel.to_dict())
        write_report(folder)
        if panel.mean_win_rate is not None:
            matrix[i][j], matrix[j][i] = panel.mean_win_rate, 1 - panel.mean_win_rate
        if panel.mean_length_controlled is not None:
            lc[i][j], lc[j][i] = panel.mean_length_controlled, 1 - panel.mean_length_controlled
        pair_results.append({"a": a, "b": b, "folder": str(folder), "panel": panel.to_dict()})
    result = MatrixResult(labels, matrix, lc, pair_results, [name for name, _ in judges], prompts)
    write_json_atomic(out / MATRIX_JSON, result.to_dict())
    write_text_atomic(out / MATRIX_MD, matrix_markdown(result))
    log("[3/3] writing the report")
    write_report(out)
    return result


def matrix_markdown(result: MatrixResult) -> str:
    """``matrix.md``: the win-rate matrix, the length-controlled one, and a line per pair with its judges."""
    lines = [f"# Comparison matrix ({result.prompts})", "",
             (f"Win rate of the row system over the column system (ties count half), mean over "
              f"{len(result.judges)} judge(s): {', '.join(result.judges)}. Each pair was judged in both orders."), "",
             result.table(), "", ("Length-controlled (logistic fit on the standardised length difference, at zero "
                                  "difference):"), ""]
    lc = MatrixResult(result.labels, result.length_controlled, result.length_controlled)
    lines += [lc.table(), "", "## Pairs", ""]
    for p in result.pairs:
        panel = p["panel"]
        failed = [m["name"] for m in panel["members"] if m.get("error")]
        lines.append(f"- {p['a']} vs {p['b']}: {format_pct(panel['mean_win_rate'])} over {panel['n_ok']} judge(s)"
                     + (f"; FAILED: {', '.join(failed)}" if failed else "")
                     + f" — `{Path(p['folder']).name}/report.md`")
    return "\n".join(lines) + "\n"
