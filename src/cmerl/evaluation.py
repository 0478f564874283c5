"""The one-command trained-vs-base evaluation (``cmerl eval``): generate with both models, judge both
orders, win rate, report. Each step is resumable; :func:`ensure_outputs` and :func:`generator_label` are
shared with the other pipelines (comparison matrix, maths evaluation, held-out evaluation).

The checks of the judge and the reward are in :mod:`cmerl.checks`, win-rate summaries in
:mod:`cmerl.winrates`; the report is written by :mod:`cmerl.report`.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

from cmerl.generation import (
    GenerationConfig,
    generate_outputs,
    generator_fingerprint,
    load_generator,
    load_prompt_items,
    outputs_complete,
)
from cmerl.io import read_records, write_json_atomic
from cmerl.judging import DecisionRule, JudgeSpec, load_pairs, run_judge, verdicts_header
from cmerl.report import write_report
from cmerl.training.checkpoints import find_metrics, training_system_prompt
from cmerl.winrates import WinRateSummary, summarize_verdicts


# --------------------------------------------------------------------------- one-command evaluation
@dataclass
class EvalPlan:
    """``cmerl eval``: generate with ``trained`` and ``base`` on ``prompts``, judge trained (A) against base
    (B) with ``judge``, and write everything under ``output_dir``."""

    trained: str
    base: str
    judge: JudgeSpec
    prompts: str
    output_dir: Path
    generation: GenerationConfig
    rule: DecisionRule = field(default_factory=DecisionRule)
    seed: int = 0


def generator_label(name: str) -> str:
    """A short generator name for a model name or folder (the folder's name)."""
    p = Path(name).expanduser()
    return p.resolve().name if p.is_dir() else name


def ensure_outputs(name: str, items, output: Path, config, *, generator: str | None = None,
                   progress: bool = False) -> list[dict]:
    """Generate ``output`` for ``items`` with model ``name`` unless it is already complete (resumable)."""
    label = generator or generator_label(name)
    what = generator_fingerprint(name)  # what the weights are: a resume with other weights is refused
    if outputs_complete(output, items, generator=label, config=config, model_fingerprint=what):
        rows, _ = read_records(output)
        return [r for _, r in rows]
    model, tok = load_generator(name, dtype=config.dtype)
    try:
        return generate_outputs(model, tok, items, output, generator=label, config=config, progress=progress,
                                model_fingerprint=what)
    finally:
        del model
        gc.collect()


def run_eval(plan: EvalPlan, *, progress: bool = True, log=print) -> WinRateSummary:
    """Run the whole evaluation (each step resumable) and return the win-rate summary."""
    out = Path(plan.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = load_prompt_items(plan.prompts)
    trained_prompt = training_system_prompt(plan.trained)
    if trained_prompt and trained_prompt != plan.generation.system_prompt:
        log(f"note: {plan.trained} was trained with the system prompt {trained_prompt!r}; both models are "
            f"evaluated with {plan.generation.system_prompt!r} (pass --system-prompt to change that)")
    paths = {"trained": out / "outputs_trained.json", "base": out / "outputs_base.json"}
    for role, name in (("trained", plan.trained), ("base", plan.base)):
        log(f"[1/3] generating {len(items)} outputs with the {role} model {name} -> {paths[role]}")
        ensure_outputs(name, items, paths[role], plan.generation, progress=progress)
    log(f"[2/3] judging with {plan.judge.name} (both orders) -> {out / 'verdicts.jsonl'}")
    judge = plan.judge.build()
    try:
        pairs, warnings = load_pairs(paths["trained"], paths["base"])
        for w in warnings:
            log(f"warning: {w}")
        header = verdicts_header(judge, plan.rule, judge.prompt,
                                 a={"path": str(paths["trained"]), "generator": generator_label(plan.trained)},
                                 b={"path": str(paths["base"]), "generator": generator_label(plan.base)})
        run_judge(judge, pairs, out / "verdicts.jsonl", rule=plan.rule, header=header, progress=progress)
    finally:
        if hasattr(judge, "close"):
            judge.close()
        del judge
        gc.collect()
    summary = summarize_verdicts(out / "verdicts.jsonl", seed=plan.seed)
    write_json_atomic(out / "winrate.json", summary.to_dict())
    log("[3/3] writing the report")
    write_report(out, metrics=find_metrics(plan.trained))
    return summary
