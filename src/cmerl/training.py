"""The GRPO recipe: a small config in, TRL's ``GRPOTrainer`` out, with CME rewards, logs and checkpoints.

Read top to bottom:

1. :class:`TrainConfig` — every knob of a run, documented; loaded from YAML with ``--set key=value``
   overrides and checked (unknown keys, types, verifier == policy, missing prompt file) before any model
   loads. Fields named like ``GRPOConfig`` fields are passed to TRL unchanged; ``trl:`` passes any other
   ``GRPOConfig`` field through.
2. :func:`grpo_args` — the ``trl.GRPOConfig`` of a run.
3. :func:`build_scorer` / :func:`build_rewards` — verifiers and reward functions (CME, self-referential
   baselines, weighted combinations), each wrapped by :class:`GuardedReward` (repetition guard and the
   per-step degeneration diagnostics).
4. Callbacks — ``metrics.jsonl``, a rich progress bar with ETA, and checkpoint finalisation (resolved config,
   run card with the reward curve, and a completion marker written last).
5. :func:`train` — build, (resume,) train, write ``final/``.

The GRPO loop itself is TRL's; nothing here re-implements it.

Run directory layout::

    RUN_DIR/cmerl_config.yaml        resolved config (what --resume reads)
    RUN_DIR/metrics.jsonl            one JSON object per logging step (TRL metric names + diagnostics)
    RUN_DIR/completions/*.parquet    TRL's completions table (log_completions)
    RUN_DIR/runs/                    TensorBoard events (when tensorboard is installed)
    RUN_DIR/checkpoint-N/            HF folder + optimizer state + cmerl_config.yaml + run_card.md +
                                     reward_curve.png + cmerl_checkpoint.json (marker, written last)
    RUN_DIR/final/                   the trained model (LoRA merged) + tokenizer + config + run card
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import tempfile
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from cmerl.diagnostics import RepetitionGuard, batch_diagnostics, repeated_ngram_share

REWARD_NAMES = ("cme", "self_certainty", "neg_entropy", "self_likelihood")
CONFIG_NAME = "cmerl_config.yaml"
MARKER_NAME = "cmerl_checkpoint.json"
METRICS_NAME = "metrics.jsonl"
RUN_CARD_NAME = "run_card.md"
CURVE_NAME = "reward_curve.png"
CHECKPOINT_PREFIX = "checkpoint-"
#: Keys that ``--resume`` may change: they do not alter what the run computes up to its last checkpoint.
RESUME_OVERRIDABLE = ("max_steps", "save_steps", "save_total_limit", "logging_steps", "report_to",
                      "num_completions_to_print")
#: GRPOConfig fields cmerl sets itself; the ``trl:`` passthrough may not set them.
_MANAGED_TRL_FIELDS = ("output_dir", "save_strategy", "disable_tqdm", "reward_weights", "run_name",
                       "remove_unused_columns", "logging_strategy", "max_prompt_length")

Echo = Callable[[str], None]


def _h(text: str) -> dict:
    return {"help": text}


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """One GRPO run. Field names that exist in ``trl.GRPOConfig`` mean exactly what they mean there."""

    # --- models
    policy: str = field(default="smollm2-135m-instruct", metadata=_h(
        "Policy model to train: packaged alias, local HF folder, .gguf file or Hugging Face hub id."))
    policy_dtype: str = field(default="float32", metadata=_h(
        "Dtype of the policy weights: float32 (CPU) or bfloat16 (GPUs; then also set bf16: true)."))
    lora: bool = field(default=False, metadata=_h(
        "Train LoRA adapters (PEFT) instead of all weights; final/ holds the merged model."))
    lora_r: int = field(default=16, metadata=_h("LoRA rank."))
    lora_alpha: int = field(default=32, metadata=_h("LoRA alpha (scaling = alpha / r)."))
    lora_dropout: float = field(default=0.0, metadata=_h("Dropout on the LoRA branch."))
    lora_target_modules: str | list[str] = field(default="all-linear", metadata=_h(
        "Modules that get adapters: 'all-linear' or a list of module names (e.g. [q_proj, v_proj])."))
    verifiers: list[str] = field(default_factory=lambda: ["qwen2.5-coder-0.5b-instruct"], metadata=_h(
        "Frozen verifier model(s) for the cme reward (several are averaged): model names, or http(s) URLs of "
        "a verifier server (remote scoring, cmerl.scoring.remote)."))
    verifier_dtype: str = field(default="bfloat16", metadata=_h(
        "Dtype of local verifier weights (bfloat16 is ~2.5x faster on CPUs with AVX512-BF16)."))
    verifier_batch_tokens: int = field(default=4096, metadata=_h(
        "Token budget of one verifier forward batch (rows x padded length)."))
    verifier_device: str | None = field(default=None, metadata=_h(
        "Device of local verifiers (cpu, cuda, cuda:1); null = the training process's own device."))
    allow_self_verification: bool = field(default=False, metadata=_h(
        "Allow a cme verifier that is the policy model itself (the self-referential ablation)."))
    # --- rewards
    rewards: list[str] = field(default_factory=lambda: ["cme"], metadata=_h(
        "Reward functions, summed with reward_weights: cme (verifier log-likelihood), and the self-referential "
        "baselines self_certainty, neg_entropy, self_likelihood."))
    reward_weights: list[float] | None = field(default=None, metadata=_h(
        "One weight per reward (TRL reward_weights); default all 1.0."))
    cme_signal: Literal["mean_logprob", "sum_logprob", "neg_entropy"] = field(default="mean_logprob", metadata=_h(
        "What the cme reward reads from the verifier: mean_logprob (the paper's CME), sum_logprob, or "
        "neg_entropy (negative mean verifier entropy)."))
    baseline_scorer: Literal["policy", "frozen"] = field(default="policy", metadata=_h(
        "Model behind the self-referential baselines: the live policy being trained, or a frozen copy of "
        "its initial weights (loaded once more, in verifier_dtype)."))
    repetition_guard: bool = field(default=True, metadata=_h(
        "Replace the reward of completions dominated by repeated n-grams by repetition_floor."))
    repetition_ngram: int = field(default=4, metadata=_h("n of the repetition guard's n-grams (tokens)."))
    repetition_max_share: float = field(default=0.5, metadata=_h(
        "A completion whose share of repeated n-grams exceeds this is degenerate."))
    repetition_floor: float = field(default=-20.0, metadata=_h(
        "Reward given to degenerate completions (reward units; -20 is the scoring engine's log-prob floor)."))
    # --- data
    prompts: str = field(default="ultrafeedback", metadata=_h(
        "Prompt set: 'ultrafeedback' or 'alpaca_eval' (bundled), a local .jsonl/.json/.parquet file, or a "
        "Hugging Face dataset id."))
    prompt_column: str = field(default="prompt", metadata=_h(
        "Column holding the prompt (a string or a chat message list) in files and hub datasets."))
    prompt_split: str = field(default="train", metadata=_h("Split of a hub dataset."))
    max_prompts: int | None = field(default=None, metadata=_h(
        "Use only the first N prompts that fit (after holding out heldout_prompts); null = all."))
    heldout_prompts: int = field(default=0, metadata=_h(
        "Keep the last N fitting prompts out of training (the demo shows them before/after)."))
    max_prompt_length: int = field(default=512, metadata=_h(
        "Prompts longer than this many tokens (policy chat template included) are dropped, with a count "
        "printed; never truncated."))
    system_prompt: str | None = field(default=None, metadata=_h(
        "System turn added to every policy prompt (chat-template policies); null = the template's default. "
        "Verifiers score against the prompt without it."))
    # --- GRPO (trl.GRPOConfig fields, same names and meaning)
    num_generations: int = field(default=4, metadata=_h(
        "Completions sampled per prompt (the GRPO group size G)."))
    max_completion_length: int = field(default=128, metadata=_h("Maximum tokens per completion."))
    temperature: float = field(default=1.0, metadata=_h("Sampling temperature."))
    top_p: float = field(default=1.0, metadata=_h("Nucleus sampling threshold."))
    learning_rate: float = field(default=1e-6, metadata=_h("AdamW learning rate."))
    lr_scheduler_type: str = field(default="constant", metadata=_h(
        "Learning-rate schedule (transformers name; cmerl defaults to constant so extending max_steps on "
        "resume does not change the past)."))
    beta: float = field(default=0.0, metadata=_h("KL coefficient against the reference model (0 = no KL, no ref model)."))
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = field(
        default="dapo", metadata=_h("GRPO loss aggregation (TRL loss_type)."))
    scale_rewards: Literal["group", "batch", "none"] = field(default="group", metadata=_h(
        "Advantage scaling: by the group's reward std, the batch's, or none."))
    max_steps: int = field(default=100, metadata=_h("Optimizer steps to train for."))
    per_device_train_batch_size: int = field(default=8, metadata=_h(
        "Completions per device per step; x processes x gradient_accumulation_steps must be divisible by "
        "num_generations."))
    gradient_accumulation_steps: int = field(default=1, metadata=_h("Micro-batches per optimizer step."))
    seed: int = field(default=42, metadata=_h("Seed of data order, LoRA init and sampling."))
    mask_truncated_completions: bool = field(default=True, metadata=_h(
        "Leave completions that hit max_completion_length without EOS out of the loss (anti-gaming)."))
    bf16: bool = field(default=False, metadata=_h("bf16 mixed precision (GPUs)."))
    gradient_checkpointing: bool = field(default=False, metadata=_h(
        "Recompute activations in the backward pass to save memory (TRL defaults to true; cmerl to false "
        "because the small CPU models do not need it)."))
    use_vllm: bool = field(default=False, metadata=_h("Generate with vLLM (GPU; see vllm_mode)."))
    vllm_mode: Literal["colocate", "server"] = field(default="colocate", metadata=_h(
        "colocate: vLLM inside each training process; server: a separate `trl vllm-serve` / `vllm serve`."))
    vllm_server_base_url: str | None = field(default=None, metadata=_h("Base URL of the vLLM server (server mode)."))
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata=_h("GPU memory share of colocated vLLM."))
    # --- logging and checkpoints
    output_dir: str = field(default="runs/cme-grpo", metadata=_h(
        "Run directory: metrics.jsonl, completions, TensorBoard events, checkpoint-N/, final/."))
    logging_steps: int = field(default=1, metadata=_h("Log metrics (and write metrics.jsonl) every N steps."))
    save_steps: int = field(default=50, metadata=_h("Write a checkpoint every N steps (and always at the end)."))
    save_total_limit: int | None = field(default=2, metadata=_h("Keep at most N checkpoints; null = all."))
    log_completions: bool = field(default=True, metadata=_h(
        "Save TRL's completions table (prompt, completion, rewards, advantage) to RUN_DIR/completions/."))
    num_completions_to_print: int = field(default=0, metadata=_h(
        "Completions printed as a table at each logging step (0 = none)."))
    report_to: list[str] | None = field(default=None, metadata=_h(
        "transformers report_to integrations; null = tensorboard when installed, else none."))
    trl: dict[str, Any] = field(default_factory=dict, metadata=_h(
        "Any other trl.GRPOConfig field, by its TRL name (e.g. {top_k: 50, warmup_steps: 10, epsilon_high: 0.28})."))


class ConfigError(ValueError):
    """A bad run config: names the key, the value and the file."""


class RunDirExistsError(FileExistsError):
    """``output_dir`` already holds a run; resume it or pick another directory."""


def config_fields() -> dict[str, Any]:
    """Field name -> resolved type annotation of :class:`TrainConfig`."""
    return typing.get_type_hints(TrainConfig)


def config_reference() -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, help)`` of every config field, in declaration order."""
    types = config_fields()
    defaults = TrainConfig()
    return [(f.name, _type_name(types[f.name]), getattr(defaults, f.name), f.metadata.get("help", ""))
            for f in fields(TrainConfig)]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_BOOL_STRINGS = {"true": True, "yes": True, "on": True, "1": True,
                 "false": False, "no": False, "off": False, "0": False}


def _coerce(value: Any, tp: Any, key: str, *, from_cli: bool) -> Any:
    """``value`` checked against annotation ``tp``; raises TypeError describing the mismatch.

    Numeric strings are accepted for float fields (PyYAML reads ``1e-5`` as a string); from the command
    line, strings are also converted to int/bool and a comma-separated string to a list.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise TypeError("expected null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key, from_cli=from_cli)
            except TypeError as exc:
                errors.append(str(exc))
        raise TypeError(" or ".join(errors))
    if origin is Literal:
        if value in args:
            return value
        raise TypeError(f"expected one of {', '.join(repr(a) for a in args)}")
    if origin is list:
        if isinstance(value, str) and from_cli:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise TypeError(f"expected a list (got {type(value).__name__})")
        return [_coerce(v, args[0], key, from_cli=from_cli) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping (got {type(value).__name__})")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in _BOOL_STRINGS:
            return _BOOL_STRINGS[value.lower()]
        raise TypeError(f"expected true or false (got {type(value).__name__} {value!r})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_cli and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise TypeError(f"expected an integer (got {type(value).__name__} {value!r})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"expected a number (got {type(value).__name__} {value!r})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"expected a string (got {type(value).__name__} {value!r})")
    raise TypeError(f"unsupported annotation {tp}")


def _unknown_key_error(key: str, source: str) -> ConfigError:
    names = [f.name for f in fields(TrainConfig)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{source}: unknown key {key!r}{hint}; run `cmerl train --print-config` for all keys")


def config_from_dict(data: dict, *, source: str = "<config>") -> TrainConfig:
    """Build a config from a mapping; unknown keys and wrong types raise :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping of key: value (got {type(data).__name__})")
    types = config_fields()
    values = {}
    for key, value in data.items():
        if key not in types:
            raise _unknown_key_error(str(key), source)
        try:
            values[key] = _coerce(value, types[key], key, from_cli=False)
        except TypeError as exc:
            raise ConfigError(f"{source}: key {key!r} has a wrong type: {exc}") from None
    return TrainConfig(**values)


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str], *, source: str = "--set",
                    allowed: Sequence[str] | None = None) -> TrainConfig:
    """Apply ``key=value`` overrides (values parsed as YAML; ``trl.NAME=value`` sets one TRL passthrough key).

    ``allowed`` restricts which keys may change (used by ``--resume``).
    """
    types = config_fields()
    data = asdict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source} {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        top = key.split(".", 1)[0]
        if top not in types:
            raise _unknown_key_error(top, f"{source} {item!r}")
        if allowed is not None and top not in allowed:
            raise ConfigError(f"{source} {item!r}: {top!r} cannot change when resuming a run "
                              f"(allowed: {', '.join(allowed)}); start a new run instead")
        if "." in key:
            if top != "trl":
                raise ConfigError(f"{source} {item!r}: only trl.NAME keys are nested")
            data["trl"] = {**data["trl"], key.split(".", 1)[1]: value}
            continue
        try:
            data[key] = _coerce(value, types[key], key, from_cli=True)
        except TypeError as exc:
            raise ConfigError(f"{source} {item!r}: key {key!r} has a wrong type: {exc}") from None
    return TrainConfig(**data)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config, apply ``--set`` overrides and :func:`validate` it (nothing is loaded)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    cfg = apply_overrides(config_from_dict(data, source=str(p)), overrides)
    validate(cfg, source=str(p))
    return cfg


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(asdict(cfg), sort_keys=False, allow_unicode=True)


def config_template() -> str:
    """A YAML config with every key at its default and its documentation as a comment."""
    lines = ["# cmerl train config: every key with its default. `cmerl train --config FILE --set key=value`."]
    for name, type_name, default, help_text in config_reference():
        lines.append(f"# {help_text} [{type_name}]")
        lines.append(yaml.safe_dump({name: default}, sort_keys=False, default_flow_style=True).strip()
                     .removeprefix("{").removesuffix("}"))
    return "\n".join(lines) + "\n"


def is_remote(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


REMOTE_OPTIONS = ("tokenizer", "protocol", "model")


def parse_remote_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``http://host:8000#tokenizer=NAME&protocol=openai&model=M`` -> (url, options).

    ``tokenizer`` (a model name) makes pairs render and tokenize locally (needed for a plain ``vllm serve``);
    without it a cmerl server renders text pairs itself. ``protocol``: auto, openai or cmerl.
    """
    url, _, fragment = spec.partition("#")
    options: dict[str, str] = {}
    for part in filter(None, fragment.split("&")):
        key, eq, value = part.partition("=")
        if not eq or key not in REMOTE_OPTIONS:
            raise ConfigError(f"verifier {spec!r}: bad option {part!r}; use #key=value with keys "
                              f"{', '.join(REMOTE_OPTIONS)} joined by &")
        options[key] = value
    return url, options


def validate(cfg: TrainConfig, *, source: str = "<config>") -> None:
    """Checks that need no model: rewards, weights, independence, data file, LoRA, TRL passthrough, and the
    GRPOConfig itself (TRL's own divisibility checks). Raises :class:`ConfigError` / FileNotFoundError."""
    from cmerl.data import PromptDataError, check_source
    from cmerl.models import model_identity

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: key {key!r}: {why}")

    if not cfg.rewards:
        raise bad("rewards", "at least one reward is needed")
    for r in cfg.rewards:
        if r not in REWARD_NAMES:
            raise bad("rewards", f"unknown reward {r!r}; use any of {', '.join(REWARD_NAMES)}")
    if len(set(cfg.rewards)) != len(cfg.rewards):
        raise bad("rewards", f"a reward is listed twice ({cfg.rewards})")
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(cfg.rewards):
        raise bad("reward_weights", f"{len(cfg.reward_weights)} weights for {len(cfg.rewards)} rewards {cfg.rewards}")
    if "cme" in cfg.rewards:
        if not cfg.verifiers:
            raise bad("verifiers", "the cme reward needs at least one verifier")
        for v in cfg.verifiers:
            if is_remote(v):
                try:
                    parse_remote_spec(v)
                except ConfigError as exc:
                    raise bad("verifiers", str(exc)) from None
        if not cfg.allow_self_verification:
            policy_id = model_identity(cfg.policy)
            for v in cfg.verifiers:
                if not is_remote(v) and model_identity(v) == policy_id:
                    raise bad("verifiers", f"verifier {v!r} is the policy model {cfg.policy!r}; CME needs an "
                              "independent verifier (set allow_self_verification: true for the ablation)")
    for key in ("policy_dtype", "verifier_dtype"):
        from cmerl.models import parse_dtype

        try:
            parse_dtype(getattr(cfg, key))
        except ValueError as exc:
            raise bad(key, str(exc)) from None
    for key in ("num_generations", "max_completion_length", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "logging_steps", "save_steps", "max_prompt_length",
                "verifier_batch_tokens", "repetition_ngram", "lora_r"):
        if getattr(cfg, key) < 1:
            raise bad(key, f"must be >= 1 (got {getattr(cfg, key)})")
    if cfg.max_prompts is not None and cfg.max_prompts < 1:
        raise bad("max_prompts", f"must be >= 1 or null (got {cfg.max_prompts})")
    if cfg.heldout_prompts < 0:
        raise bad("heldout_prompts", f"must be >= 0 (got {cfg.heldout_prompts})")
    if not 0.0 <= cfg.repetition_max_share <= 1.0:
        raise bad("repetition_max_share", f"must be in [0, 1] (got {cfg.repetition_max_share})")
    try:
        check_source(cfg.prompts)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{source}: key 'prompts': {exc}") from None
    except PromptDataError as exc:
        raise bad("prompts", str(exc)) from None
    _check_trl_passthrough(cfg, source)
    try:
        grpo_args(cfg, for_validation=True)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: TRL rejected the GRPO settings: {exc}") from None


def _check_trl_passthrough(cfg: TrainConfig, source: str) -> None:
    from trl import GRPOConfig

    trl_fields = {f.name for f in fields(GRPOConfig)}
    ours = {f.name for f in fields(TrainConfig)}
    for key in cfg.trl:
        if key in ours:
            raise ConfigError(f"{source}: key 'trl.{key}': {key!r} is a top-level cmerl key; set it there")
        if key in _MANAGED_TRL_FIELDS:
            raise ConfigError(f"{source}: key 'trl.{key}': cmerl sets {key!r} itself")
        if key not in trl_fields:
            close = difflib.get_close_matches(key, sorted(trl_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: key 'trl.{key}': not a trl.GRPOConfig field{hint}")


# ------------------------------------------------------------------------------------------- TRL args
#: TrainConfig fields passed to GRPOConfig under the same name.
GRPO_FIELDS = ("num_generations", "max_completion_length", "temperature", "top_p", "learning_rate",
               "lr_scheduler_type", "beta", "loss_type", "scale_rewards", "max_steps",
               "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "mask_truncated_completions",
               "bf16", "gradient_checkpointing", "use_vllm", "vllm_mode", "vllm_server_base_url",
               "vllm_gpu_memory_utilization", "logging_steps", "save_steps", "save_total_limit",
               "log_completions", "num_completions_to_print", "reward_weights")


def default_report_to() -> list[str]:
    import importlib.util

    return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []


def grpo_args(cfg: TrainConfig, *, for_validation: bool = False):
    """The ``trl.GRPOConfig`` of a run (cheap: no model is loaded).

    ``for_validation`` checks a GPU config on a machine without one: bf16/fp16 are switched off there so
    transformers' hardware check does not hide the other errors.
    """
    import torch
    from trl import GRPOConfig

    kwargs = {name: getattr(cfg, name) for name in GRPO_FIELDS}
    if for_validation and not torch.cuda.is_available():
        kwargs["bf16"] = False
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        # transformers only joins a multi-process (torchrun / accelerate launch) group on CPU with use_cpu.
        kwargs["use_cpu"] = True
    kwargs.update(
        output_dir=cfg.output_dir,
        run_name=Path(cfg.output_dir).name,
        save_strategy="steps",
        logging_strategy="steps",
        disable_tqdm=True,  # cmerl's own rich progress bar replaces transformers' tqdm
        remove_unused_columns=False,
        report_to=cfg.report_to if cfg.report_to is not None else default_report_to(),
        log_level="warning",
        ddp_find_unused_parameters=False,  # every policy parameter that trains is used in each forward
    )
    kwargs.update(cfg.trl)
    if for_validation and not torch.cuda.is_available():
        kwargs["fp16"] = False
    return GRPOConfig(**kwargs)


# --------------------------------------------------------------------------------------------- rewards
def build_scorer(spec: str, *, dtype: str = "bfloat16", batch_tokens: int = 4096, device: str | None = None,
                 render=None):
    """The one place a verifier is constructed: a model name loads a local :class:`~cmerl.scoring.Verifier`
    (on ``device``; None = this process's accelerator device); an ``http(s)://`` URL gives a remote verifier
    (``cmerl.scoring.remote``)."""
    kwargs = {} if render is None else {"render": render}
    if is_remote(spec):
        try:
            from cmerl.scoring.remote import RemoteVerifier
        except ImportError as exc:
            raise ConfigError(f"verifier {spec!r} is a URL, but remote scoring (cmerl.scoring.remote) is not "
                              "available in this install") from exc
        url, options = parse_remote_spec(spec)
        return RemoteVerifier(url, options.pop("tokenizer", None), **options, **kwargs)
    from cmerl.scoring import Verifier

    if device is None:
        from accelerate import PartialState

        device = str(PartialState().device)
    return Verifier.from_pretrained(spec, dtype=dtype, device=device, max_batch_tokens=batch_tokens, **kwargs)


def policy_render_config(cfg: TrainConfig):
    """How the policy's prompts are rendered during generation, for scoring with the policy itself."""
    from cmerl.formatting import TEMPLATE_DEFAULT, RenderConfig

    return RenderConfig(system_prompt=cfg.system_prompt if cfg.system_prompt is not None else TEMPLATE_DEFAULT)


class GuardedReward:
    """A TRL reward function around another one: scores against the ``raw_prompt`` column (the prompt as the
    user wrote it, before the policy's formatting), applies the repetition guard, and logs diagnostics.

    With ``diagnostics=True`` it logs, through TRL's ``log_metric``, ``diagnostics/completion_length_mean``,
    ``diagnostics/truncated_frac``, ``diagnostics/distinct_2`` and ``diagnostics/repeated_4gram_share``
    (computed on completion token ids), and adds a ``repeated_4gram_share`` column to the completions table.
    The guard logs ``<name>/floored_frac``.
    """

    def __init__(self, reward: Callable, *, guard: RepetitionGuard | None = None, diagnostics: bool = False,
                 eos_ids: Sequence[int] = (), max_completion_length: int | None = None):
        self.reward = reward
        self.guard = guard
        self.diagnostics = diagnostics
        self.eos_ids = list(eos_ids)
        self.max_completion_length = max_completion_length
        self.__name__ = getattr(reward, "__name__", type(reward).__name__)

    def _sequences(self, completions: Sequence, completion_ids: Sequence | None) -> list[list]:
        if completion_ids is not None:
            return [list(ids) for ids in completion_ids]
        from cmerl.formatting import completion_text

        return [completion_text(c).split() for c in completions]

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 log_metric: Callable[[str, float], None] | None = None,
                 log_extra: Callable[[str, list], None] | None = None, raw_prompt: Sequence | None = None,
                 **kwargs: Any) -> list[float | None]:
        score_prompts = list(raw_prompt) if raw_prompt is not None else list(prompts)
        rewards = list(self.reward(prompts=score_prompts, completions=completions, completion_ids=completion_ids,
                                   log_metric=log_metric, **kwargs))
        seqs = self._sequences(completions, completion_ids)
        if self.guard is not None:
            rewards, n_floored = self.guard.apply(rewards, seqs)
            if log_metric is not None and seqs:
                log_metric(f"{self.__name__}/floored_frac", n_floored / len(seqs))
        if self.diagnostics and seqs:
            stats = batch_diagnostics(seqs, eos_ids=self.eos_ids, max_completion_length=self.max_completion_length)
            if log_metric is not None:
                for name, value in stats.as_metrics().items():
                    log_metric(name, value)
            if log_extra is not None:
                eos = set(self.eos_ids)
                log_extra("repeated_4gram_share", [
                    round(repeated_ngram_share(s[:-1] if s and s[-1] in eos else s, 4), 3) for s in seqs])
        return rewards


def build_rewards(cfg: TrainConfig, policy_model, policy_tokenizer, *, eos_ids: Sequence[int] = ()) -> list[GuardedReward]:
    """The run's reward functions, in ``cfg.rewards`` order, each wrapped in :class:`GuardedReward`
    (diagnostics logged by the first). Loads the verifiers (and the frozen policy copy if asked)."""
    from cmerl.rewards import CrossModelEntropy, NegativeEntropy, SelfCertainty, SelfLikelihood
    from cmerl.scoring import Verifier

    baseline_scorer = None

    def get_baseline_scorer():
        nonlocal baseline_scorer
        if baseline_scorer is None:
            if cfg.baseline_scorer == "policy":
                # The live policy: same object the trainer updates (LoRA layers are injected into it in place).
                # fp32_head=False: a cached float32 copy of the head would go stale as the policy trains.
                baseline_scorer = Verifier(policy_model, policy_tokenizer, name=f"{cfg.policy} (live policy)",
                                           render=policy_render_config(cfg), fp32_head=False,
                                           max_batch_tokens=cfg.verifier_batch_tokens)
            else:
                baseline_scorer = build_scorer(cfg.policy, dtype=cfg.verifier_dtype,
                                               batch_tokens=cfg.verifier_batch_tokens, device=cfg.verifier_device,
                                               render=policy_render_config(cfg))
        return baseline_scorer

    guard = (RepetitionGuard(cfg.repetition_ngram, cfg.repetition_max_share, cfg.repetition_floor)
             if cfg.repetition_guard else None)
    out = []
    for i, name in enumerate(cfg.rewards):
        if name == "cme":
            scorers = [build_scorer(v, dtype=cfg.verifier_dtype, batch_tokens=cfg.verifier_batch_tokens,
                                    device=cfg.verifier_device) for v in cfg.verifiers]
            fn = CrossModelEntropy(scorers, signal=cfg.cme_signal, policy=policy_model,
                                   allow_self_verification=cfg.allow_self_verification)
        elif name == "self_certainty":
            fn = SelfCertainty(get_baseline_scorer())
        elif name == "neg_entropy":
            fn = NegativeEntropy(get_baseline_scorer())
        else:
            fn = SelfLikelihood(get_baseline_scorer())
        out.append(GuardedReward(fn, guard=guard, diagnostics=(i == 0), eos_ids=eos_ids,
                                 max_completion_length=cfg.max_completion_length))
    return out


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
    from cmerl.io import iter_jsonl

    if not path.is_file():
        return 0
    rows = [r for r in iter_jsonl(path) if r.get("step", 0) <= max_step]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return len(rows)


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
    """PNG of reward and per-function means against step; False (no file) when there is nothing to plot."""
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = ["reward"] + sorted({k for r in rows for k in r if k.startswith("rewards/")})
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_run_card(folder: Path, cfg: TrainConfig, log_history: Sequence[dict], *, step: int) -> None:
    """``run_card.md`` (+ ``reward_curve.png``) in ``folder``: what was trained, how, and the reward curve."""
    rows = reward_curve(log_history)
    has_plot = plot_reward_curve(rows, folder / CURVE_NAME)
    cols = ["step", "reward"] + sorted({k for r in rows for k in r if k.startswith("rewards/")}) + [
        "completions/mean_length", "diagnostics/distinct_2", "diagnostics/repeated_4gram_share"]
    shown = rows if len(rows) <= 25 else [rows[round(i * (len(rows) - 1) / 24)] for i in range(25)]
    tuning = f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha}" if cfg.lora else "full fine-tune"
    weights = cfg.reward_weights or [1.0] * len(cfg.rewards)
    reward_desc = " + ".join(f"{w:g} x {r}" for w, r in zip(weights, cfg.rewards))
    lines = [
        f"# cmerl GRPO run card: {Path(cfg.output_dir).name}, step {step}",
        "",
        f"- policy: `{cfg.policy}` ({tuning}, {cfg.policy_dtype})",
        f"- reward: {reward_desc}"
        + (f"; cme = {cfg.cme_signal} under {', '.join(f'`{v}`' for v in cfg.verifiers)}" if "cme" in cfg.rewards else "")
        + (f"; baselines scored by the {cfg.baseline_scorer} policy" if set(cfg.rewards) - {"cme"} else ""),
        "- repetition guard: " + (f"reward {cfg.repetition_floor:g} when >{cfg.repetition_max_share:g} of "
                                    f"{cfg.repetition_ngram}-grams repeat" if cfg.repetition_guard else "off"),
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
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    else:
        lines.append("(no logged steps yet)")
    lines += ["", "## Config", "", "```yaml", config_to_yaml(cfg).rstrip(), "```", ""]
    (folder / RUN_CARD_NAME).write_text("\n".join(lines), encoding="utf-8")


def _trainer_callback_base():
    from transformers import TrainerCallback

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
        from cmerl.io import append_jsonl, write_json_atomic

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
        from cmerl.io import write_json_atomic

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
    """A rich progress bar (steps, elapsed, ETA) plus one line per logging step with the key metrics."""

    def __init__(self, echo: Echo | None = None):
        self.progress = None
        self.task = None
        self.echo = echo
        self.console = None
        self._last_time = None
        self._last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
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
        for key, label, fmt in (("completions/mean_length", "len", ".0f"), ("diagnostics/distinct_2", "d2", ".2f"),
                                ("diagnostics/repeated_4gram_share", "rep4", ".2f"), ("cme/seconds", "cme", ".1f")):
            if logs.get(key) is not None:
                parts.append(f"{label} {logs[key]:{fmt}}" + ("s" if key == "cme/seconds" else ""))
        parts.append(f"{per_step:.1f}s/step")
        line = " ".join(parts)
        self.progress.update(self.task, status=f"reward {logs.get('reward', float('nan')):.3f}")
        self.console.print(line)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


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
    rewards: list[GuardedReward]
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
    from accelerate import PartialState

    return PartialState().is_main_process


def _wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def prepare_run_dir(cfg: TrainConfig, *, resume: bool, echo: Echo | None = None) -> Path | None:
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
                if echo:
                    echo(f"removed incomplete checkpoint {p} (no {MARKER_NAME} marker)")
            truncate_metrics(run_dir / METRICS_NAME, checkpoint_step(ckpt) if ckpt else 0)
        (run_dir / CONFIG_NAME).write_text(config_to_yaml(cfg), encoding="utf-8")
    _wait_for_everyone()
    return ckpt


def build_session(cfg: TrainConfig, *, resume_from: Path | None = None, progress: bool = False,
                  echo: Echo | None = None) -> TrainingSession:
    """Load tokenizer, prompts, policy and verifiers, and build the ``GRPOTrainer`` with cmerl's callbacks."""
    from accelerate import PartialState
    from trl import GRPOTrainer

    from cmerl.data import load_prompt_set, to_dataset
    from cmerl.models import load_model, load_tokenizer

    args = grpo_args(cfg)
    state = PartialState()
    rank = f"(rank {state.process_index} of {state.num_processes}) " if state.num_processes > 1 else ""

    def say(text: str, *, every_rank: bool = False) -> None:
        if echo is not None and (every_rank or state.is_main_process):
            echo(rank + text if every_rank else text)

    tokenizer = load_tokenizer(cfg.policy)
    prompt_set = load_prompt_set(cfg.prompts, tokenizer, column=cfg.prompt_column, split=cfg.prompt_split,
                                 max_prompt_length=cfg.max_prompt_length, max_prompts=cfg.max_prompts,
                                 heldout=cfg.heldout_prompts, system_prompt=cfg.system_prompt)
    say(prompt_set.summary())
    dataset = to_dataset(prompt_set, tokenizer, cfg.system_prompt)
    say(f"loading policy {cfg.policy} ({cfg.policy_dtype}) ...")
    policy, _ = load_model(cfg.policy, dtype=cfg.policy_dtype, show_progress=progress)
    eos_ids = _eos_ids(policy, tokenizer)
    say("loading reward models: " + ", ".join(
        (f"cme <- {', '.join(cfg.verifiers)} ({cfg.verifier_dtype})" if r == "cme" else r) for r in cfg.rewards),
        every_rank=True)
    rewards = build_rewards(cfg, policy, tokenizer, eos_ids=eos_ids)
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    run_dir = Path(cfg.output_dir)
    callbacks = [MetricsLogger(run_dir), CheckpointFinalizer(cfg, run_dir)]
    if progress:
        callbacks.append(RichProgress(echo))
    trainer = GRPOTrainer(model=policy, reward_funcs=rewards, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return TrainingSession(cfg=cfg, run_dir=run_dir, trainer=trainer, policy=policy, tokenizer=tokenizer,
                           prompt_set=prompt_set, rewards=rewards, resume_from=resume_from)


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
          echo: Echo | None = None) -> TrainResult:
    """Run (or, with ``resume=True``, continue) the GRPO run described by ``cfg``; see the module docstring.

    ``cfg`` must have passed :func:`validate`. Resuming continues from the last complete checkpoint in
    ``cfg.output_dir`` with the same data order and RNG state; from step 0 if there is none.
    """
    session = start(cfg, resume=resume, progress=progress, echo=echo)
    return finish(session, echo=echo)


def start(cfg: TrainConfig, *, resume: bool = False, progress: bool = False,
          echo: Echo | None = None) -> TrainingSession:
    """Prepare the run directory and build the session (no training yet)."""
    ckpt = prepare_run_dir(cfg, resume=resume, echo=echo)
    if echo and resume:
        echo(f"resuming from {ckpt} (step {checkpoint_step(ckpt)})" if ckpt else
             f"no complete checkpoint in {cfg.output_dir}; starting from step 0")
    return build_session(cfg, resume_from=ckpt, progress=progress, echo=echo)


def finish(session: TrainingSession, *, echo: Echo | None = None) -> TrainResult:
    """Train to ``max_steps`` (from the session's checkpoint, if any) and write ``final/``."""
    trainer = session.trainer
    trainer.train(resume_from_checkpoint=str(session.resume_from) if session.resume_from else None)
    final = save_final(session)
    _wait_for_everyone()
    result = TrainResult(run_dir=session.run_dir, final_dir=final, last_checkpoint=latest_checkpoint(session.run_dir),
                         global_step=trainer.state.global_step, metrics_path=session.run_dir / METRICS_NAME)
    if echo and session.is_main_process:
        echo(f"trained to step {result.global_step}; checkpoint {result.last_checkpoint}; final model {final}")
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
