"""TRL trainer callbacks: ``metrics.jsonl`` rows, checkpoint finalisation, a rich progress bar."""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback

from cmerl.io import append_jsonl, write_json_atomic
from cmerl.training.checkpoints import write_run_card
from cmerl.training.config import (
    CHECKPOINT_PREFIX,
    CONFIG_NAME,
    CURVE_NAME,
    MARKER_NAME,
    METRICS_NAME,
    RUN_CARD_NAME,
    StatusPrinter,
    TrainConfig,
    config_to_yaml,
)


def _trainer_callback_base():

    return TrainerCallback


class MetricsLogger(_trainer_callback_base()):
    """Appends each logging step's metrics to ``RUN_DIR/metrics.jsonl`` (main process only, fsynced).

    Rows are ``{"step", "epoch", "time", <TRL metric names>...}``; the end-of-training summary
    (``train_runtime`` ...) goes to ``RUN_DIR/train_summary.json`` instead.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_NAME

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return

        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in logs.items()}
        if "train_runtime" in logs:
            write_json_atomic(self.path.parent / "train_summary.json", {"step": state.global_step, **clean})
            return
        append_jsonl(self.path, [{"step": state.global_step, "epoch": state.epoch, "time": time.time(), **clean}])


class CheckpointFinalizer(_trainer_callback_base()):
    """After the trainer writes ``checkpoint-N``: add the resolved config and the run card, then the marker
    ``cmerl_checkpoint.json`` (atomically, last). A checkpoint without the marker is never resumed from."""

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return

        ckpt = self.run_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if not ckpt.is_dir():
            return
        (ckpt / CONFIG_NAME).write_text(config_to_yaml(self.cfg), encoding="utf-8")
        write_run_card(ckpt, self.cfg, state.log_history, step=state.global_step)
        for name in (RUN_CARD_NAME, CURVE_NAME):
            if (ckpt / name).is_file():
                shutil.copyfile(ckpt / name, self.run_dir / name)
        _fsync_tree(ckpt)
        write_json_atomic(ckpt / MARKER_NAME, {"step": state.global_step, "time": time.time(),
                                               "files": sorted(p.name for p in ckpt.iterdir())})


def _fsync_tree(folder: Path) -> None:
    """Flush the folder's files to disk so the marker never lands before their content."""
    for p in folder.rglob("*"):
        if p.is_file():
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass


class RichProgress(_trainer_callback_base()):
    """A rich progress bar (steps, elapsed, ETA) plus one line per logging step with the key metrics;
    ``label`` names the method on the bar (GRPO, DPO, DISTILL)."""

    def __init__(self, print_status: StatusPrinter | None = None, *, label: str = "GRPO"):
        self.label = label
        self.progress = None
        self.task = None
        self.print_status = print_status
        self.console = None
        self._last_time = None
        self._last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[status]}"), console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, status="")
        self._last_time, self._last_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs or "train_runtime" in logs:
            return
        now = time.perf_counter()
        per_step = (now - self._last_time) / max(1, state.global_step - self._last_step)
        self._last_time, self._last_step = now, state.global_step
        parts = [f"step {state.global_step}/{state.max_steps}"]
        if logs.get("reward") is not None:
            parts.append(f"reward {logs['reward']:.3f}" + (f"±{logs['reward_std']:.2f}" if logs.get("reward_std") is not None else ""))
        elif logs.get("loss") is not None:  # the dpo and distill baselines log no reward
            parts.append(f"loss {logs['loss']:.4f}")
        for key, label, fmt in (("completions/mean_length", "len", ".0f"), ("diagnostics/distinct_2", "d2", ".2f"),
                                ("diagnostics/repeated_4gram_share", "rep4", ".2f"), ("cme/seconds", "cme", ".1f"),
                                ("rewards/accuracies", "pair acc", ".2f"), ("rewards/margins", "margin", ".3f"),
                                ("mean_token_accuracy", "token acc", ".3f")):
            if logs.get(key) is not None:
                parts.append(f"{label} {logs[key]:{fmt}}" + ("s" if key == "cme/seconds" else ""))
        parts.append(f"{per_step:.1f}s/step")
        line = " ".join(parts)
        key = "reward" if "reward" in logs else "loss"
        self.progress.update(self.task, status=f"{key} {logs.get(key, float('nan')):.3f}")
        self.console.print(line)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


