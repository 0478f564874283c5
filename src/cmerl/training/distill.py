"""The distillation baseline (``method: distill``, ``cmerl distill``): fine-tune the policy on the
verifier's own answers, to ask whether GRPO on the verifier's likelihood is more than a slow way of
distilling it.

1. :func:`ensure_teacher_outputs`: the first of ``cfg.verifiers`` answers every training prompt (the
   prompt set a GRPO run of the same config trains on, selected by the same rules), ``distill_samples``
   times, sampling with ``distill_temperature`` / ``distill_top_p``, up to ``max_completion_length``
   tokens, seeded by ``seed``. Prompts are rendered the verifier's own way, as it renders them when it
   scores CME (its chat template, no system prompt). The answers go to ``RUN_DIR/teacher_outputs.json``
   through :func:`cmerl.generation.generate_outputs`: AlpacaEval outputs format (``cmerl judge`` can
   compare them with any system), the sampling settings in every row and the run's fingerprint (settings
   and what the verifier's weights are, :mod:`cmerl.fingerprint`) beside the file, resumable (a rerun
   generates only what is missing) and refusing rows made with other settings, other weights or for
   other prompts.
2. :func:`teacher_dataset`: prompt/completion rows for TRL's ``SFTTrainer``: the prompt in the policy's
   format (chat template + ``system_prompt``, exactly what GRPO samples from), the answer cut to
   ``max_completion_length`` policy tokens. With the loss on completion tokens only and the run's
   ``max_steps``, ``per_device_train_batch_size`` and ``gradient_accumulation_steps``, one SFT step
   trains on as many sequences, of at most as many completion tokens, as one GRPO step of the same config.

The SFT run itself (checkpoints, ``metrics.jsonl``, run card, ``final/``) is built by
:mod:`cmerl.training.run` like a GRPO run.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from cmerl import models  # module attribute calls: tests spy on models.load_model
from cmerl.data import PromptSet, load_prompt_set, to_policy_prompt
from cmerl.fingerprint import model_fingerprint
from cmerl.generation import GenerationConfig, PromptItem, generate_outputs, outputs_complete
from cmerl.io import read_records
from cmerl.training.config import TEACHER_OUTPUTS_NAME, ConfigError, StatusPrinter, TrainConfig


def teacher_outputs_path(cfg: TrainConfig) -> Path:
    """``RUN_DIR/teacher_outputs.json``."""
    return Path(cfg.output_dir) / TEACHER_OUTPUTS_NAME


def teacher_generation(cfg: TrainConfig) -> GenerationConfig:
    """The verifier's sampling settings (recorded in every output row and checked on resume)."""
    return GenerationConfig(max_new_tokens=cfg.max_completion_length, temperature=cfg.distill_temperature,
                            top_p=cfg.distill_top_p, seed=cfg.seed, batch_size=cfg.distill_batch_size,
                            dtype=cfg.verifier_dtype, system_prompt=None)


def training_prompts(cfg: TrainConfig, policy_tokenizer) -> PromptSet:
    """The prompts a GRPO run of ``cfg`` trains on (length limit in policy tokens, held-out, max_prompts)."""
    return load_prompt_set(cfg.prompts, policy_tokenizer, column=cfg.prompt_column, split=cfg.prompt_split,
                           max_prompt_length=cfg.max_prompt_length, max_prompts=cfg.max_prompts,
                           heldout=cfg.heldout_prompts, system_prompt=cfg.system_prompt)


def teacher_items(cfg: TrainConfig, prompt_set: PromptSet) -> list[PromptItem]:
    """One item per (prompt i, sample j): index ``i * distill_samples + j``, the prompt as read."""
    k = cfg.distill_samples
    return [PromptItem(index=i * k + j, instruction=prompt, dataset=prompt_set.source)  # type: ignore[arg-type]
            for i, prompt in enumerate(prompt_set.prompts) for j in range(k)]


def ensure_teacher_outputs(cfg: TrainConfig, policy_tokenizer, *, progress: bool = False,
                           print_status: StatusPrinter | None = None) -> list[dict]:
    """Generate whatever is missing of ``RUN_DIR/teacher_outputs.json`` (see the module docstring) and
    return its rows for the training prompts, in item order. Loads the verifier only when something is
    missing, and frees it afterwards. Raises :class:`ConfigError` when the file holds answers made with
    other settings."""
    prompt_set = training_prompts(cfg, policy_tokenizer)
    items = teacher_items(cfg, prompt_set)
    output = teacher_outputs_path(cfg)
    generation = teacher_generation(cfg)
    teacher = cfg.verifiers[0]
    weights = model_fingerprint(teacher)
    if outputs_complete(output, items, generator=teacher, config=generation, model_fingerprint=weights):
        rows, _ = read_records(output)
        by_index = {int(r["index"]): r for _, r in rows}
        if print_status:
            print_status(f"teacher answers: {len(items)} already in {output}")
        return [by_index[it.index] for it in items]
    # deferred: accelerate / trl (slow imports, loaded only when used)
    from accelerate import PartialState

    device = cfg.verifier_device or str(PartialState().device)
    if print_status:
        print_status(f"teacher answers: {cfg.distill_samples} per prompt for {len(prompt_set.prompts)} prompts from "
             f"{teacher} -> {output}")
    model, tokenizer = models.load_model(teacher, dtype=cfg.verifier_dtype, device=device, role="teacher")
    try:
        return generate_outputs(model, tokenizer, items, output, generator=teacher, config=generation,
                                progress=progress, model_fingerprint=weights)
    except ValueError as exc:  # RunMismatchError: rows of another run (settings, weights, prompts) never mix
        raise ConfigError(f"distill: {exc}") from None
    finally:
        del model
        gc.collect()


def teacher_dataset(cfg: TrainConfig, policy_tokenizer) -> tuple[PromptSet, Any, dict[str, int]]:
    """``(prompt set, datasets.Dataset, counts)`` for ``SFTTrainer`` from a complete
    ``teacher_outputs.json``: columns ``prompt`` (policy format) and ``completion`` (assistant messages for
    a chat-template policy, else text), each answer cut to ``max_completion_length`` policy tokens.

    ``counts``: ``answers``, ``cut`` (answers longer than the budget in policy tokens) and ``length``
    (answers the verifier itself stopped at ``max_completion_length``). Raises :class:`ConfigError` when
    the file is missing or incomplete for this config (run ``cmerl distill`` to generate it).
    """
    from datasets import Dataset  # deferred: datasets (slow import, loaded only when used)

    prompt_set = training_prompts(cfg, policy_tokenizer)
    items = teacher_items(cfg, prompt_set)
    output = teacher_outputs_path(cfg)
    if not outputs_complete(output, items, generator=cfg.verifiers[0], config=teacher_generation(cfg),
                            model_fingerprint=model_fingerprint(cfg.verifiers[0])):
        raise ConfigError(f"{output} does not hold every teacher answer for this config; `cmerl distill --config "
                          "...` (or --resume RUN_DIR) generates the missing ones before training")
    rows, _ = read_records(output)
    by_index = {int(r["index"]): r for _, r in rows}
    budget = cfg.max_completion_length
    records, cut, length = [], 0, 0
    for it in items:
        row = by_index[it.index]
        text = row["output"]
        ids = policy_tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > budget:
            text, cut = policy_tokenizer.decode(ids[:budget], skip_special_tokens=True), cut + 1
        length += row.get("finish_reason") == "length"
        prompt = to_policy_prompt(prompt_set.prompts[it.index // cfg.distill_samples], policy_tokenizer,
                                  cfg.system_prompt)
        completion = [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
        records.append({"prompt": prompt, "completion": completion})
    return prompt_set, Dataset.from_list(records), {"answers": len(records), "cut": cut, "length": length}
