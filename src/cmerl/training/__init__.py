"""The GRPO recipe: a small config in, TRL's ``GRPOTrainer`` out, with CME rewards, logs and checkpoints.

Read top to bottom:

1. ``config`` — :class:`TrainConfig`, every knob of a run, documented; loaded from YAML with
   ``--set key=value`` overrides and checked (unknown keys, types, verifier == policy, missing prompt file)
   before any model loads. Fields named like ``GRPOConfig`` fields are passed to TRL unchanged; ``trl:``
   passes any other ``GRPOConfig`` field through. :func:`grpo_args` is the ``trl.GRPOConfig`` of a run.
2. ``reward_registry`` — :data:`REWARDS`, reward name -> factory (:func:`register_reward`); ``reward_setup``
   — :func:`build_scorer` / :func:`build_rewards`: the built-in rewards (CME, reverse-KL, self-referential
   baselines), each wrapped by :class:`GuardedReward` (per-step degeneration diagnostics), plus
   :class:`RepetitionGuardReward`, the repetition guard acting on the combined reward.
3. ``checkpoints`` — checkpoint folders, their completion marker, and the run card with the reward curve.
4. ``callbacks`` — ``metrics.jsonl``, a rich progress bar with ETA, and checkpoint finalisation (resolved
   config, run card, and the completion marker written last).
5. ``run`` — :func:`train`: build, (resume,) train, write ``final/``; ``method: dpo`` / ``distill`` build
   TRL's ``DPOTrainer`` / ``SFTTrainer`` instead (:func:`build_baseline_session`) with the same callbacks.
6. ``distill`` — the verifier's answers to the training prompts (resumable) and the SFT dataset of them.

Everything is re-exported here: ``from cmerl.training import TrainConfig, train``.

The GRPO loop itself is TRL's; nothing here re-implements it.

Run directory layout::

    RUN_DIR/cmerl_config.yaml        resolved config (what --resume reads)
    RUN_DIR/metrics.jsonl            one JSON object per logging step (TRL metric names + diagnostics)
    RUN_DIR/completions/*.parquet    TRL's completions table (log_completions)
    RUN_DIR/runs/                    TensorBoard events (when tensorboard is installed)
    RUN_DIR/checkpoint-N/            HF folder + optimizer state + cmerl_config.yaml + run_card.md +
                                     reward_curve.png + cmerl_checkpoint.json (marker, written last)
    RUN_DIR/final/                   the trained model (LoRA merged) + tokenizer + config + run card
    RUN_DIR/teacher_outputs.json     distill only: the verifier's answers (AlpacaEval outputs format)
"""

from cmerl.scoring.remote import REMOTE_OPTIONS, is_remote, parse_remote_spec
from cmerl.training.callbacks import (
    CheckpointFinalizer,
    MetricsLogger,
    RichProgress,
)
from cmerl.training.checkpoints import (
    checkpoint_step,
    find_metrics,
    is_complete_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    plot_reward_curve,
    remove_incomplete_checkpoints,
    reward_curve,
    training_system_prompt,
    truncate_metrics,
    write_run_card,
)
from cmerl.training.config import (
    CHECKPOINT_PREFIX,
    CONFIG_NAME,
    CURVE_NAME,
    GRPO_FIELDS,
    MARKER_NAME,
    METHODS,
    METRICS_NAME,
    RESUME_OVERRIDABLE,
    RUN_CARD_NAME,
    TEACHER_OUTPUTS_NAME,
    ConfigError,
    RunDirExistsError,
    StatusPrinter,
    TrainConfig,
    apply_overrides,
    config_fields,
    config_from_dict,
    config_reference,
    config_template,
    config_to_yaml,
    default_report_to,
    describe_run,
    dpo_args,
    grpo_args,
    load_config,
    sft_args,
    trainer_args,
    trl_reward_weights,
    uses_verifiers,
    validate,
)
from cmerl.training.reward_registry import (
    REWARDS,
    RewardContext,
    RewardEntry,
    get_reward,
    register_reward,
    reward_names,
)
from cmerl.training.reward_setup import (
    GuardedReward,
    RepetitionGuardReward,
    build_rewards,
    build_scorer,
    policy_render_config,
)
from cmerl.training.run import (
    TrainingSession,
    TrainResult,
    build_baseline_session,
    build_session,
    finish,
    lora_config,
    prepare_run_dir,
    prepare_teacher_outputs,
    read_run_config,
    save_final,
    start,
    train,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "CONFIG_NAME",
    "CURVE_NAME",
    "GRPO_FIELDS",
    "MARKER_NAME",
    "METHODS",
    "METRICS_NAME",
    "REMOTE_OPTIONS",
    "RESUME_OVERRIDABLE",
    "REWARDS",
    "RUN_CARD_NAME",
    "TEACHER_OUTPUTS_NAME",
    "CheckpointFinalizer",
    "ConfigError",
    "GuardedReward",
    "MetricsLogger",
    "RepetitionGuardReward",
    "RewardContext",
    "RewardEntry",
    "RichProgress",
    "RunDirExistsError",
    "StatusPrinter",
    "TrainConfig",
    "TrainResult",
    "TrainingSession",
    "apply_overrides",
    "build_baseline_session",
    "build_rewards",
    "build_scorer",
    "build_session",
    "checkpoint_step",
    "config_fields",
    "config_from_dict",
    "config_reference",
    "config_template",
    "config_to_yaml",
    "default_report_to",
    "describe_run",
    "dpo_args",
    "find_metrics",
    "finish",
    "get_reward",
    "grpo_args",
    "is_complete_checkpoint",
    "is_remote",
    "latest_checkpoint",
    "list_checkpoints",
    "load_config",
    "lora_config",
    "parse_remote_spec",
    "plot_reward_curve",
    "policy_render_config",
    "prepare_run_dir",
    "prepare_teacher_outputs",
    "read_run_config",
    "register_reward",
    "remove_incomplete_checkpoints",
    "reward_curve",
    "reward_names",
    "save_final",
    "sft_args",
    "start",
    "train",
    "trainer_args",
    "training_system_prompt",
    "trl_reward_weights",
    "truncate_metrics",
    "uses_verifiers",
    "validate",
    "write_run_card",
]
