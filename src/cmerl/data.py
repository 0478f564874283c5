"""Prompt sets for training: bundled files, local JSONL/JSON/Parquet files, Hugging Face datasets.

A prompt source is one of:

* a bundled name: ``ultrafeedback`` (1,000 UltraFeedback prompts, MIT) or ``alpaca_eval`` (the 805
  AlpacaEval instructions, CC BY-NC 4.0); see ``cmerl/data/README.md`` for provenance and licences;
* a maths problem set of :mod:`cmerl.problems` (``gsm8k_train``, ``gsm8k``, ``math500``, or the hub ids
  ``openai/gsm8k``, ``HuggingFaceH4/MATH-500``, ``DigitalLearningGmbH/MATH-lighteval``): prompts are the
  questions with the answer instruction, and the gold final answers come along (:func:`read_answers`);
* a local ``.jsonl`` / ``.json`` / ``.parquet`` file with a prompt column (default ``prompt``) holding a
  string or a chat message list ``[{"role": ..., "content": ...}]``;
* anything else (a hub id, or a local dataset folder) goes to ``datasets.load_dataset(source, split=split)``.

Prompts longer than ``max_prompt_length`` tokens (as the policy will see them: rendered with its chat
template and generation prompt) are dropped and counted, never truncated mid-sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cmerl.formatting import Prompt, RenderConfig, as_messages, completion_text, render_context
from cmerl.io import read_records
from cmerl.problems import ProblemDataError, is_problem_source, load_problems
from cmerl.prompt_sources import BUNDLED, FILE_SUFFIXES, hub_unreachable_message

DATA_DIR = Path(__file__).parent / "data"

SourceKind = Literal["bundled", "file", "hub"]


class PromptDataError(ValueError):
    """A prompt source that cannot be read or holds unusable rows."""


def source_kind(source: str) -> SourceKind:
    """Classify a prompt source without reading it (see module docstring)."""
    if not isinstance(source, str) or not source.strip():
        raise PromptDataError(f"prompt source must be a non-empty string (got {source!r})")
    if source in BUNDLED:
        return "bundled"

    if is_problem_source(source):
        return "hub" if "/" in source else "bundled"
    path = Path(source).expanduser()
    if path.is_dir():
        return "hub"  # a local dataset folder: datasets.load_dataset reads it
    if path.suffix in FILE_SUFFIXES or source.startswith((".", "/", "~")) or path.exists():
        return "file"
    return "hub"


def check_source(source: str) -> SourceKind:
    """Classify ``source`` and fail fast (FileNotFoundError naming the path) when a local file is missing."""
    kind = source_kind(source)
    if kind == "file":
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        if path.suffix not in FILE_SUFFIXES:
            raise PromptDataError(f"{path}: unsupported prompt file type {path.suffix!r}; "
                                  f"use one of {', '.join(FILE_SUFFIXES)}")
    return kind


def _refuse_when_hub_unreachable(source: str) -> None:
    """A hub dataset id with no network fails at once (instead of after ``datasets``' connection retries);
    in datasets' offline mode (``HF_DATASETS_OFFLINE=1``) a copy cached earlier is used, as datasets does."""
    message = hub_unreachable_message(source)
    if message is not None:
        raise PromptDataError(message)


def _validate_prompt(value: Any, where: str) -> Prompt:
    if isinstance(value, str):
        if not value.strip():
            raise PromptDataError(f"{where}: empty prompt")
        return value
    try:
        messages = as_messages(value)
    except (TypeError, ValueError) as exc:
        raise PromptDataError(f"{where}: {exc}") from None
    for m in messages:
        if not isinstance(m["content"], str):
            raise PromptDataError(f"{where}: message content must be a string (got {type(m['content']).__name__})")
    return messages


def _rows_of_file(path: Path) -> list[tuple[int, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # deferred: pyarrow (slow import, fast CLI start)

        return [(i + 1, row) for i, row in enumerate(pq.read_table(path).to_pylist())]

    rows, bad = read_records(path)
    if bad:
        raise PromptDataError(f"{path}: line {bad[0].line}: {bad[0].reason}")
    return rows


def read_prompts(source: str, *, column: str = "prompt", split: str = "train") -> list[Prompt]:
    """All prompts of ``source`` in file order. ``column`` is ignored for bundled sources.

    Raises FileNotFoundError for a missing file, PromptDataError naming the row for a missing column or
    a malformed prompt, and PromptDataError when a hub dataset cannot be loaded.
    """
    kind = check_source(source)

    if is_problem_source(source):
        return [p.prompt for p in _problems(source, split)]
    if kind == "hub":
        _refuse_when_hub_unreachable(source)
        try:
            from datasets import load_dataset  # deferred: datasets (slow import, fast CLI start)

            ds = load_dataset(source, split=split)
        except Exception as exc:
            raise PromptDataError(
                f"could not load Hugging Face dataset {source!r} (split {split!r}): {exc}. Use a bundled name "
                f"({', '.join(BUNDLED)}) or a local {'/'.join(FILE_SUFFIXES)} file instead.") from exc
        if column not in ds.column_names:
            raise PromptDataError(f"dataset {source!r} has no column {column!r} (columns: {ds.column_names})")
        return [_validate_prompt(v, f"{source} row {i}") for i, v in enumerate(ds[column])]
    if kind == "bundled":
        name, column = BUNDLED[source]
        path = DATA_DIR / name
    else:
        path = Path(source).expanduser()
    out = []
    for line, row in _rows_of_file(path):
        where = f"{path} row {line}"
        if not isinstance(row, dict):
            raise PromptDataError(f"{where}: not a JSON object (got {type(row).__name__})")
        if column not in row:
            raise PromptDataError(f"{where}: missing column {column!r} (has {sorted(row)})")
        out.append(_validate_prompt(row[column], where))
    if not out:
        raise PromptDataError(f"{path}: no prompts")
    return out


def _problems(source: str, split: str):
    try:
        return load_problems(source, split=split)
    except ProblemDataError as exc:
        raise PromptDataError(str(exc)) from None


def read_answers(source: str, *, column: str | None = None, split: str = "train") -> list[str] | None:
    """Gold final answers parallel to :func:`read_prompts` (same source, same order): a maths problem
    set's own (``column`` ignored); else the ``column`` field of each row of a file or hub dataset, as a
    string; None when ``column`` is None and the source is no maths set. A missing or empty answer raises
    PromptDataError naming the row."""
    if is_problem_source(source):
        return [p.answer for p in _problems(source, split)]
    if column is None:
        return None
    kind = check_source(source)
    if kind == "hub":
        _refuse_when_hub_unreachable(source)
        try:
            from datasets import load_dataset  # deferred: datasets (slow import, fast CLI start)

            values = list(enumerate(load_dataset(source, split=split)[column], start=1))
        except Exception as exc:
            raise PromptDataError(f"could not read answer column {column!r} of {source!r} (split {split!r}): "
                                  f"{exc}") from exc
        where = source
    else:
        path = DATA_DIR / BUNDLED[source][0] if kind == "bundled" else Path(source).expanduser()
        rows = _rows_of_file(path)
        for line, row in rows:
            if not isinstance(row, dict) or column not in row:
                raise PromptDataError(f"{path} row {line}: missing answer column {column!r}")
        values, where = [(line, row[column]) for line, row in rows], str(path)
    out = []
    for line, v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not v.strip():
            raise PromptDataError(f"{where} row {line}: answer column {column!r} must be a non-empty string "
                                  f"(got {v!r})")
        out.append(v.strip())
    return out


def to_policy_prompt(prompt: Prompt, tokenizer, system_prompt: str | None = None) -> Prompt:
    """The prompt as GRPOTrainer should receive it for this policy tokenizer: a message list (TRL then
    applies the chat template with the generation prompt), with ``system_prompt`` as a system turn when
    given and the prompt has none; without a chat template, the plain-format text that
    :func:`cmerl.formatting.render_context` gives for the same prompt and system prompt, so the policy
    generates from exactly the context its own rewards (self-certainty, self-likelihood) score with."""
    if getattr(tokenizer, "chat_template", None):
        messages = as_messages(prompt)
        if system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        return messages
    return render_context(tokenizer, prompt, RenderConfig(system_prompt=system_prompt, use_chat_template=False))


def policy_prompt_ids(prompt: Prompt, tokenizer, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt as the policy sees it during GRPO (:func:`to_policy_prompt`, then the chat
    template with the generation prompt, or the plain-format text tokenised): the one policy-prompt
    tokenisation (prompt-length filter, demo samples)."""
    policy_prompt = to_policy_prompt(prompt, tokenizer, system_prompt)
    if isinstance(policy_prompt, str):
        return list(tokenizer(policy_prompt)["input_ids"])
    enc = tokenizer.apply_chat_template(policy_prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def prompt_token_count(prompt: Prompt, tokenizer, system_prompt: str | None = None) -> int:
    """Tokens of the prompt as the policy sees it during GRPO (:func:`policy_prompt_ids`)."""
    return len(policy_prompt_ids(prompt, tokenizer, system_prompt))


@dataclass
class PromptSet:
    """Prompts selected for a run.

    prompts: training prompts, as read (strings or message lists), in source order.
    heldout: the last ``heldout`` prompts that fit, kept out of training (for before/after samples).
    n_read: prompts in the source; n_too_long: dropped for exceeding ``max_prompt_length`` tokens;
    n_unused: prompts that fit but were beyond ``max_prompts``.
    answers: gold final answers parallel to ``prompts`` (maths sets, or an ``answer_column``), else None.
    """

    source: str
    prompts: list[Prompt]
    heldout: list[Prompt] = field(default_factory=list)
    n_read: int = 0
    n_too_long: int = 0
    n_unused: int = 0
    max_prompt_length: int | None = None
    answers: list[str] | None = None

    def summary(self) -> str:
        s = f"{len(self.prompts)} training prompts from {self.source} ({self.n_read} read"
        if self.n_too_long:
            s += f", {self.n_too_long} dropped as longer than {self.max_prompt_length} tokens"
        if self.n_unused:
            s += f", {self.n_unused} beyond max_prompts unused"
        if self.heldout:
            s += f", {len(self.heldout)} held out"
        return s + ")"


def select_prompts(prompts: list[Prompt], tokenizer, *, max_prompt_length: int | None,
                   max_prompts: int | None = None, heldout: int = 0, source: str = "<list>",
                   system_prompt: str | None = None, answers: list[str] | None = None) -> PromptSet:
    """Drop prompts over ``max_prompt_length`` tokens, hold out the last ``heldout`` that fit, then keep
    the first ``max_prompts`` of the rest. ``answers`` (parallel to ``prompts``) follow their prompts into
    :attr:`PromptSet.answers`. Raises PromptDataError when no training prompt is left."""
    if max_prompt_length is not None and max_prompt_length < 1:
        raise PromptDataError(f"max_prompt_length must be >= 1 (got {max_prompt_length})")
    if answers is not None and len(answers) != len(prompts):
        raise PromptDataError(f"{source}: {len(answers)} answers for {len(prompts)} prompts")
    keep = [i for i, p in enumerate(prompts)
            if max_prompt_length is None or prompt_token_count(p, tokenizer, system_prompt) <= max_prompt_length]
    fitting = [prompts[i] for i in keep]
    held = fitting[len(fitting) - heldout:] if heldout > 0 else []
    train = fitting[:len(fitting) - len(held)]
    unused = 0
    if max_prompts is not None and len(train) > max_prompts:
        unused = len(train) - max_prompts
        train = train[:max_prompts]
    if not train:
        raise PromptDataError(
            f"no training prompts left from {source}: {len(prompts)} read, {len(prompts) - len(fitting)} longer "
            f"than max_prompt_length={max_prompt_length} tokens, {len(held)} held out")
    return PromptSet(source=source, prompts=train, heldout=held, n_read=len(prompts),
                     n_too_long=len(prompts) - len(fitting), n_unused=unused, max_prompt_length=max_prompt_length,
                     answers=None if answers is None else [answers[i] for i in keep[:len(train)]])


def load_prompt_set(source: str, tokenizer, *, column: str = "prompt", split: str = "train",
                    max_prompt_length: int | None = None, max_prompts: int | None = None,
                    heldout: int = 0, system_prompt: str | None = None,
                    answer_column: str | None = None) -> PromptSet:
    """:func:`read_prompts` (and :func:`read_answers`) then :func:`select_prompts`."""
    return select_prompts(read_prompts(source, column=column, split=split), tokenizer,
                          max_prompt_length=max_prompt_length, max_prompts=max_prompts, heldout=heldout,
                          source=source, system_prompt=system_prompt,
                          answers=read_answers(source, column=answer_column, split=split))


def to_dataset(prompt_set: PromptSet, tokenizer, system_prompt: str | None = None):
    """A ``datasets.Dataset`` for GRPOTrainer: ``prompt`` in the policy's format (:func:`to_policy_prompt`)
    and ``raw_prompt`` as read, which the rewards score against (so verifiers render it their own way);
    with gold answers, an ``answer`` column too (TRL passes it to every reward as ``answer=[...]``)."""
    from datasets import Dataset  # deferred: datasets (slow import, fast CLI start)

    rows = [{"prompt": to_policy_prompt(p, tokenizer, system_prompt), "raw_prompt": p} for p in prompt_set.prompts]
    if prompt_set.answers is not None:
        for row, answer in zip(rows, prompt_set.answers, strict=True):
            row["answer"] = answer
    return Dataset.from_list(rows)


# ------------------------------------------------------------------------------------- preference pairs
@dataclass(frozen=True)
class PreferencePair:
    """One preference row: a prompt (as read) and the texts of its preferred and dispreferred responses."""

    prompt: Prompt
    chosen: str
    rejected: str


def _response_text(value: Any, where: str) -> str:
    """A response column's text: a string, or a message list whose assistant turns are the response (TRL's
    conversational ``chosen``; a leading user turn, as in UltraFeedback-binarized rows, is skipped)."""
    try:
        text = completion_text(value)
    except TypeError as exc:
        raise PromptDataError(f"{where}: {exc}") from None
    if not text.strip():
        raise PromptDataError(f"{where}: empty response")
    return text


def read_preference_pairs(source: str, *, column: str = "prompt", chosen_column: str = "chosen",
                          rejected_column: str = "rejected", split: str = "train") -> list[PreferencePair]:
    """All ``prompt / chosen / rejected`` rows of ``source`` (a bundled name, a file or a hub dataset, as for
    :func:`read_prompts`), in order. The bundled ``ultrafeedback`` set has ``chosen`` and ``rejected``.

    Raises FileNotFoundError for a missing file and PromptDataError naming the row and column for a missing
    column, a malformed prompt or an empty response.
    """
    kind = check_source(source)
    if kind == "hub":
        _refuse_when_hub_unreachable(source)
        try:
            from datasets import load_dataset  # deferred: datasets (slow import, fast CLI start)

            ds = load_dataset(source, split=split)
        except Exception as exc:
            raise PromptDataError(f"could not load Hugging Face dataset {source!r} (split {split!r}): {exc}") from exc
        rows, where = list(enumerate(ds, start=1)), source
    else:
        if kind == "bundled":
            name, column = BUNDLED[source]
            path = DATA_DIR / name
        else:
            path = Path(source).expanduser()
        rows, where = _rows_of_file(path), str(path)
    pairs = []
    for line, row in rows:
        at = f"{where} row {line}"
        if not isinstance(row, dict):
            raise PromptDataError(f"{at}: not a JSON object (got {type(row).__name__})")
        for col in (column, chosen_column, rejected_column):
            if col not in row:
                raise PromptDataError(f"{at}: missing column {col!r} (has {sorted(row)}); preference data needs "
                                      f"{column!r}, {chosen_column!r} and {rejected_column!r}")
        pairs.append(PreferencePair(prompt=_validate_prompt(row[column], at),
                                    chosen=_response_text(row[chosen_column], f"{at} column {chosen_column!r}"),
                                    rejected=_response_text(row[rejected_column], f"{at} column {rejected_column!r}")))
    if not pairs:
        raise PromptDataError(f"{where}: no preference rows")
    return pairs


def load_preference_set(source: str, tokenizer, *, column: str = "prompt", chosen_column: str = "chosen",
                        rejected_column: str = "rejected", split: str = "train",
                        max_prompt_length: int | None = None, max_prompts: int | None = None, heldout: int = 0,
                        system_prompt: str | None = None) -> tuple[PromptSet, list[PreferencePair]]:
    """:func:`read_preference_pairs`, then the prompt selection of :func:`select_prompts` (the same
    length limit, held-out and ``max_prompts`` rules as a GRPO run of the same config). Returns the
    :class:`PromptSet` and the pairs of its training prompts, in order."""
    pairs = read_preference_pairs(source, column=column, chosen_column=chosen_column,
                                  rejected_column=rejected_column, split=split)
    selected = select_prompts([p.prompt for p in pairs], tokenizer, max_prompt_length=max_prompt_length,
                              max_prompts=max_prompts, heldout=heldout, source=source, system_prompt=system_prompt)
    # The selected prompts are an in-order subsequence of the rows: walk the rows once to pair them up.
    rows = iter(pairs)
    return selected, [next(r for r in rows if r.prompt == p) for p in selected.prompts]


def to_preference_dataset(pairs: list[PreferencePair], tokenizer, system_prompt: str | None = None):
    """A ``datasets.Dataset`` for TRL's DPOTrainer: ``prompt`` in the policy's format
    (:func:`to_policy_prompt`), ``chosen`` / ``rejected`` as assistant messages for a chat-template policy,
    else as plain text continuing the plain-format prompt."""
    from datasets import Dataset  # deferred: datasets (slow import, fast CLI start)

    rows = []
    for pair in pairs:
        prompt = to_policy_prompt(pair.prompt, tokenizer, system_prompt)
        if isinstance(prompt, list):
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": pair.chosen}],
                         "rejected": [{"role": "assistant", "content": pair.rejected}]})
        else:
            rows.append({"prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected})
    return Dataset.from_list(rows)
