"""The run config: :class:`TrainConfig`, YAML loading with ``--set`` overrides, and validation before any
model loads."""

from __future__ import annotations

import difflib
import importlib.util
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from cmerl.configs import find_config
from cmerl.data import PromptDataError, check_source, source_kind
from cmerl.fingerprint import same_model
from cmerl.precision import (
    check_dtype_name,  # torch: kept out of this module's import
    resolve_dtype,
)
from cmerl.problems import is_problem_source
from cmerl.scoring.remote import is_remote, parse_remote_spec
from cmerl.training.reward_registry import REWARDS, get_reward

#: What trains the policy (``method``): TRL's GRPOTrainer on the rewards, or one of the two baselines.
METHODS = ("grpo", "dpo", "distill")
#: The verifier's answers a distill run trains on (AlpacaEval outputs format), in the run directory.
TEACHER_OUTPUTS_NAME = "teacher_outputs.json"
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
                       "remove_unused_columns", "logging_strategy", "max_prompt_length", "max_length",
                       "completion_only_loss")

#: Prints one status line for the user (e.g. ``rich.console.Console.print``); ``None`` where taken: quiet.
StatusPrinter = Callable[[str], None]


def _documented(text: str) -> dict:
    return {"help": text}


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """One GRPO run. Field names that exist in ``trl.GRPOConfig`` mean exactly what they mean there."""

    # --- models
    policy: str = field(default="smollm2-135m-instruct", metadata=_documented(
        "Policy model to train: packaged alias, local HF folder, .gguf file or Hugging Face hub id."))
    policy_dtype: str = field(default="auto", metadata=_documented(
        "Dtype of the policy weights: auto (float32 on CPU; bfloat16 on GPUs that have it, then also set "
        "bf16: true), float32 or bfloat16."))
    lora: bool = field(default=False, metadata=_documented(
        "Train LoRA adapters (PEFT) instead of all weights; final/ holds the merged model."))
    lora_r: int = field(default=16, metadata=_documented("LoRA rank."))
    lora_alpha: int = field(default=32, metadata=_documented("LoRA alpha (scaling = alpha / r)."))
    lora_dropout: float = field(default=0.0, metadata=_documented("Dropout on the LoRA branch."))
    lora_target_modules: str | list[str] = field(default="all-linear", metadata=_documented(
        "Modules that get adapters: 'all-linear' or a list of module names (e.g. [q_proj, v_proj])."))
    verifiers: list[str] = field(default_factory=lambda: ["qwen2.5-coder-0.5b-instruct"], metadata=_documented(
        "Frozen verifier model(s) for the cme reward (several are averaged): model names, or http(s) URLs of "
        "a verifier server (remote scoring, cmerl.scoring.remote)."))
    verifier_dtype: str = field(default="auto", metadata=_documented(
        "Dtype of local verifier weights: auto (bfloat16 where the CPU/GPU runs it natively, ~2.5x faster on "
        "CPUs with AVX512-BF16; else float32, since emulated bf16 is 4-7x slower), float32, bfloat16, or int8 "
        "(CPU only, opt-in: dynamic int8 Linear layers, faster, ~0.1 nats/token off float32; cmerl.quantization)."))
    verifier_batch_tokens: int = field(default=4096, metadata=_documented(
        "Token budget of one verifier forward batch (rows x padded length)."))
    verifier_device: str | None = field(default=None, metadata=_documented(
        "Device of local verifiers (cpu, cuda, cuda:1); null = the training process's own device."))
    allow_self_verification: bool = field(default=False, metadata=_documented(
        "Allow a cme verifier that is the policy model itself (the self-referential ablation)."))
    # --- rewards
    rewards: list[str] = field(default_factory=lambda: ["cme"], metadata=_documented(
        "Reward functions, summed with reward_weights: cme (verifier log-likelihood), reverse_kl (verifier minus "
        "policy log-likelihood), the self-referential baselines self_certainty, neg_entropy, self_likelihood, "
        "and any other registered reward (cmerl.training.reward_registry)."))
    reward_weights: list[float] | None = field(default=None, metadata=_documented(
        "One weight per reward (TRL reward_weights); default all 1.0."))
    cme_signal: Literal["mean_logprob", "sum_logprob", "neg_entropy"] = field(default="mean_logprob", metadata=_documented(
        "What the cme reward reads from the verifier: mean_logprob (the paper's CME), sum_logprob, or "
        "neg_entropy (negative mean verifier entropy)."))
    pmi_lambda: float = field(default=1.0, metadata=_documented(
        "cme_pmi: weight in [0, 1] of the content-free instruction's log-likelihood subtracted per token "
        "(1 = pointwise mutual information, 0 = plain CME)."))
    pmi_null_prompt: str = field(default="Write a response.", metadata=_documented(
        "cme_pmi: the content-free instruction x0, rendered with the same template (system turns kept)."))
    baseline_scorer: Literal["policy", "frozen"] = field(default="policy", metadata=_documented(
        "Model behind the self-referential baselines: the live policy being trained, or a frozen copy of "
        "its initial weights (loaded once more, in verifier_dtype)."))
    repetition_guard: bool = field(default=True, metadata=_documented(
        "Give completions dominated by repeated n-grams the combined reward repetition_floor (the other rewards "
        "do not apply to them, whatever their weights)."))
    repetition_ngram: int = field(default=4, metadata=_documented("n of the repetition guard's n-grams (tokens)."))
    repetition_max_share: float = field(default=0.5, metadata=_documented(
        "A completion whose share of repeated n-grams exceeds this is degenerate."))
    repetition_floor: float = field(default=-20.0, metadata=_documented(
        "Reward given to degenerate completions (reward units; -20 is the scoring engine's log-prob floor)."))
    # --- dense rewards (docs/training.md "Dense rewards")
    dense: bool = field(default=False, metadata=_documented(
        "Also compute per-token cme rewards for every policy completion token, from the same verifier pass "
        "(verifier tokens aligned onto policy tokens by character offsets), and train with DenseGRPOTrainer."))
    advantage_estimator: Literal["scalar", "position_std", "position_mean", "return_to_go"] = field(
        default="scalar", metadata=_documented(
            "dense: how per-token advantages are formed: scalar (TRL's GRPO advantage on every token, as "
            "without dense), position_std / position_mean (per-position normalisation across the group), or "
            "return_to_go (reward-to-go, normalised per position across the group)."))
    # --- data
    prompts: str = field(default="ultrafeedback", metadata=_documented(
        "Prompt set: 'ultrafeedback' or 'alpaca_eval' (bundled), a local .jsonl/.json/.parquet file, or a "
        "Hugging Face dataset id."))
    prompt_column: str = field(default="prompt", metadata=_documented(
        "Column holding the prompt (a string or a chat message list) in files and hub datasets."))
    prompt_split: str = field(default="train", metadata=_documented("Split of a hub dataset."))
    max_prompts: int | None = field(default=None, metadata=_documented(
        "Use only the first N prompts that fit (after holding out heldout_prompts); null = all."))
    heldout_prompts: int = field(default=0, metadata=_documented(
        "Keep the last N fitting prompts out of training (the demo shows them before/after)."))
    max_prompt_length: int = field(default=512, metadata=_documented(
        "Prompts longer than this many tokens (policy chat template included) are dropped, with a count "
        "printed; never truncated."))
    system_prompt: str | None = field(default=None, metadata=_documented(
        "System turn added to every policy prompt (chat-template policies); null = the template's default. "
        "Verifiers score against the prompt without it."))
    # --- maths (the cme_answer and correctness rewards; see docs/reasoning.md)
    answer_column: str | None = field(default=None, metadata=_documented(
        "Column of gold final answers in a prompt file or hub dataset (for the correctness reward); maths "
        "sets (gsm8k_train, gsm8k, math500, openai/gsm8k, ...) bring their own."))
    answer_format: Literal["auto", "boxed", "gsm8k"] = field(default="auto", metadata=_documented(
        "Where a completion's final answer is: boxed (last \\boxed{...}), gsm8k (number after the last "
        "####), or auto (whichever comes last)."))
    answer_weight: float = field(default=1.0, metadata=_documented(
        "cme_answer: weight w of the answer span; reward = w x answer-span mean + (1 - w) x whole-response "
        "mean of the verifier signal (1 = answer span only, 0 = whole response)."))
    missing_answer_penalty: float = field(default=5.0, metadata=_documented(
        "cme_answer: subtracted (reward units, nats) from a completion without a final answer, whose answer "
        "term is also the log-prob floor (-20)."))
    # --- GRPO (trl.GRPOConfig fields, same names and meaning)
    num_generations: int = field(default=4, metadata=_documented(
        "Completions sampled per prompt (the GRPO group size G)."))
    max_completion_length: int = field(default=128, metadata=_documented("Maximum tokens per completion."))
    temperature: float = field(default=1.0, metadata=_documented("Sampling temperature."))
    top_p: float = field(default=1.0, metadata=_documented("Nucleus sampling threshold."))
    learning_rate: float = field(default=1e-6, metadata=_documented("AdamW learning rate."))
    lr_scheduler_type: str = field(default="constant", metadata=_documented(
        "Learning-rate schedule (transformers name; cmerl defaults to constant so extending max_steps on "
        "resume does not change the past)."))
    beta: float = field(default=0.0, metadata=_documented("KL coefficient against the reference model (0 = no KL, no ref model)."))
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = field(
        default="dapo", metadata=_documented("GRPO loss aggregation (TRL loss_type)."))
    scale_rewards: Literal["group", "batch", "none"] = field(default="group", metadata=_documented(
        "Advantage scaling: by the group's reward std, the batch's, or none."))
    max_steps: int = field(default=100, metadata=_documented("Optimizer steps to train for."))
    per_device_train_batch_size: int = field(default=8, metadata=_documented(
        "Completions per device per step; x processes x gradient_accumulation_steps must be divisible by "
        "num_generations."))
    gradient_accumulation_steps: int = field(default=1, metadata=_documented("Micro-batches per optimizer step."))
    seed: int = field(default=42, metadata=_documented("Seed of data order, LoRA init and sampling."))
    mask_truncated_completions: bool = field(default=True, metadata=_documented(
        "Leave completions that hit max_completion_length without EOS out of the loss (anti-gaming)."))
    bf16: bool = field(default=False, metadata=_documented("bf16 mixed precision (GPUs)."))
    gradient_checkpointing: bool = field(default=False, metadata=_documented(
        "Recompute activations in the backward pass to save memory (TRL defaults to true; cmerl to false "
        "because the small CPU models do not need it)."))
    use_vllm: bool = field(default=False, metadata=_documented("Generate with vLLM (GPU; see vllm_mode)."))
    vllm_mode: Literal["colocate", "server"] = field(default="colocate", metadata=_documented(
        "colocate: vLLM inside each training process; server: a separate `trl vllm-serve` / `vllm serve`."))
    vllm_server_base_url: str | None = field(default=None, metadata=_documented("Base URL of the vLLM server (server mode)."))
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata=_documented("GPU memory share of colocated vLLM."))
    # --- baselines (method dpo or distill; docs/training.md "Baselines")
    method: Literal["grpo", "dpo", "distill"] = field(default="grpo", metadata=_documented(
        "What trains the policy: grpo (GRPOTrainer on `rewards`), dpo (DPOTrainer on the prompt/chosen/rejected "
        "rows of `prompts`), or distill (SFTTrainer on the first verifier's own answers to the training prompts; "
        "`cmerl distill`). Steps, batch, learning rate, LoRA and checkpoints come from the same keys."))
    dpo_beta: float = field(default=0.1, metadata=_documented(
        "dpo: TRL DPOConfig.beta, the strength of the implicit KL penalty to the initial policy."))
    chosen_column: str = field(default="chosen", metadata=_documented(
        "dpo: column of the preferred response (a string or an assistant message list)."))
    rejected_column: str = field(default="rejected", metadata=_documented(
        "dpo: column of the dispreferred response."))
    distill_samples: int = field(default=1, metadata=_documented(
        "distill: verifier answers sampled per training prompt."))
    distill_temperature: float = field(default=0.7, metadata=_documented(
        "distill: sampling temperature of the verifier's answers (0 = greedy)."))
    distill_top_p: float = field(default=0.95, metadata=_documented(
        "distill: nucleus sampling threshold of the verifier's answers."))
    distill_batch_size: int = field(default=8, metadata=_documented(
        "distill: prompts per verifier generation batch (a speed knob, not a recorded setting: a resumed run "
        "may change it)."))
    # --- held-out evaluation (docs/training.md "Held-out evaluation")
    heldout_eval_steps: int = field(default=0, metadata=_documented(
        "Every N steps, generate on a fixed held-out prompt split, judge against the step-0 outputs and keep "
        "best/ by that win rate (0 = off)."))
    heldout_eval_prompts: str | None = field(default=None, metadata=_documented(
        "Held-out prompt set (bundled name, file, slice like f.jsonl[:40]); null = the run's heldout_prompts. "
        "It may share no prompt with the training prompts or with heldout_eval_exclude (checked, refused)."))
    heldout_eval_n: int = field(default=40, metadata=_documented("Held-out prompts used (the first N of the split)."))
    heldout_eval_judge: str = field(default="qwen2.5-coder-1.5b-instruct", metadata=_documented(
        "Judge of the held-out evaluation (a cmerl judge name, as in cmerl judge --judge)."))
    heldout_eval_max_new_tokens: int = field(default=256, metadata=_documented(
        "Most tokens generated per held-out prompt (greedy)."))
    heldout_eval_exclude: list[str] = field(default_factory=lambda: ["alpaca_eval"], metadata=_documented(
        "Evaluation prompt sets the held-out split must not overlap (the prompts you report on)."))
    # --- logging and checkpoints
    output_dir: str = field(default="runs/cme-grpo", metadata=_documented(
        "Run directory: metrics.jsonl, completions, TensorBoard events, checkpoint-N/, final/."))
    logging_steps: int = field(default=1, metadata=_documented("Log metrics (and write metrics.jsonl) every N steps."))
    save_steps: int = field(default=50, metadata=_documented("Write a checkpoint every N steps (and always at the end)."))
    save_total_limit: int | None = field(default=2, metadata=_documented("Keep at most N checkpoints; null = all."))
    log_completions: bool = field(default=True, metadata=_documented(
        "Save TRL's completions table (prompt, completion, rewards, advantage) to RUN_DIR/completions/."))
    num_completions_to_print: int = field(default=0, metadata=_documented(
        "Completions printed as a table at each logging step (0 = none)."))
    report_to: list[str] | None = field(default=None, metadata=_documented(
        "transformers report_to integrations; null = tensorboard when installed, else none."))
    trl: dict[str, Any] = field(default_factory=dict, metadata=_documented(
        "Any other trl.GRPOConfig field, by its TRL name (e.g. {top_k: 50, warmup_steps: 10, epsilon_high: 0.28}); "
        "trl.DPOConfig / trl.SFTConfig fields for method dpo / distill."))


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
    """Read a YAML config (a file, or a packaged config name such as ``demo``: :func:`cmerl.configs.find_config`),
    apply ``--set`` overrides and :func:`validate` it (nothing is loaded)."""
    p = find_config(path)
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


def validate(cfg: TrainConfig, *, source: str = "<config>") -> None:
    """Checks that need no model: rewards, weights, independence, data file, LoRA, TRL passthrough, and the
    GRPOConfig itself (TRL's own divisibility checks). Raises :class:`ConfigError` / FileNotFoundError."""
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: key {key!r}: {why}")

    if cfg.method == "grpo":
        _check_rewards(cfg, bad)
    if uses_verifiers(cfg):
        if not cfg.verifiers:
            raise bad("verifiers", f"{verifier_users(cfg)[0]} needs at least one verifier")
        if cfg.method == "distill" and is_remote(cfg.verifiers[0]):
            raise bad("verifiers", f"distill generates the verifier's answers in this process: {cfg.verifiers[0]!r} "
                      "is a URL; give a local model name first")
        for v in cfg.verifiers:
            if is_remote(v):
                try:
                    parse_remote_spec(v)
                except ValueError as exc:
                    raise bad("verifiers", str(exc)) from None
        if not cfg.allow_self_verification:
            for v in cfg.verifiers:
                if not is_remote(v) and same_model(v, cfg.policy):  # by what they are, not their names
                    raise bad("verifiers", f"verifier {v!r} is the policy model {cfg.policy!r}; "
                              f"{verifier_users(cfg)[0]} needs an independent verifier (set "
                              "allow_self_verification: true for the ablation)")

    for key in ("policy_dtype", "verifier_dtype"):
        try:
            setattr(cfg, key, check_dtype_name(getattr(cfg, key), trained=key == "policy_dtype"))
        except ValueError as exc:
            raise bad(key, str(exc)) from None
    for key in ("num_generations", "max_completion_length", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "logging_steps", "save_steps", "max_prompt_length",
                "verifier_batch_tokens", "repetition_ngram", "lora_r"):
        if getattr(cfg, key) < 1:
            raise bad(key, f"must be >= 1 (got {getattr(cfg, key)})")
    if cfg.max_prompts is not None and cfg.max_prompts < 1:
        raise bad("max_prompts", f"must be >= 1 or null (got {cfg.max_prompts})")

    for key in ("learning_rate", "temperature"):
        value = getattr(cfg, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise bad(key, f"must be a finite number > 0 (got {value!r})")
    if cfg.heldout_prompts < 0:
        raise bad("heldout_prompts", f"must be >= 0 (got {cfg.heldout_prompts})")
    if cfg.heldout_eval_steps < 0:
        raise bad("heldout_eval_steps", f"must be >= 0 (got {cfg.heldout_eval_steps})")
    if cfg.heldout_eval_steps and cfg.heldout_eval_prompts is None and cfg.heldout_prompts < 1:
        raise bad("heldout_eval_steps", "needs a held-out split: set heldout_prompts >= 1 or heldout_eval_prompts")
    if cfg.heldout_eval_n < 1:
        raise bad("heldout_eval_n", f"must be >= 1 (got {cfg.heldout_eval_n})")
    if not 0.0 <= cfg.repetition_max_share <= 1.0:
        raise bad("repetition_max_share", f"must be in [0, 1] (got {cfg.repetition_max_share})")
    if not 0.0 <= cfg.pmi_lambda <= 1.0:
        raise bad("pmi_lambda", f"must be in [0, 1] (got {cfg.pmi_lambda})")
    _check_baselines(cfg, bad)
    _check_dense(cfg, bad)
    try:
        check_source(cfg.prompts)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{source}: key 'prompts': {exc}") from None
    except PromptDataError as exc:
        raise bad("prompts", str(exc)) from None
    _check_maths(cfg, bad)
    _check_trl_passthrough(cfg, source)
    try:
        trainer_args(cfg, for_validation=True)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: TRL rejected the {cfg.method.upper()} settings: {exc}") from None


def _check_rewards(cfg: TrainConfig, bad: Callable[[str, str], ConfigError]) -> None:
    """Reward names are registered, listed once, and have one weight each."""
    if not cfg.rewards:
        raise bad("rewards", "at least one reward is needed")
    for r in cfg.rewards:
        try:
            get_reward(r)
        except ValueError as exc:
            raise bad("rewards", str(exc)) from None
    if len(set(cfg.rewards)) != len(cfg.rewards):
        raise bad("rewards", f"a reward is listed twice ({cfg.rewards})")
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(cfg.rewards):
        raise bad("reward_weights", f"{len(cfg.reward_weights)} weights for {len(cfg.rewards)} rewards {cfg.rewards}")


def _check_baselines(cfg: TrainConfig, bad: Callable[[str, str], ConfigError]) -> None:
    """The dpo and distill keys (checked whatever the method, so a config's typo never waits for a switch)."""
    if cfg.dpo_beta <= 0:
        raise bad("dpo_beta", f"must be > 0 (got {cfg.dpo_beta})")
    if cfg.distill_samples < 1:
        raise bad("distill_samples", f"must be >= 1 (got {cfg.distill_samples})")
    if cfg.distill_batch_size < 1:
        raise bad("distill_batch_size", f"must be >= 1 (got {cfg.distill_batch_size})")
    if cfg.distill_temperature < 0:
        raise bad("distill_temperature", f"must be >= 0 (got {cfg.distill_temperature})")
    if not 0.0 < cfg.distill_top_p <= 1.0:
        raise bad("distill_top_p", f"must be in (0, 1] (got {cfg.distill_top_p})")
    if cfg.method == "dpo" and cfg.chosen_column == cfg.rejected_column:
        raise bad("rejected_column", f"is the same column as chosen_column ({cfg.chosen_column!r})")


#: Rewards that compute per-token rewards with ``dense: true``.
DENSE_REWARDS = ("cme",)
#: Loss types whose per-token formula takes the advantage token by token (cmerl.training.dense).
DENSE_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "luspo", "cispo", "sapo")


def _check_dense(cfg: TrainConfig, bad: Callable[[str, str], ConfigError]) -> None:
    """``dense`` needs a dense-capable reward and a token-wise loss; a non-scalar estimator needs ``dense``."""
    if cfg.advantage_estimator != "scalar" and not cfg.dense:
        raise bad("advantage_estimator", f"{cfg.advantage_estimator!r} needs per-token rewards: set dense: true")
    if not cfg.dense:
        return
    if cfg.method != "grpo":
        raise bad("dense", f"dense rewards train with GRPO; method is {cfg.method!r}")
    if not any(r in DENSE_REWARDS for r in cfg.rewards):
        raise bad("dense", f"needs a reward with per-token values ({', '.join(DENSE_REWARDS)}) in rewards "
                  f"(got {cfg.rewards})")
    if cfg.advantage_estimator != "scalar":
        if cfg.loss_type not in DENSE_LOSS_TYPES:
            raise bad("loss_type", f"{cfg.loss_type!r} uses sequence-level advantages; dense advantages work with "
                      f"{', '.join(DENSE_LOSS_TYPES)}")
        if cfg.trl.get("multi_objective_aggregation", "sum_then_normalize") != "sum_then_normalize":
            raise bad("trl", "dense advantages combine rewards as sum_then_normalize (multi_objective_aggregation)")


def verifier_users(cfg: TrainConfig) -> list[str]:
    """What in this run reads ``cfg.verifiers``: the rewards registered with ``uses_verifiers`` (grpo), or
    ``distill`` (the first verifier is the teacher); empty for dpo."""
    if cfg.method == "distill":
        return ["distill"]
    if cfg.method == "dpo":
        return []
    return [r for r in cfg.rewards if r in REWARDS and REWARDS[r].uses_verifiers]


def uses_verifiers(cfg: TrainConfig) -> bool:
    """True when the run loads ``cfg.verifiers`` (see :func:`verifier_users`)."""
    return bool(verifier_users(cfg))


def _check_maths(cfg: TrainConfig, bad: Callable[[str, str], ConfigError]) -> None:
    """The maths keys: ``answer_weight`` in [0, 1], a finite ``missing_answer_penalty`` >= 0, gold answers
    for ``correctness``, and a signal ``cme_answer`` can take a span mean of."""
    if not 0.0 <= cfg.answer_weight <= 1.0:
        raise bad("answer_weight", f"must be in [0, 1] (got {cfg.answer_weight})")
    if not (math.isfinite(cfg.missing_answer_penalty) and cfg.missing_answer_penalty >= 0):
        raise bad("missing_answer_penalty", f"must be a finite number >= 0 (got {cfg.missing_answer_penalty})")
    if "correctness" in cfg.rewards and cfg.answer_column is None and not is_problem_source(cfg.prompts):
        raise bad("rewards", f"the correctness reward needs gold answers: prompts {cfg.prompts!r} is no maths set "
                  "(gsm8k_train, gsm8k, math500, openai/gsm8k, ...), so set answer_column to the column that holds them")
    if "cme_answer" in cfg.rewards and cfg.cme_signal == "sum_logprob":
        raise bad("cme_signal", "cme_answer averages over the answer span: use mean_logprob or neg_entropy")


def _check_trl_passthrough(cfg: TrainConfig, source: str) -> None:
    config_cls = _trl_config_class(cfg.method)
    trl_fields = {f.name for f in fields(config_cls)}
    ours = {f.name for f in fields(TrainConfig)}
    for key in cfg.trl:
        if key in ours:
            raise ConfigError(f"{source}: key 'trl.{key}': {key!r} is a top-level cmerl key; set it there")
        if key in _MANAGED_TRL_FIELDS:
            raise ConfigError(f"{source}: key 'trl.{key}': cmerl sets {key!r} itself")
        if key not in trl_fields:
            close = difflib.get_close_matches(key, sorted(trl_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: key 'trl.{key}': not a trl.{config_cls.__name__} field{hint}")


# ------------------------------------------------------------------------------------------- TRL args
#: TrainConfig fields passed to GRPOConfig under the same name.
GRPO_FIELDS = ("num_generations", "max_completion_length", "temperature", "top_p", "learning_rate",
               "lr_scheduler_type", "beta", "loss_type", "scale_rewards", "max_steps",
               "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "mask_truncated_completions",
               "bf16", "gradient_checkpointing", "use_vllm", "vllm_mode", "vllm_server_base_url",
               "vllm_gpu_memory_utilization", "logging_steps", "save_steps", "save_total_limit",
               "log_completions", "num_completions_to_print")


def default_report_to() -> list[str]:
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []


def trl_reward_weights(cfg: TrainConfig) -> list[float]:
    """TRL's ``reward_weights`` for the reward list :func:`~cmerl.training.build_rewards` returns: one per
    ``cfg.rewards`` entry (default 1.0), then 1.0 for the ``repetition_guard`` reward when the guard is on."""
    weights = list(cfg.reward_weights) if cfg.reward_weights is not None else [1.0] * len(cfg.rewards)
    return weights + [1.0] if cfg.repetition_guard else weights


#: TrainConfig fields every method passes to its TRL config under the same name.
SHARED_TRAINER_FIELDS = ("learning_rate", "lr_scheduler_type", "max_steps", "per_device_train_batch_size",
                         "gradient_accumulation_steps", "seed", "bf16", "gradient_checkpointing", "logging_steps",
                         "save_steps", "save_total_limit")


def _trl_config_class(method: str):
    """The TRL config dataclass of a method: GRPOConfig, DPOConfig or SFTConfig."""
    from trl import DPOConfig, GRPOConfig, SFTConfig  # deferred: trl (slow import, loaded only when used)

    return {"grpo": GRPOConfig, "dpo": DPOConfig, "distill": SFTConfig}[method]


def _trainer_kwargs(cfg: TrainConfig, names: Sequence[str], config_cls, *, for_validation: bool) -> dict[str, Any]:
    """Keyword arguments every method's TRL config gets: ``names`` copied from ``cfg``, cmerl's managed
    settings (run directory, step-wise saving and logging, no tqdm, report_to), then the ``trl:`` passthrough."""

    kwargs = {name: getattr(cfg, name) for name in names}
    if "activation_checkpointing" in {f.name for f in fields(config_cls)}:
        # transformers >= 5.x renamed it; the old name still works but warns on every run
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
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
        report_to=cfg.report_to if cfg.report_to is not None else default_report_to(),
        log_level="warning",
        ddp_find_unused_parameters=False,  # every policy parameter that trains is used in each forward
    )
    kwargs.update(cfg.trl)
    if for_validation and not torch.cuda.is_available():
        kwargs["fp16"] = False
    return kwargs


def grpo_args(cfg: TrainConfig, *, for_validation: bool = False):
    """The ``trl.GRPOConfig`` of a run (cheap: no model is loaded).

    ``for_validation`` checks a GPU config on a machine without one: bf16/fp16 are switched off there so
    transformers' hardware check does not hide the other errors.
    """
    from trl import GRPOConfig  # deferred: trl (slow import, loaded only when used)

    kwargs = _trainer_kwargs(cfg, GRPO_FIELDS, GRPOConfig, for_validation=for_validation)
    kwargs["remove_unused_columns"] = False  # the rewards read the raw_prompt column
    kwargs["reward_weights"] = trl_reward_weights(cfg)  # + the repetition guard's
    return GRPOConfig(**kwargs)


def dpo_args(cfg: TrainConfig, *, for_validation: bool = False):
    """The ``trl.DPOConfig`` of a ``method: dpo`` run: the shared keys, ``beta = dpo_beta``, and
    ``max_length = max_prompt_length + max_completion_length`` (prompt + one response, cut at the end)."""
    from trl import DPOConfig  # deferred: trl (slow import, loaded only when used)

    kwargs = _trainer_kwargs(cfg, SHARED_TRAINER_FIELDS, DPOConfig, for_validation=for_validation)
    kwargs.update(beta=cfg.dpo_beta, max_length=cfg.max_prompt_length + cfg.max_completion_length)
    return DPOConfig(**kwargs)


def sft_args(cfg: TrainConfig, *, for_validation: bool = False):
    """The ``trl.SFTConfig`` of a ``method: distill`` run: the shared keys and the loss on completion tokens
    only. No ``max_length`` cut: prompts fit ``max_prompt_length`` and answers are cut to
    ``max_completion_length`` policy tokens when the dataset is built (the GRPO token budget)."""
    from trl import SFTConfig  # deferred: trl (slow import, loaded only when used)

    kwargs = _trainer_kwargs(cfg, SHARED_TRAINER_FIELDS, SFTConfig, for_validation=for_validation)
    kwargs.update(completion_only_loss=True, max_length=None)
    return SFTConfig(**kwargs)


def trainer_args(cfg: TrainConfig, *, for_validation: bool = False):
    """The TRL config of the run's ``method``: :func:`grpo_args`, :func:`dpo_args` or :func:`sft_args`."""
    build = {"grpo": grpo_args, "dpo": dpo_args, "distill": sft_args}[cfg.method]
    return build(cfg, for_validation=for_validation)


def resolved_dtypes(cfg: TrainConfig) -> dict[str, str]:
    """What ``policy_dtype`` and ``verifier_dtype`` resolve to on this machine, as printed lines
    (``float32 (trained weights on CPU)``); explicit values are shown as requested. Loads no model."""

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"policy": str(resolve_dtype(cfg.policy_dtype, device=device, trained=True)),
            "verifier": str(resolve_dtype(cfg.verifier_dtype, device=cfg.verifier_device or device))}


def reward_source(cfg: TrainConfig, name: str, dtypes: dict[str, str]) -> str:
    """`` from <verifiers> (...)`` / `` from the live policy`` for a reward name (what it scores with, from
    its registry entry); ``""`` for a reward that uses neither."""
    entry = REWARDS.get(name)
    parts = []
    if entry is not None and entry.uses_verifiers:
        signal = f"{cfg.cme_signal}, " if name == "cme" else ""
        parts.append(f"{', '.join(cfg.verifiers)} ({signal}{cfg.verifier_dtype}: {dtypes['verifier']})")
    if entry is not None and entry.uses_policy:
        parts.append("the live policy" if cfg.baseline_scorer == "policy" else "a frozen copy of the policy")
    return " from " + " and ".join(parts) if parts else ""


def guard_summary(cfg: TrainConfig) -> str:
    """One line on the repetition guard: what it does to the combined reward, or ``off``."""
    if not cfg.repetition_guard:
        return "off"
    return (f"combined reward {cfg.repetition_floor:g} when >{cfg.repetition_max_share:g} of "
            f"{cfg.repetition_ngram}-grams repeat (the other rewards do not apply to such a completion)")


def describe_run(cfg: TrainConfig, *, processes: int = 1) -> str:
    """A few lines saying what a config will do (models, method and rewards, data, batch arithmetic, steps,
    outputs); loads nothing. ``processes``: the data-parallel world size (``accelerate launch --num_processes``)."""
    trained = f"LoRA r={cfg.lora_r} (alpha {cfg.lora_alpha})" if cfg.lora else "all weights"
    dtypes = resolved_dtypes(cfg)
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes
    data = cfg.prompts + (f" (split {cfg.prompt_split})" if source_kind(cfg.prompts) == "hub" else "")
    limits = [f"prompts <= {cfg.max_prompt_length} tokens"]
    if cfg.max_prompts is not None:
        limits.append(f"first {cfg.max_prompts}")
    if cfg.heldout_prompts:
        limits.append(f"{cfg.heldout_prompts} held out")
    batch = (f"{cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} accumulation x {processes} "
             f"process{'es' if processes != 1 else ''} = {per_step}")
    head = [f"policy     {cfg.policy} ({cfg.policy_dtype}: {dtypes['policy']}), training {trained}"]
    if cfg.method == "dpo":
        body = [
            (f"method     DPO (TRL DPOTrainer), beta {cfg.dpo_beta:g}, on the {cfg.chosen_column}/{cfg.rejected_column} "
             f"pairs of the prompts; reference = the initial policy"),
            f"prompts    {data}; {', '.join(limits)}",
            (f"per step   {batch} preference pairs (chosen and rejected each cut to "
             f"{cfg.max_prompt_length + cfg.max_completion_length} tokens with the prompt), "
             f"learning rate {cfg.learning_rate:g}"),
        ]
    elif cfg.method == "distill":
        sampling = ("greedy" if cfg.distill_temperature == 0
                    else f"temperature {cfg.distill_temperature:g}, top_p {cfg.distill_top_p:g}")
        body = [
            (f"method     distill: SFT (TRL SFTTrainer, loss on completion tokens only) on the answers of "
             f"{cfg.verifiers[0]} ({cfg.verifier_dtype}: {dtypes['verifier']})"),
            (f"teacher    {cfg.distill_samples} answer{'s' if cfg.distill_samples != 1 else ''} per training prompt, "
             f"{sampling}, up to {cfg.max_completion_length} tokens, seed {cfg.seed} -> "
             f"{Path(cfg.output_dir) / TEACHER_OUTPUTS_NAME} (resumable)"),
            f"prompts    {data}; {', '.join(limits)}",
            (f"per step   {batch} (prompt, verifier answer) sequences, answers cut to {cfg.max_completion_length} "
             f"policy tokens: the budget of a GRPO step of this config ({per_step} completions of <= "
             f"{cfg.max_completion_length} tokens), learning rate {cfg.learning_rate:g}"),
        ]
    else:
        weights = cfg.reward_weights or [1.0] * len(cfg.rewards)
        rewards = [f"{w:g} x {name}{reward_source(cfg, name, dtypes)}" for name, w in zip(cfg.rewards, weights)]
        generation = (f"vLLM ({cfg.vllm_mode})" if cfg.use_vllm else "transformers generate")
        body = [
            f"reward     {' + '.join(rewards)}",
            f"guard      {guard_summary(cfg)}",
            *([(f"dense      per-token {', '.join(r for r in cfg.rewards if r in DENSE_REWARDS)} rewards, "
                f"advantage_estimator {cfg.advantage_estimator} (DenseGRPOTrainer)")] if cfg.dense else []),
            f"prompts    {data}; {', '.join(limits)}",
            (f"per step   {cfg.per_device_train_batch_size} completions x {cfg.gradient_accumulation_steps} "
             f"accumulation x {processes} process{'es' if processes != 1 else ''} = {per_step} completions = "
             f"{per_step / cfg.num_generations:g} prompts x G={cfg.num_generations}"),
            (f"sampling   {generation}, up to {cfg.max_completion_length} tokens, temperature {cfg.temperature}, "
             f"loss {cfg.loss_type}, beta {cfg.beta}, learning rate {cfg.learning_rate:g}"),
        ]
    tail = [(f"steps      {cfg.max_steps}, checkpoint every {cfg.save_steps}"
             + (f" (keep {cfg.save_total_limit})" if cfg.save_total_limit else "") + f" -> {cfg.output_dir}")]
    return "\n".join(head + body + tail)
