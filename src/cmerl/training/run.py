"""Build, (resume,) train and save a run: the ``trl.GRPOConfig`` of a config, the trainer session, the
``final/`` folder."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from cmerl import models  # module attribute calls: tests spy on models.load_model
from cmerl.data import load_preference_set, load_prompt_set, to_dataset, to_preference_dataset
from cmerl.io import write_text_atomic
from cmerl.training.callbacks import CheckpointFinalizer, MetricsLogger, RichProgress
from cmerl.training.checkpoints import (
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    remove_incomplete_checkpoints,
    truncate_metrics,
    write_run_card,
)
from cmerl.training.config import (
    CONFIG_NAME,
    MARKER_NAME,
    METRICS_NAME,
    RESUME_OVERRIDABLE,
    RunDirExistsError,
    StatusPrinter,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_yaml,
    grpo_args,
    trainer_args,
    validate,
)
from cmerl.training.distill import ensure_teacher_outputs, teacher_dataset
from cmerl.training.reward_registry import REWARDS
from cmerl.training.reward_setup import build_rewards


# ------------------------------------------------------------------------------------------- the run
@dataclass
class TrainingSession:
    """Everything a built run holds: the TRL trainer and what went into it."""

    cfg: TrainConfig
    run_dir: Path
    trainer: Any
    policy: Any
    tokenizer: Any
    prompt_set: Any
    rewards: list[Any]  # TRL reward callables (GRPO); empty for the dpo and distill baselines
    resume_from: Path | None = None

    @property
    def is_main_process(self) -> bool:
        return bool(self.trainer.is_world_process_zero())

    def verifier(self):
        """The first cme verifier, or None when the run has no cme reward."""
        for r in self.rewards:
            if r.__name__ == "cme":
                return r.reward.scorers[0]
        return None


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    last_checkpoint: Path | None
    global_step: int
    metrics_path: Path


def _main_process() -> bool:
    from accelerate import PartialState  # deferred: accelerate (slow import, loaded only when used)

    return PartialState().is_main_process


def _wait_for_everyone() -> None:
    from accelerate import PartialState  # deferred: accelerate (slow import, loaded only when used)

    PartialState().wait_for_everyone()


def prepare_run_dir(cfg: TrainConfig, *, resume: bool, print_status: StatusPrinter | None = None) -> Path | None:
    """Check the run directory and return the checkpoint to resume from (None = from step 0).

    New run: refuses a directory that already holds checkpoints or metrics (:class:`RunDirExistsError`).
    Resume: removes checkpoint folders without a marker and trims ``metrics.jsonl`` to the checkpoint's step.
    Writes ``cmerl_config.yaml``. Only the main process writes; all processes return the same checkpoint.
    """
    run_dir = Path(cfg.output_dir)
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(run_dir)
    elif run_dir.is_dir() and (list_checkpoints(run_dir) or (run_dir / METRICS_NAME).exists()):
        raise RunDirExistsError(
            f"{run_dir} already holds a run (checkpoints or {METRICS_NAME}); continue it with "
            f"`cmerl train --resume {run_dir}`, or choose another directory (--set output_dir=...)")
    _wait_for_everyone()
    if _main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            for p in remove_incomplete_checkpoints(run_dir):
                if print_status:
                    print_status(f"removed incomplete checkpoint {p} (no {MARKER_NAME} marker)")
            truncate_metrics(run_dir / METRICS_NAME, checkpoint_step(ckpt) if ckpt else 0)
        write_text_atomic(run_dir / CONFIG_NAME, config_to_yaml(cfg))
    _wait_for_everyone()
    return ckpt


def build_session(cfg: TrainConfig, *, resume_from: Path | None = None, progress: bool = False,
                  print_status: StatusPrinter | None = None) -> TrainingSession:
    """Load tokenizer, prompts, policy and verifiers, and build the ``GRPOTrainer`` with cmerl's callbacks
    (``method: dpo`` / ``distill``: the baseline's trainer, see :func:`build_baseline_session`)."""
    # deferred: accelerate / trl (slow imports, loaded only when used)
    from accelerate import PartialState
    from trl import GRPOTrainer

    if cfg.method != "grpo":
        return build_baseline_session(cfg, resume_from=resume_from, progress=progress, print_status=print_status)
    args = grpo_args(cfg)
    state = PartialState()
    rank = f"(rank {state.process_index} of {state.num_processes}) " if state.num_processes > 1 else ""

    def emit_status(text: str, *, every_rank: bool = False) -> None:
        if print_status is not None and (every_rank or state.is_main_process):
            print_status(rank + text if every_rank else text)

    tokenizer = models.load_tokenizer(cfg.policy)
    prompt_set = load_prompt_set(cfg.prompts, tokenizer, column=cfg.prompt_column, split=cfg.prompt_split,
                                 max_prompt_length=cfg.max_prompt_length, max_prompts=cfg.max_prompts,
                                 heldout=cfg.heldout_prompts, system_prompt=cfg.system_prompt,
                                 answer_column=cfg.answer_column)
    emit_status(prompt_set.summary())
    split = None
    if cfg.heldout_eval_steps:  # checked before any model loads: an overlapping split is refused
        # deferred: torch, via cmerl.training.heldout (slow import, loaded only when used)
        from cmerl.training.heldout import heldout_split

        split = heldout_split(cfg, prompt_set.prompts, prompt_set.heldout)
        emit_status(f"held-out evaluation every {cfg.heldout_eval_steps} steps on {len(split.instructions)} prompts of "
            f"{split.name} (judge {cfg.heldout_eval_judge}); best/ keeps the best win rate vs step 0")
    dataset = to_dataset(prompt_set, tokenizer, cfg.system_prompt)
    emit_status(f"loading policy {cfg.policy} ...")
    policy, _ = models.load_model(cfg.policy, dtype=cfg.policy_dtype, trained=True, role="policy",
                           show_progress=progress)  # logs "policy <name>: <dtype> (<why>)"
    eos_ids = _eos_ids(policy, tokenizer)
    emit_status("loading reward models: " + ", ".join(
        (f"{r} <- {', '.join(cfg.verifiers)} ({cfg.verifier_dtype})" if r in REWARDS and REWARDS[r].uses_verifiers
         else r) for r in cfg.rewards), every_rank=True)
    rewards = build_rewards(cfg, policy, tokenizer, eos_ids=eos_ids)
    peft_config = lora_config(cfg)
    run_dir = Path(cfg.output_dir)
    callbacks = _callbacks(cfg, run_dir, progress=progress, print_status=print_status)
    if split is not None:
        # deferred: torch, via cmerl.training.heldout (slow import, loaded only when used)
        from cmerl.training.heldout import HeldOutEval

        callbacks.append(HeldOutEval(cfg, run_dir, split, tokenizer, print_status=print_status))
    trainer_cls, dense_kwargs = GRPOTrainer, {}
    if cfg.dense:  # per-token advantages (docs/training.md "Dense rewards")
        # deferred: torch, via cmerl.training.dense (slow import, loaded only when used)
        from cmerl.training.dense import DenseGRPOTrainer

        trainer_cls, dense_kwargs = DenseGRPOTrainer, {"advantage_estimator": cfg.advantage_estimator}
    with _reference_loadable(policy, cfg):
        trainer = trainer_cls(model=policy, reward_funcs=rewards, args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
                              **dense_kwargs)
    _remove_console_callbacks(trainer)
    return TrainingSession(cfg=cfg, run_dir=run_dir, trainer=trainer, policy=policy, tokenizer=tokenizer,
                           prompt_set=prompt_set, rewards=rewards, resume_from=resume_from)


@contextlib.contextmanager
def _reference_loadable(policy, cfg: TrainConfig):
    """While the trainer is built: with ``beta > 0`` and full fine-tuning, TRL loads its reference model with
    ``from_pretrained(policy.config._name_or_path)``, which ``load_model`` sets to cmerl's identity string
    (``folder:...``, ``packaged:...``); point it at the policy's local HF folder meanwhile, then restore it."""
    if cfg.beta == 0 or cfg.lora:
        yield
        return

    identity = policy.config._name_or_path
    policy.config._name_or_path = str(models.local_folder(cfg.policy))
    try:
        yield
    finally:
        policy.config._name_or_path = identity


def lora_config(cfg: TrainConfig):
    """The ``peft.LoraConfig`` of a ``lora: true`` run (None for full fine-tuning); every method uses it."""
    if not cfg.lora:
        return None
    from peft import LoraConfig  # deferred: peft (slow import, loaded only when used)

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")


def _callbacks(cfg: TrainConfig, run_dir: Path, *, progress: bool, print_status: StatusPrinter | None) -> list:
    """cmerl's trainer callbacks, the same for every method: metrics.jsonl, checkpoint finalisation, progress."""
    callbacks = [MetricsLogger(run_dir), CheckpointFinalizer(cfg, run_dir)]
    if progress:
        callbacks.append(RichProgress(print_status, label=cfg.method.upper()))
    return callbacks


def _remove_console_callbacks(trainer) -> None:
    """transformers' printer and tqdm callbacks: cmerl's progress bar and metrics.jsonl replace them."""

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def build_baseline_session(cfg: TrainConfig, *, resume_from: Path | None = None, progress: bool = False,
                           print_status: StatusPrinter | None = None) -> TrainingSession:
    """``method: dpo``: TRL's ``DPOTrainer`` on the prompt/chosen/rejected rows of ``cfg.prompts`` (the
    reference is a frozen copy of the initial policy; with LoRA, the base with the adapter disabled).
    ``method: distill``: TRL's ``SFTTrainer`` (completion-only loss) on ``RUN_DIR/teacher_outputs.json``
    (:func:`prepare_teacher_outputs` must have run). Both with the run's steps, batch, learning rate, LoRA,
    and the callbacks of a GRPO run: the same ``metrics.jsonl``, checkpoints, run cards and ``final/``."""
    # deferred: accelerate / trl (slow imports, loaded only when used)
    from trl import DPOTrainer, SFTTrainer

    args = trainer_args(cfg)
    is_main = _main_process()

    def emit_status(text: str) -> None:
        if print_status is not None and is_main:
            print_status(text)

    tokenizer = models.load_tokenizer(cfg.policy)
    if cfg.method == "dpo":
        prompt_set, pairs = load_preference_set(
            cfg.prompts, tokenizer, column=cfg.prompt_column, chosen_column=cfg.chosen_column,
            rejected_column=cfg.rejected_column, split=cfg.prompt_split, max_prompt_length=cfg.max_prompt_length,
            max_prompts=cfg.max_prompts, heldout=cfg.heldout_prompts, system_prompt=cfg.system_prompt)
        emit_status(f"{prompt_set.summary()}: {len(pairs)} preference pairs ({cfg.chosen_column} vs {cfg.rejected_column})")
        dataset = to_preference_dataset(pairs, tokenizer, cfg.system_prompt)
    else:
        prompt_set, dataset, counts = teacher_dataset(cfg, tokenizer)
        emit_status(f"{prompt_set.summary()}: {counts['answers']} teacher answers, {counts['cut']} cut to "
            f"{cfg.max_completion_length} policy tokens, {counts['length']} stopped by the verifier's token limit")
    emit_status(f"loading policy {cfg.policy} ...")
    policy, _ = models.load_model(cfg.policy, dtype=cfg.policy_dtype, trained=True, role="policy",
                           show_progress=progress)  # logs "policy <name>: <dtype> (<why>)"
    run_dir = Path(cfg.output_dir)
    peft_config = lora_config(cfg)
    callbacks = _callbacks(cfg, run_dir, progress=progress, print_status=print_status)
    if cfg.method == "dpo":
        # TRL would rebuild the reference from model.config's name, which for cmerl's model names (packaged
        # aliases, GGUF files) is no from_pretrained path: hand it a frozen copy of the initial weights.
        ref_model = None if cfg.lora else copy.deepcopy(policy).eval().requires_grad_(False)
        trainer = DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    else:
        trainer = SFTTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=callbacks)
    _remove_console_callbacks(trainer)
    return TrainingSession(cfg=cfg, run_dir=run_dir, trainer=trainer, policy=policy, tokenizer=tokenizer,
                           prompt_set=prompt_set, rewards=[], resume_from=resume_from)


def prepare_teacher_outputs(cfg: TrainConfig, *, progress: bool = False, print_status: StatusPrinter | None = None) -> None:
    """``method: distill``: generate whatever is missing of the verifier's answers (main process; the
    others wait), before the SFT session is built. A no-op for the other methods."""
    if cfg.method != "distill":
        return

    if _main_process():
        ensure_teacher_outputs(cfg, models.load_tokenizer(cfg.policy), progress=progress, print_status=print_status)
    _wait_for_everyone()


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    return ids


def save_final(session: TrainingSession) -> Path | None:
    """Write ``RUN_DIR/final``: the trained weights (LoRA merged into the base) + tokenizer + resolved config +
    run card, via a temporary folder renamed into place. Main process only; returns the path (None elsewhere)."""
    trainer = session.trainer
    if not session.is_main_process:
        return None
    run_dir = session.run_dir
    final = run_dir / "final"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".final.tmp-"))
    try:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
            trainer.model = model
        model.save_pretrained(str(tmp))
        session.tokenizer.save_pretrained(str(tmp))
        (tmp / CONFIG_NAME).write_text(config_to_yaml(session.cfg), encoding="utf-8")
        write_run_card(tmp, session.cfg, trainer.state.log_history, step=trainer.state.global_step)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = False,
          print_status: StatusPrinter | None = None) -> TrainResult:
    """Run (or, with ``resume=True``, continue) the GRPO run described by ``cfg``; see the module docstring.

    ``cfg`` must have passed :func:`validate`. Resuming continues from the last complete checkpoint in
    ``cfg.output_dir`` with the same data order and RNG state; from step 0 if there is none.
    """
    session = start(cfg, resume=resume, progress=progress, print_status=print_status)
    return finish(session, print_status=print_status)


def start(cfg: TrainConfig, *, resume: bool = False, progress: bool = False,
          print_status: StatusPrinter | None = None) -> TrainingSession:
    """Prepare the run directory and build the session (no training yet)."""
    ckpt = prepare_run_dir(cfg, resume=resume, print_status=print_status)
    if print_status and resume:
        print_status(f"resuming from {ckpt} (step {checkpoint_step(ckpt)})" if ckpt else
             f"no complete checkpoint in {cfg.output_dir}; starting from step 0")
    prepare_teacher_outputs(cfg, progress=progress, print_status=print_status)
    return build_session(cfg, resume_from=ckpt, progress=progress, print_status=print_status)


def finish(session: TrainingSession, *, print_status: StatusPrinter | None = None) -> TrainResult:
    """Train to ``max_steps`` (from the session's checkpoint, if any) and write ``final/``."""
    trainer = session.trainer
    trainer.train(resume_from_checkpoint=str(session.resume_from) if session.resume_from else None)
    final = save_final(session)
    _wait_for_everyone()
    result = TrainResult(run_dir=session.run_dir, final_dir=final, last_checkpoint=latest_checkpoint(session.run_dir),
                         global_step=trainer.state.global_step, metrics_path=session.run_dir / METRICS_NAME)
    if print_status and session.is_main_process:
        print_status(f"trained to step {result.global_step}; checkpoint {result.last_checkpoint}; final model {final}")
    return result


def read_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The resolved config saved in a run directory, with ``--resume``-safe overrides applied and validated."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a cmerl run directory (no {CONFIG_NAME})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    cfg = config_from_dict(data, source=str(path))
    if Path(cfg.output_dir).resolve() != Path(run_dir).resolve():
        cfg = TrainConfig(**{**asdict(cfg), "output_dir": str(run_dir)})  # the run directory was moved
    cfg = apply_overrides(cfg, overrides, source="--set", allowed=RESUME_OVERRIDABLE)
    validate(cfg, source=str(path))
    return cfg
