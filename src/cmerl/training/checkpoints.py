"""Checkpoint folders (a marker file written last says a checkpoint is complete), ``metrics.jsonl``
trimming on resume, the run card with its reward curve, and what an evaluation reads from a run folder
(its ``metrics.jsonl``, the system prompt it was trained with)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cmerl.io import iter_jsonl, write_text_atomic
from cmerl.plots import CurvePanel, plot_curves
from cmerl.training.config import (
    CHECKPOINT_PREFIX,
    CONFIG_NAME,
    CURVE_NAME,
    MARKER_NAME,
    METRICS_NAME,
    RUN_CARD_NAME,
    TrainConfig,
    config_to_yaml,
    describe_run,
    guard_summary,
    resolved_dtypes,
    reward_source,
)

#: What the run card of each method plots and tabulates (GRPO: the rewards; the baselines log no reward).
CURVE_METRICS = {
    "dpo": ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"),
    "distill": ("loss", "mean_token_accuracy", "num_tokens"),
}


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    try:
        return int(name[len(CHECKPOINT_PREFIX):])
    except ValueError:
        return None


def is_complete_checkpoint(path: Path) -> bool:
    """True when the checkpoint's marker exists and names its step (the marker is written last)."""
    marker = path / MARKER_NAME
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return data.get("step") == checkpoint_step(path) and (path / "trainer_state.json").is_file()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """``(step, path, complete)`` of every ``checkpoint-N`` folder, by step."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        step = checkpoint_step(p)
        if step is not None and p.is_dir():
            out.append((step, p, is_complete_checkpoint(p)))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step; partially written ones are ignored."""
    complete = [p for _, p, ok in list_checkpoints(run_dir) if ok]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Delete checkpoint folders without a valid marker (left by a killed run); returns what was removed."""
    removed = []
    for _, p, ok in list_checkpoints(run_dir):
        if not ok:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def truncate_metrics(path: Path, max_step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` with ``step <= max_step`` (rewritten atomically); returns rows kept."""
    if not path.is_file():
        return 0
    rows = [r for r in iter_jsonl(path) if r.get("step", 0) <= max_step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


# ------------------------------------------------------------------------------------------ run folders
def find_metrics(run_dir: str | Path) -> Path | None:
    """``metrics.jsonl`` of a training run folder (itself or one level down), if any."""
    p = Path(run_dir).expanduser()
    if not p.is_dir():
        return None
    for cand in [p / METRICS_NAME, *sorted(p.glob(f"*/{METRICS_NAME}"))]:
        if cand.is_file():
            return cand
    return None


def training_system_prompt(run_dir: str | Path) -> str | None:
    """The ``system_prompt`` of a training run's ``cmerl_config.yaml``, if there is one."""
    cfg = Path(run_dir).expanduser() / CONFIG_NAME
    if not cfg.is_file():
        return None
    try:
        value = (yaml.safe_load(cfg.read_text()) or {}).get("system_prompt")
    except (yaml.YAMLError, AttributeError):
        return None
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------------------------------ run card
def reward_curve(log_history: Sequence[dict]) -> list[dict]:
    """Rows of ``log_history`` that carry a reward: step, reward, per-function means, diagnostics."""
    keep = ("reward", "reward_std", "completions/mean_length", "diagnostics/distinct_2",
            "diagnostics/repeated_4gram_share", "diagnostics/truncated_frac")
    rows = []
    for entry in log_history:
        if "reward" not in entry or "step" not in entry:
            continue
        row = {"step": entry["step"]}
        row.update({k: entry[k] for k in entry if k in keep or (k.startswith("rewards/") and k.endswith("/mean"))})
        rows.append(row)
    return rows


def plot_reward_curve(rows: Sequence[dict], path: Path) -> bool:
    """PNG of reward and per-function means (``rows`` of :func:`reward_curve`) against step, one panel;
    False (no file) when there is nothing to plot."""
    keys = ("reward", *sorted({k for r in rows for k in r if k.startswith("rewards/")}))
    return plot_curves(rows, [CurvePanel(keys, ylabel="reward")], path, panel_size=(6, 3.5), dpi=100)


def _table_cell(v: Any) -> str:
    """A value as a run-card table cell: empty for None, 4 significant digits for a float, else str."""
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def baseline_curve(log_history: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """Rows of ``log_history`` that carry ``keys[0]`` (the dpo / distill loss): step and ``keys``."""
    return [{"step": e["step"], **{k: e[k] for k in keys if k in e}}
            for e in log_history if keys[0] in e and "step" in e]


def write_run_card(folder: Path, cfg: TrainConfig, log_history: Sequence[dict], *, step: int) -> None:
    """``run_card.md`` (+ ``reward_curve.png``) in ``folder``: what was trained, how, and the reward curve
    (for the dpo and distill baselines: the loss and their own metrics, :data:`CURVE_METRICS`)."""
    if cfg.method != "grpo":
        _write_baseline_card(folder, cfg, log_history, step=step)
        return
    rows = reward_curve(log_history)
    has_plot = plot_reward_curve(rows, folder / CURVE_NAME)
    cols = ["step", "reward"] + sorted({k for r in rows for k in r if k.startswith("rewards/")}) + [
        "completions/mean_length", "diagnostics/distinct_2", "diagnostics/repeated_4gram_share"]
    shown = rows if len(rows) <= 25 else [rows[round(i * (len(rows) - 1) / 24)] for i in range(25)]
    tuning = f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha}" if cfg.lora else "full fine-tune"
    dtypes = resolved_dtypes(cfg)
    weights = cfg.reward_weights or [1.0] * len(cfg.rewards)
    reward_desc = " + ".join(f"{w:g} x {r}" for w, r in zip(weights, cfg.rewards))
    lines = [
        f"# cmerl GRPO run card: {Path(cfg.output_dir).name}, step {step}",
        "",
        f"- policy: `{cfg.policy}` ({tuning}; dtype {cfg.policy_dtype}: {dtypes['policy']})",
        f"- reward: {reward_desc}"
        + (f"; cme = {cfg.cme_signal} under {', '.join(f'`{v}`' for v in cfg.verifiers)} (dtype "
           f"{cfg.verifier_dtype}: {dtypes['verifier']})" if "cme" in cfg.rewards else "")
        + "".join(f"; {r}{reward_source(cfg, r, dtypes)}" for r in cfg.rewards if r != "cme"),
        "- repetition guard: " + guard_summary(cfg),
        f"- prompts: `{cfg.prompts}`, max {cfg.max_prompt_length} prompt tokens",
        (f"- GRPO: G={cfg.num_generations}, max_completion_length={cfg.max_completion_length}, "
         f"temperature={cfg.temperature}, lr={cfg.learning_rate:g}, beta={cfg.beta:g}, loss={cfg.loss_type}, "
         f"batch={cfg.per_device_train_batch_size}x{cfg.gradient_accumulation_steps}, "
         f"mask_truncated_completions={cfg.mask_truncated_completions}"),
        f"- steps: {step} of {cfg.max_steps}",
        "",
        "## Reward curve",
        "",
    ]
    if has_plot:
        lines += [f"![reward curve]({CURVE_NAME})", ""]
    if shown:
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in shown:
            lines.append("| " + " | ".join(_table_cell(r.get(c)) for c in cols) + " |")
    else:
        lines.append("(no logged steps yet)")
    lines += ["", "## Config", "", "```yaml", config_to_yaml(cfg).rstrip(), "```", ""]
    write_text_atomic(folder / RUN_CARD_NAME, "\n".join(lines))


def _write_baseline_card(folder: Path, cfg: TrainConfig, log_history: Sequence[dict], *, step: int) -> None:
    """The run card of a dpo or distill run: its plan (as ``cmerl train --check`` prints it), the curve of
    :data:`CURVE_METRICS` and the config."""
    keys = CURVE_METRICS[cfg.method]
    rows = baseline_curve(log_history, keys)
    plotted = [k for k in keys if any(r.get(k) is not None for r in rows)]  # one panel each, titled by key
    panels = [CurvePanel((k,), title=k, ylabel=cfg.method if n == 0 else "", legend=False)
              for n, k in enumerate(plotted)]
    has_plot = plot_curves(rows, panels, folder / CURVE_NAME, panel_size=(3.2, 3.0), dpi=100, title_fontsize=9)
    cols = ["step"] + [k for k in keys if any(k in r for r in rows)]
    shown = rows if len(rows) <= 25 else [rows[round(i * (len(rows) - 1) / 24)] for i in range(25)]
    title = {"dpo": "DPO", "distill": "distill (SFT on the verifier's answers)"}[cfg.method]
    lines = [f"# cmerl {title} run card: {Path(cfg.output_dir).name}, step {step}", "", "```",
             describe_run(cfg).rstrip(), "```", "", f"- steps: {step} of {cfg.max_steps}", "", "## Training curve", ""]
    if has_plot:
        lines += [f"![training curve]({CURVE_NAME})", ""]
    if shown:
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        lines += ["| " + " | ".join(_table_cell(r.get(c)) for c in cols) + " |" for r in shown]
    else:
        lines.append("(no logged steps yet)")
    lines += ["", "## Config", "", "```yaml", config_to_yaml(cfg).rstrip(), "```", ""]
    write_text_atomic(folder / RUN_CARD_NAME, "\n".join(lines))


