"""Batched sampling over a prompt set, written as AlpacaEval ``model_outputs.json``, resumably.

Output rows follow AlpacaEval's format (``instruction``, ``output``, ``generator``, plus ``dataset``) and
add ``index`` (position in the prompt set), ``finish_reason`` ("stop" or "length"), ``n_tokens`` and
``generation`` (the settings, identical in every row). Prompts are rendered with
:func:`cmerl.formatting.render_context` (the chat template, or the plain format for base models), the
same rendering the verifier scores, and left-padded into batches of similar length.

Resuming: while running, finished rows are appended (and fsynced) to ``<output>.partial.jsonl`` after
every batch; the final JSON list is written atomically when every prompt is done, and the partial file is
then removed. A rerun with the same output path keeps the rows already in the output file or the partial
file and generates only the missing prompts. It must be the same run: ``<output>.fingerprint.json``
(:mod:`cmerl.fingerprint`, written before the first row) records the settings and what the model's
weights are (:func:`generator_fingerprint`), and a rerun with other settings or other weights, or onto
an output whose rows answer other instructions at the same indices, is refused naming what differs.

Prompt set specs: ``alpaca_eval`` (the bundled 805 instructions), ``ultrafeedback`` (bundled 1,000
prompts), or a ``.jsonl`` / ``.json`` file with ``instruction`` or ``prompt`` fields (strings), each
optionally sliced: ``alpaca_eval:50`` or ``alpaca_eval[:50]`` (first 50), ``file.jsonl[100:200]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig as HFGenerationConfig
from transformers import StoppingCriteria, StoppingCriteriaList

from cmerl.fingerprint import Fingerprint, RunMismatchError, guard_output, model_fingerprint, read_sidecar
from cmerl.formatting import RenderConfig, end_of_turn_id, render_context, uses_chat_template
from cmerl.io import append_jsonl, iter_jsonl, read_records, write_json_atomic
from cmerl.prompt_sources import parse_prompt_spec

BUNDLED_PROMPTS = {"alpaca_eval": ("alpaca_eval_805.jsonl", "instruction"),
                   "ultrafeedback": ("ultrafeedback_1000.jsonl", "prompt")}
PLAIN_STOP_STRINGS = ("\n### Instruction", "\n### Response")


@dataclass(frozen=True)
class PromptItem:
    """One instruction of a prompt set: ``index`` is its position in the (unsliced) set."""

    index: int
    instruction: str
    dataset: str | None = None


def load_prompt_items(spec: str) -> list[PromptItem]:
    """The prompts of a spec (see module docstring), sliced; raises naming the file/row on bad input."""
    source, start, stop = parse_prompt_spec(spec)
    if source in BUNDLED_PROMPTS:
        fname, field = BUNDLED_PROMPTS[source]
        text = resources.files("cmerl").joinpath("data", fname).read_text(encoding="utf-8")
        rows = [(i + 1, json.loads(line)) for i, line in enumerate(text.splitlines()) if line.strip()]
        where = f"bundled {source}"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt set not found: {source!r} is neither a bundled set "
                                    f"({', '.join(BUNDLED_PROMPTS)}) nor a file")
        rows, bad = read_records(path)
        if bad:
            raise ValueError(f"{path}: line {bad[0].line}: {bad[0].reason}")
        field, where = None, str(path)
    items = []
    for k, (line, row) in enumerate(rows):
        items.append(PromptItem(k, _instruction_of(row, field, f"{where}, row {line}"),
                                row.get("dataset") if isinstance(row, dict) else None))
    items = items[start:stop]
    if not items:
        raise ValueError(f"prompt set {spec!r} is empty")
    return items


def _instruction_of(row: object, field: str | None, where: str) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'instruction' or 'prompt' (got {type(row).__name__})")
    value = row.get(field) if field else row.get("instruction", row.get("prompt"))
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "user":
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: needs a non-empty string 'instruction' or 'prompt' (single-turn) "
                         f"(got {type(value).__name__})")
    return value


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings, recorded in every output row.

    temperature 0 means greedy decoding (the default; ``top_p`` and ``seed`` then play no part).
    ``seed`` seeds each batch with ``seed + index of its first prompt``, so sampled outputs do not
    depend on how a run was interrupted. ``dtype`` is the weights' dtype setting while generating (``auto``:
see :mod:`cmerl.precision`); each row also records the dtype it was generated in (``weights_dtype``).
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    dtype: str = "auto"
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0 or math.isnan(self.temperature):
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {self.batch_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decoding"] = "greedy" if self.greedy else "sampling"
        d.pop("batch_size")  # does not change greedy outputs beyond numerics; kept out of the resume check
        return d


# --------------------------------------------------------------------------- model loading
def resolve_trained_model(path: str | Path) -> Path:
    """The folder to load from a training output folder: itself when it holds ``config.json`` or
    ``adapter_config.json``, else ``final/``, ``model/``, or the highest ``checkpoint-N/`` inside it."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"trained model folder not found: {p}")
    def loadable(d: Path) -> bool:
        return (d / "config.json").is_file() or (d / "adapter_config.json").is_file()
    if loadable(p):
        return p
    for name in ("final", "model"):
        if loadable(p / name):
            return p / name
    ckpts = sorted((d for d in p.glob("checkpoint-*") if d.is_dir() and loadable(d)),
                   key=lambda d: int(d.name.split("-")[-1]) if d.name.split("-")[-1].isdigit() else -1)
    if ckpts:
        return ckpts[-1]
    raise FileNotFoundError(f"{p} holds no model: expected config.json or adapter_config.json in it, or in "
                            "final/, model/ or checkpoint-*/")


def generator_fingerprint(name: str) -> dict:
    """What the model :func:`load_generator` loads for ``name`` is (:func:`cmerl.fingerprint.model_fingerprint`
    of the folder it resolves to, for a training output folder), without loading it."""
    p = Path(name).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        p = resolve_trained_model(p)
    return model_fingerprint(str(p) if p.is_dir() else name)


def load_generator(name: str, *, dtype: str = "auto"):
    """``(model, tokenizer)`` for a model name (see :mod:`cmerl.models`) or a training output folder
    (merged weights, or a PEFT adapter whose base is loaded and merged)."""
    # deferred: torch, via cmerl.models (slow import, loaded only when used)
    from cmerl.models import load_model, load_tokenizer

    p = Path(name).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        p = resolve_trained_model(p)
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        from peft import PeftModel  # deferred: peft (slow import, loaded only when used)

        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        base = base.split(":", 1)[1] if base.split(":", 1)[0] in ("packaged", "folder", "gguf", "hub") else base
        if not base:
            raise ValueError(f"{p}/adapter_config.json names no base_model_name_or_path")
        model, tok = load_model(base, dtype=dtype, role="generator")
        model = PeftModel.from_pretrained(model, str(p)).merge_and_unload()
        model.eval()
        if (p / "tokenizer_config.json").is_file():
            tok = load_tokenizer(str(p)) if (p / "config.json").is_file() else tok
        return model, tok
    return load_model(str(p) if p.is_dir() else name, dtype=dtype, role="generator")


# --------------------------------------------------------------------------- generation
def partial_path(output: str | Path) -> Path:
    out = Path(output)
    return out.with_name(out.name + ".partial.jsonl")


def _settings(config: GenerationConfig, generator: str, chat: bool) -> dict:
    return {"generator": generator, "chat_template": chat, **config.to_dict()}


def read_done_rows(output: str | Path, settings: dict) -> dict[int, dict]:
    """Rows already generated for ``output`` (final file and sidecar), keyed by prompt index; raises when
    they were made with other settings."""
    out, side = Path(output), partial_path(output)
    done: dict[int, dict] = {}
    if out.is_file() and out.stat().st_size > 0:
        rows, _ = read_records(out)
        for line, row in rows:
            if not isinstance(row, dict) or "index" not in row or "generation" not in row:
                raise ValueError(f"{out} exists and is not a cmerl outputs file (row {line}); pass another --output")
            _check_settings(row["generation"], settings, out)
            done[int(row["index"])] = row
    for i, row in enumerate(iter_jsonl(side)):
        if i == 0:
            _check_settings(row.get("settings", {}), settings, side)
            continue
        done[int(row["index"])] = row
    return done


def _check_settings(old: dict, new: dict, path: Path) -> None:
    diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diffs:
        raise ValueError(f"{path} was generated with other settings ({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diffs)}); "
                         "pass another --output (or delete it) to generate with these settings")


def generation_fingerprint(settings: dict, model: dict | None):
    """The :class:`~cmerl.fingerprint.Fingerprint` of a generate run: its settings and the model's
    fingerprint (``None`` when the caller did not say what the model is: the generator name then stands
    for it)."""
    return Fingerprint("generate", settings={**settings, "model": model})


def generate_outputs(model, tokenizer, items: Sequence[PromptItem], output: str | Path, *, generator: str,
                     config: GenerationConfig = GenerationConfig(), render: RenderConfig | None = None,
                     progress: bool = False, stop_after: int | None = None,
                     model_fingerprint: dict | None = None) -> list[dict]:
    """Generate for every prompt not yet in ``output`` (see module docstring) and return all rows of the
    prompt set in order. ``stop_after`` stops after that many new prompts (the partial file keeps them).
    ``model_fingerprint`` (:func:`generator_fingerprint`) says what the weights are, so a resume with other
    weights is refused. Raises :class:`~cmerl.fingerprint.RunMismatchError` (a ValueError) when ``output``
    belongs to another run."""
    render = render or RenderConfig(system_prompt=config.system_prompt)
    chat = uses_chat_template(tokenizer, render)
    settings = _settings(config, generator, chat)
    out_path, side_path = Path(output), partial_path(output)
    has_rows = any(p.is_file() and p.stat().st_size > 0 for p in (out_path, side_path))
    guard_output(out_path, generation_fingerprint(settings, model_fingerprint), has_rows=has_rows)
    done = read_done_rows(output, settings)
    for it in items:
        if it.index in done and done[it.index]["instruction"] != it.instruction:
            raise RunMismatchError(f"{output} row for prompt {it.index} answers another instruction "
                                   f"({done[it.index]['instruction'][:60]!r}, now {it.instruction[:60]!r}): it was "
                                   "generated for another prompt set; delete it or choose another --output")
    todo = [it for it in items if it.index not in done]
    if stop_after is not None:
        todo = todo[:max(0, stop_after)]
    side = partial_path(output)
    if todo and not side.is_file():
        append_jsonl(side, [{"kind": "cmerl.outputs.partial", "settings": settings}])
    encoded = {it.index: _encode_prompt(tokenizer, it.instruction, render, chat) for it in todo}
    todo.sort(key=lambda it: -len(encoded[it.index]))  # longest first: the first batch shows the peak
    stops = _stop_ids(tokenizer, render)
    choice = getattr(model, "cmerl_dtype", None)  # what auto chose here; "int8" for the quantized path
    weights_dtype = choice.name if choice is not None else str(getattr(model, "dtype", "unknown")).removeprefix("torch.")
    bar = None
    if progress and todo:
        bar = tqdm(total=len(todo), desc=f"generating ({generator})", unit="prompt")
    try:
        for s in range(0, len(todo), config.batch_size):
            batch = todo[s:s + config.batch_size]
            texts = _generate_batch(model, tokenizer, [encoded[it.index] for it in batch], config, stops, chat,
                                    seed=config.seed + min(it.index for it in batch))
            rows = [{"instruction": it.instruction, "output": text, "generator": generator, "dataset": it.dataset,
                     "index": it.index, "finish_reason": reason, "n_tokens": n, "generation": settings,
                     "weights_dtype": weights_dtype}
                    for it, (text, reason, n) in zip(batch, texts)]
            append_jsonl(side, rows)
            done.update({r["index"]: r for r in rows})
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    wanted = {it.index for it in items}
    if all(i in done for i in wanted):
        write_json_atomic(output, [done[i] for i in sorted(done)])
        side.unlink(missing_ok=True)
    return [done[it.index] for it in items if it.index in done]


def outputs_complete(output: str | Path, items: Sequence[PromptItem], *, generator: str,
                     config: GenerationConfig, model_fingerprint: dict | None = None) -> bool:
    """True when ``output`` already holds every prompt of ``items`` generated by ``generator`` with
    ``config`` (so the model need not even be loaded), and its fingerprint records the same
    ``model_fingerprint``."""
    out = Path(output)
    if not out.is_file() or partial_path(out).exists():
        return False
    try:
        recorded = read_sidecar(out)
    except RunMismatchError:
        return False
    if not isinstance(recorded, dict) or (recorded.get("settings") or {}).get("model") != model_fingerprint:
        return False
    try:
        rows, bad = read_records(out)
    except ValueError:
        return False
    have = {}
    for _, row in rows:
        if not isinstance(row, dict) or "index" not in row:
            return False
        have[int(row["index"])] = row
    want = {"generator": generator, **config.to_dict()}
    for it in items:
        row = have.get(it.index)
        if row is None or row.get("instruction") != it.instruction:
            return False
        gen = row.get("generation") or {}
        if any(gen.get(k) != v for k, v in want.items()):
            return False
    return not bad


def _encode_prompt(tokenizer, instruction: str, render: RenderConfig, chat: bool) -> list[int]:
    text = render_context(tokenizer, instruction, render)
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def _stop_ids(tokenizer, render: RenderConfig) -> list[int]:
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer, render)}
    return sorted(i for i in ids if i is not None)


class _StopOnText(StoppingCriteria):
    """Stops a row once its generated text contains a stop string (checks the last ``window`` tokens).

    A light stand-in for transformers' ``stop_strings``, whose set-up scans the whole vocabulary
    (seconds for Gemma's 262k tokens)."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int, window: int = 12):
        self.tokenizer, self.stops, self.start, self.window = tokenizer, tuple(stops), prompt_width, window

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tail = input_ids[:, max(self.start, input_ids.shape[1] - self.window):].tolist()
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


@torch.inference_mode()
def _generate_batch(model, tokenizer, prompts: list[list[int]], config: GenerationConfig, stops: list[int],
                    chat: bool, seed: int) -> list[tuple[str, str, int]]:
    """``(text, finish_reason, n_new_tokens)`` per prompt; prompts are left-padded to one width."""

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    sampling = {} if config.greedy else {"temperature": config.temperature, "top_p": config.top_p, "top_k": 0}
    gen = HFGenerationConfig(max_new_tokens=config.max_new_tokens, do_sample=not config.greedy,
                             repetition_penalty=1.0, pad_token_id=pad, eos_token_id=stops, **sampling)
    criteria = StoppingCriteriaList([_StopOnText(tokenizer, PLAIN_STOP_STRINGS, width)]) if not chat else None
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                         generation_config=gen, stopping_criteria=criteria)
    results = []
    for row in out[:, width:].tolist():
        n, reason = len(row), "length"
        for k, t in enumerate(row):
            if t in stops:
                n, reason = k, "stop"
                break
        text = tokenizer.decode(row[:n], skip_special_tokens=True)
        if not chat:
            for s in PLAIN_STOP_STRINGS:
                if s in text:
                    text, reason = text.split(s, 1)[0], "stop"
        results.append((text.strip(), reason, n))
    return results
