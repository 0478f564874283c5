"""The replication study: one row of ``configs/study/<row>.yaml`` trained, evaluated and reported, resumably.

A row is one YAML file, the only source of its settings (torchtune-style; its header shows the command)::

    title: instruct regime, CME reward        # free text
    regime: instruct                          # pretrained | instruct
    families: {policy: SmolLM2 (llama arch), verifier: Qwen2.5, judge: Qwen2.5}
    train: {policy: ..., verifiers: [...], learning_rate: ..., max_steps: ...}   # cmerl train keys
    eval:  {prompts: "alpaca_eval[:200]", judge: qwen2.5-coder-1.5b-instruct, max_new_tokens: 256}
    heldout: {verifier: qwen2.5-coder-0.5b-instruct}   # optional: who scores held-out CME
    against: [row2-smollm2-cme]               # optional: head-to-head rows (their trained outputs)

:func:`run_row` walks the phases in order; each one is a no-op when its results exist, and continues
where it stopped otherwise, so a row killed in any phase continues with the same command, in another
session or on another machine (the weights stay under the git-ignored ``runs/study/<row>/``; everything
else is written to ``benchmarks/results/study/<row>/``):

1. ``train`` — ``cmerl train`` on ``train:`` into ``runs/study/<row>/train`` (``--resume`` from its last
   complete checkpoint after a kill); copies ``metrics.jsonl``, the resolved config and the run card into
   the results folder. On a machine without the weights, a row whose training and trained-policy outputs
   are complete in the results folder (:func:`trained_in_results`) goes straight on to judging.
2. ``heldout`` — greedy completions of the trained and the untrained policy on the training config's
   held-out UltraFeedback prompts (``heldout_prompts``, never trained on, never AlpacaEval), scored by the
   held-out verifier: held-out CME, length and distinct-n of both (``heldout.json``).
3. ``generate`` — greedy AlpacaEval outputs of the trained policy and of the untrained base
   (``outputs_trained.json``, ``outputs_base.json``; :mod:`cmerl.generation`, resumable).
4. ``judge`` — pairwise verdicts in both orders (``verdicts.jsonl``, trained = A; :mod:`cmerl.judging`,
   resumable), and ``verdicts_vs_<row>.jsonl`` for each ``against`` row whose outputs exist.
5. ``report`` — ``winrate.json``, ``report.md`` with figures (:mod:`cmerl.report`) and ``row.json``, the
   summary :func:`study_table` reads.

Inputs are fingerprinted in ``state.json``: a row whose train or eval settings changed after its results
were started, or whose trained model changed after its outputs were generated, is refused with what
differs. ``study_log.jsonl`` records every phase attempt (start, end, seconds, host, CPU, bf16 choice).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from cmerl.configs import CONFIG_ROOT
from cmerl.data import load_prompt_set
from cmerl.fingerprint import sidecar_path
from cmerl.io import (
    append_jsonl,
    iter_jsonl,
    read_records,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

PHASES = ("train", "heldout", "generate", "judge", "report")
CONFIG_DIR = CONFIG_ROOT / "study"  # the packaged rows (configs/study/ in a checkout)
RUNS_ROOT = Path("runs/study")
RESULTS_ROOT = Path("benchmarks/results/study")
TABLE_START = "<!-- study-table:start (cmerl study table) -->"
TABLE_END = "<!-- study-table:end -->"
_ROW_KEYS = ("title", "regime", "families", "train", "eval", "heldout", "against", "notes")
_EVAL_KEYS = ("prompts", "base", "judge", "judge_dtype", "max_new_tokens", "system_prompt", "batch_size", "dtype")

StatusPrinter = Callable[[str], None]


class StudyError(ValueError):
    """A bad row file, or results that belong to other settings: the message names what and where."""


@dataclass(frozen=True)
class EvalSettings:
    """How a row is evaluated against its untrained base (every field recorded in the outputs files).

    ``system_prompt``: given to both systems when generating (default: the training ``system_prompt``, so
    trained and base see exactly what the policy saw in training). ``base``: default the training policy.
    """

    prompts: str = "alpaca_eval[:200]"
    base: str = ""
    judge: str = "qwen2.5-coder-1.5b-instruct"
    judge_dtype: str = "auto"
    max_new_tokens: int = 256
    system_prompt: str | None = None
    batch_size: int = 8
    dtype: str = "auto"


@dataclass(frozen=True)
class StudyRow:
    """One row: a training config plus how it is evaluated. ``train.output_dir`` is set by the driver."""

    name: str
    title: str
    regime: str
    families: dict
    train: object  # cmerl.training.TrainConfig
    eval: EvalSettings
    heldout_verifier: str | None
    against: tuple[str, ...]
    notes: str
    source: Path


@dataclass(frozen=True)
class RowPaths:
    """Where a row lives: weights under ``runs`` (git-ignored), everything committed under ``results``."""

    runs: Path
    results: Path

    @property
    def train_dir(self) -> Path:
        return self.runs / "train"


def row_paths(name: str, *, runs_root: str | Path = RUNS_ROOT, results_root: str | Path = RESULTS_ROOT) -> RowPaths:
    return RowPaths(Path(runs_root) / name, Path(results_root) / name)


# --------------------------------------------------------------------------- row files
def find_row_file(row: str, config_dir: str | Path = CONFIG_DIR) -> Path:
    """``row`` as a path to a YAML file, or the stem of one in ``config_dir``; raises listing the rows."""
    p = Path(row)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    cand = Path(config_dir) / f"{row}.yaml"
    if cand.is_file():
        return cand
    known = sorted(q.stem for q in Path(config_dir).glob("*.yaml")) if Path(config_dir).is_dir() else []
    raise FileNotFoundError(f"no study row {row!r}: expected {cand} (rows in {config_dir}: "
                            f"{', '.join(known) or 'none'})")


def load_row(row: str, *, config_dir: str | Path = CONFIG_DIR, runs_root: str | Path = RUNS_ROOT) -> StudyRow:
    """Read and check a row file (unknown keys, the train config as ``cmerl train`` checks it, a judge that
    is a verifier or the policy). Loads no model."""
    # deferred: torch, via cmerl.models and cmerl.training (torch-free CLI start)
    from cmerl.models import model_identity
    from cmerl.training import config_from_dict, validate

    path = find_row_file(row, config_dir)
    name = path.stem
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise StudyError(f"{path}: a row file must be a mapping (got {type(data).__name__})")
    unknown = sorted(set(data) - set(_ROW_KEYS))
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(_ROW_KEYS)})")
    train_data = dict(data.get("train") or {})
    if "output_dir" in train_data:
        raise StudyError(f"{path}: train.output_dir is set by the driver ({Path(runs_root) / name / 'train'}); "
                         "remove it")
    train_data["output_dir"] = str(Path(runs_root) / name / "train")
    cfg = config_from_dict(train_data, source=f"{path} (train)")
    validate(cfg, source=f"{path} (train)")
    ev = dict(data.get("eval") or {})
    bad = sorted(set(ev) - set(_EVAL_KEYS))
    if bad:
        raise StudyError(f"{path}: unknown eval key(s) {', '.join(bad)} (allowed: {', '.join(_EVAL_KEYS)})")
    ev.setdefault("base", cfg.policy)
    ev.setdefault("system_prompt", cfg.system_prompt)
    try:
        settings = EvalSettings(**ev)
    except TypeError as exc:
        raise StudyError(f"{path}: eval: {exc}") from None
    judge_id = model_identity(settings.judge)
    for who, other in [("verifier", v) for v in cfg.verifiers] + [("policy", cfg.policy)]:
        if model_identity(other) == judge_id:
            raise StudyError(f"{path}: the judge {settings.judge!r} is the row's {who} {other!r}: a judge that "
                             "is the reward model measures the reward, not quality; pick another judge")
    held = data.get("heldout") or {}
    if not isinstance(held, dict) or set(held) - {"verifier"}:
        raise StudyError(f"{path}: heldout must be a mapping with only 'verifier' (got {held!r})")
    against = data.get("against") or []
    if not isinstance(against, list) or not all(isinstance(a, str) for a in against):
        raise StudyError(f"{path}: against must be a list of row names (got {against!r})")
    return StudyRow(name=name, title=str(data.get("title") or name), regime=str(data.get("regime") or ""),
                    families=dict(data.get("families") or {}), train=cfg, eval=settings,
                    heldout_verifier=held.get("verifier") or (cfg.verifiers[0] if cfg.verifiers else None),
                    against=tuple(against), notes=str(data.get("notes") or ""), source=path)


def row_names(config_dir: str | Path = CONFIG_DIR) -> list[str]:
    """Rows defined in ``config_dir``, in natural order (row2 before row10)."""
    return sorted((p.stem for p in Path(config_dir).glob("*.yaml")), key=_natural_key)


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# --------------------------------------------------------------------------- fingerprints and state
def _sha(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_fingerprint(cfg) -> str:
    """What the trained weights depend on: the train config minus the keys a resume may change."""
    # deferred: torch, via cmerl.training (torch-free CLI start)
    from cmerl.training import RESUME_OVERRIDABLE

    d = {k: v for k, v in asdict(cfg).items() if k not in RESUME_OVERRIDABLE and k != "output_dir"}
    d["max_steps"] = cfg.max_steps  # a longer run is another result
    return _sha(d)


def model_fingerprint(folder: Path) -> str:
    """sha256 prefix of a model folder's weight files (safetensors / bin), in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder} holds no weight files")
    for p in files:
        digest.update(p.name.encode())
        with p.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()[:16]


def _read_state(results: Path) -> dict:
    p = results / "state.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _write_state(results: Path, state: dict) -> None:
    write_json_atomic(results / "state.json", state)


def _check_state(row: StudyRow, paths: RowPaths) -> dict:
    """Record (first run) or check (later runs) the row's input fingerprints."""
    state = _read_state(paths.results)
    want = {"train": train_fingerprint(row.train), "eval": _sha(asdict(row.eval)),
            "heldout_verifier": row.heldout_verifier}
    old = state.get("fingerprints")
    if old and old != want:
        diffs = ", ".join(k for k in want if old.get(k) != want[k])
        raise StudyError(f"{paths.results} holds results of row {row.name} made with other {diffs} settings "
                         f"than {row.source} now has; restore the row file, or delete {paths.results} and "
                         f"{paths.runs} to start the row over")
    state.update({"row": row.name, "fingerprints": want})
    paths.results.mkdir(parents=True, exist_ok=True)
    _write_state(paths.results, state)
    return state


def machine_info() -> dict:
    """Host, CPU model, thread count and the bf16 decision of this machine (recorded per phase attempt)."""
    # deferred: torch, via cmerl.precision (torch-free CLI start)
    import torch

    from cmerl.precision import resolve_dtype

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "inference_dtype": str(resolve_dtype("auto")), "cuda": torch.cuda.is_available()}


def _log_event(paths: RowPaths, event: dict) -> None:
    append_jsonl(paths.results / "study_log.jsonl", [{"time": time.time(), **event}])


# --------------------------------------------------------------------------- phases
@dataclass
class PhaseResult:
    phase: str
    done: bool
    note: str = ""


def train_done(row: StudyRow, paths: RowPaths) -> bool:
    """``final/`` exists and the last complete checkpoint reached ``max_steps``."""
    # deferred: torch, via cmerl.training (torch-free CLI start)
    from cmerl.training import checkpoint_step, latest_checkpoint

    last = latest_checkpoint(paths.train_dir)
    return (paths.train_dir / "final").is_dir() and last is not None and (checkpoint_step(last) or 0) >= row.train.max_steps


def _sync_training(paths: RowPaths) -> None:
    """Copy the run's metrics, resolved config, run card and curves into the results folder."""
    # deferred: torch, via cmerl.training (torch-free CLI start)
    from cmerl.training import CONFIG_NAME, CURVE_NAME, METRICS_NAME, RUN_CARD_NAME

    paths.results.mkdir(parents=True, exist_ok=True)
    for name, dest in ((METRICS_NAME, "metrics.jsonl"), (CONFIG_NAME, "train_config.yaml"),
                       ("train_summary.json", "train_summary.json")):
        src = paths.train_dir / name
        if src.is_file():
            shutil.copyfile(src, paths.results / dest)
    final = paths.train_dir / "final"
    for name in (RUN_CARD_NAME, CURVE_NAME):
        if (final / name).is_file():
            shutil.copyfile(final / name, paths.results / name)


def trained_outputs_complete(row: StudyRow, paths: RowPaths) -> bool:
    """Every file the later phases generate with the trained policy (held-out and AlpacaEval outputs) is
    complete in the results folder, so those phases need no weights."""
    # deferred: torch, via cmerl.generation (torch-free CLI start)
    from cmerl.generation import load_prompt_items, outputs_complete

    checks = [(paths.results / "outputs_trained.json", load_prompt_items(row.eval.prompts), eval_generation(row))]
    items = heldout_items(row.train)
    if items and row.heldout_verifier:
        checks.append((paths.results / "heldout_outputs_trained.json", items, heldout_generation(row)))
    return all(outputs_complete(out, its, generator=row.name, config=cfg) for out, its, cfg in checks)


def trained_in_results(row: StudyRow, paths: RowPaths, state: dict) -> bool:
    """Training finished in an earlier session (possibly on another machine, whose weights are gone): the
    state says so, its metrics and summary are in the results folder, the trained model's fingerprint was
    recorded, and every output the trained policy had to produce is complete."""
    return (state.get("phases", {}).get("train") == "done" and bool(state.get("trained_model"))
            and all((paths.results / f).is_file() for f in ("metrics.jsonl", "train_summary.json"))
            and trained_outputs_complete(row, paths))


def phase_train(row: StudyRow, paths: RowPaths, state: dict | None = None, *, max_new_steps: int | None = None,
                progress: bool = False, print_status: StatusPrinter | None = None) -> PhaseResult:
    """Train (or resume) the row's policy; ``max_new_steps`` stops after that many more steps (a budget:
    the run continues from there next time, exactly, with cmerl's default constant learning rate).
    Done without training when :func:`trained_in_results` (the weights are not needed any more)."""
    from cmerl import training  # deferred: torch, via cmerl.training (torch-free CLI start)

    if train_done(row, paths):
        _sync_training(paths)
        return PhaseResult("train", True, "already trained")
    if state is not None and trained_in_results(row, paths, state):
        return PhaseResult("train", True, "trained in an earlier session; its outputs are complete, weights "
                                          "not needed")
    cfg = row.train
    resume = (paths.train_dir / training.CONFIG_NAME).is_file()
    if resume:
        stored = training.read_run_config(paths.train_dir)
        stored = replace(stored, max_steps=cfg.max_steps)
        if train_fingerprint(stored) != train_fingerprint(cfg):
            raise StudyError(f"{paths.train_dir} holds a run with other settings than {row.source} train:; "
                             f"delete {paths.runs} to retrain")
    start = 0
    last = training.latest_checkpoint(paths.train_dir) if resume else None
    if last is not None:
        start = training.checkpoint_step(last) or 0
    target = cfg.max_steps if max_new_steps is None else min(cfg.max_steps, start + max(1, max_new_steps))
    run_cfg = replace(cfg, max_steps=target)
    training.train(run_cfg, resume=resume, progress=progress, print_status=print_status)
    _sync_training(paths)
    done = train_done(row, paths)
    return PhaseResult("train", done, "" if done else f"stopped at step {target} of {cfg.max_steps}")


def _trained_model(paths: RowPaths) -> Path:
    return paths.train_dir / "final"


def _check_trained_model(paths: RowPaths, state: dict, key: str) -> str:
    """The trained model's fingerprint, recorded under ``key`` the first time; refuses a changed model.
    Without the weights on this machine (another session trained them), the recorded fingerprint."""
    if not _trained_model(paths).is_dir() and state.get(key):
        return state[key]
    fp = model_fingerprint(_trained_model(paths))
    old = state.get(key)
    if old and old != fp:
        raise StudyError(f"{paths.results}: the files made under {key!r} come from another trained model "
                         f"({old}) than {_trained_model(paths)} ({fp}); delete them to regenerate")
    state[key] = fp
    _write_state(paths.results, state)
    return fp


def _copy_complete_sibling(output: Path, items, config, *, generator: str, folders: Path,
                           print_status: StatusPrinter | None) -> bool:
    """Copy the first ``folders/*/<output.name>`` (another row's file) that already holds every prompt of
    ``items`` from ``generator`` with ``config`` into ``output``, with its fingerprint; True if one was found.
    Used for the untrained base only: the same packaged model, prompts and greedy settings give the same
    outputs (up to the dtype ``auto`` resolved to on the CPU that made them), so every row is compared with
    one set of base outputs and none regenerates it."""
    # deferred: torch, via cmerl.generation (torch-free CLI start)
    from cmerl.generation import outputs_complete

    for other in sorted(folders.glob(f"*/{output.name}")):
        if other.resolve() == output.resolve() or not outputs_complete(other, items, generator=generator,
                                                                         config=config):
            continue
        output.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(sidecar_path(output), sidecar_path(other).read_bytes())
        write_bytes_atomic(output, other.read_bytes())
        if print_status:
            print_status(f"reused {other} (same model, prompts and settings) for {output}")
        return True
    return False


def _generate(name: str, items, output: Path, config, *, generator: str, stop_after: int | None,
              progress: bool, reuse_from: Path | None = None, print_status: StatusPrinter | None = None) -> bool:
    """Generate the missing rows of ``output``; True when it is complete. ``reuse_from``: a folder of other
    rows whose complete file of the same name may be copied instead (:func:`_copy_complete_sibling`)."""
    # deferred: torch, via cmerl.generation (torch-free CLI start)
    from cmerl.generation import generate_outputs, load_generator, outputs_complete

    if outputs_complete(output, items, generator=generator, config=config):
        return True
    if reuse_from is not None and _copy_complete_sibling(output, items, config, generator=generator,
                                                         folders=reuse_from, print_status=print_status):
        return True
    if stop_after is not None and stop_after <= 0:
        return False
    model, tok = load_generator(name, dtype=config.dtype)
    try:
        generate_outputs(model, tok, items, output, generator=generator, config=config, progress=progress,
                         stop_after=stop_after)
    finally:
        del model
        gc.collect()
    return outputs_complete(output, items, generator=generator, config=config)


def heldout_items(cfg) -> list:
    """The held-out prompts of a train config (the last ``heldout_prompts`` that fit) as PromptItems."""
    # deferred: torch, via cmerl.generation and cmerl.models (torch-free CLI start)
    from cmerl.generation import PromptItem
    from cmerl.models import load_tokenizer

    if not cfg.heldout_prompts:
        return []
    tok = load_tokenizer(cfg.policy)
    ps = load_prompt_set(cfg.prompts, tok, column=cfg.prompt_column, split=cfg.prompt_split,
                         max_prompt_length=cfg.max_prompt_length, max_prompts=cfg.max_prompts,
                         heldout=cfg.heldout_prompts, system_prompt=cfg.system_prompt)
    items = []
    for k, p in enumerate(ps.heldout):
        text = p if isinstance(p, str) else next(m["content"] for m in p if m.get("role") == "user")
        items.append(PromptItem(k, text, "heldout"))
    return items


def heldout_generation(row: StudyRow):
    """Greedy settings of the held-out outputs: the training completion length and system prompt."""
    # deferred: torch, via cmerl.generation (torch-free CLI start)
    from cmerl.generation import GenerationConfig

    cfg = row.train
    return GenerationConfig(max_new_tokens=cfg.max_completion_length, system_prompt=cfg.system_prompt,
                            dtype=row.eval.dtype, batch_size=row.eval.batch_size)


def phase_heldout(row: StudyRow, paths: RowPaths, state: dict, *, stop_after: int | None = None,
                  progress: bool = False, print_status: StatusPrinter | None = None) -> PhaseResult:
    """Held-out CME, length and distinct-n of the trained and the untrained policy (``heldout.json``)."""
    out = paths.results / "heldout.json"
    items = heldout_items(row.train)
    if not items or not row.heldout_verifier:
        return PhaseResult("heldout", True, "no held-out prompts in the train config")
    cfg = row.train
    gen = heldout_generation(row)
    trained_fp = _check_trained_model(paths, state, "heldout_trained_model")
    files = {"trained": paths.results / "heldout_outputs_trained.json",
             "base": paths.results / "heldout_outputs_base.json"}
    complete = True
    for role, name, label in (("trained", str(_trained_model(paths)), row.name), ("base", cfg.policy, cfg.policy)):
        if print_status:
            print_status(f"[heldout] {len(items)} held-out prompts, greedy, {role} policy -> {files[role]}")
        complete &= _generate(name, items, files[role], gen, generator=label, stop_after=stop_after,
                              progress=progress, print_status=print_status,
                              reuse_from=paths.results.parent if role == "base" else None)
    if not complete:
        return PhaseResult("heldout", False, "stopped while generating")
    key = _sha([row.heldout_verifier, trained_fp, [json.loads(files[r].read_text()) for r in ("trained", "base")]])
    if out.is_file() and json.loads(out.read_text()).get("fingerprint") == key:
        return PhaseResult("heldout", True, "already scored")
    write_json_atomic(out, {"fingerprint": key, **heldout_scores(row.heldout_verifier, files, print_status=print_status)})
    return PhaseResult("heldout", True)


def heldout_scores(verifier_name: str, files: dict[str, Path], *, print_status: StatusPrinter | None = None) -> dict:
    """Score each outputs file's (instruction, output) pairs with the verifier: per-system mean CME (mean
    response log-likelihood, nats/token; empty responses are left out of the mean and counted) and
    :func:`cmerl.metrics.drift_stats`."""
    # deferred: numpy, via cmerl.metrics (slow import, fast CLI start); torch, via cmerl.scoring.Verifier (torch-free CLI start)
    from cmerl.metrics import drift_stats
    from cmerl.scoring import Verifier

    if print_status:
        print_status(f"[heldout] scoring with {verifier_name}")
    verifier = Verifier.from_pretrained(verifier_name)
    result = {"verifier": verifier_name, "verifier_dtype": str(getattr(verifier.model, "cmerl_dtype", "")),
              "systems": {}}
    try:
        for role, path in files.items():
            rows = json.loads(path.read_text())
            scores = verifier.score([r["instruction"] for r in rows], [r["output"] for r in rows])
            cme = [s.mean_logprob if s.n_tokens else None for s in scores]
            finite = [c for c in cme if c is not None]
            result["systems"][role] = {
                "n": len(rows), "cme_mean": sum(finite) / len(finite) if finite else None,
                "cme_empty": len(cme) - len(finite), "cme": cme,
                "drift": drift_stats([r["output"] for r in rows], finish_reasons=[r.get("finish_reason") for r in rows])}
    finally:
        del verifier
        gc.collect()
    return result


def eval_generation(row: StudyRow):
    # deferred: torch, via cmerl.generation (torch-free CLI start)
    from cmerl.generation import GenerationConfig

    e = row.eval
    return GenerationConfig(max_new_tokens=e.max_new_tokens, system_prompt=e.system_prompt, dtype=e.dtype,
                            batch_size=e.batch_size)


def phase_generate(row: StudyRow, paths: RowPaths, state: dict, *, stop_after: int | None = None,
                   progress: bool = False, print_status: StatusPrinter | None = None) -> PhaseResult:
    """Greedy AlpacaEval outputs of the trained policy and the untrained base."""
    # deferred: torch, via cmerl.generation (torch-free CLI start)
    from cmerl.generation import load_prompt_items

    items = load_prompt_items(row.eval.prompts)
    _check_trained_model(paths, state, "trained_model")
    gen = eval_generation(row)
    complete = True
    for role, name, label in (("trained", str(_trained_model(paths)), row.name),
                              ("base", row.eval.base, row.eval.base)):
        out = paths.results / f"outputs_{role}.json"
        if print_status:
            print_status(f"[generate] {len(items)} prompts ({row.eval.prompts}), greedy, {role} model {name} -> {out}")
        complete &= _generate(name, items, out, gen, generator=label, stop_after=stop_after, progress=progress,
                              print_status=print_status, reuse_from=paths.results.parent if role == "base" else None)
    return PhaseResult("generate", complete, "" if complete else "stopped while generating")


def _judge_file(judge, a: Path, b: Path, out: Path, *, labels: tuple[str, str], stop_after: int | None,
                progress: bool) -> bool:
    # deferred: torch, via cmerl.judging (torch-free CLI start)
    from cmerl.judging import DecisionRule, load_pairs, read_verdicts, run_judge, verdicts_header

    pairs, _ = load_pairs(a, b)
    header = verdicts_header(judge, DecisionRule(), judge.prompt, a={"path": a.name, "generator": labels[0]},
                             b={"path": b.name, "generator": labels[1]})
    run_judge(judge, pairs, out, header=header, progress=progress, stop_after=stop_after)
    _, rows = read_verdicts(out)
    done = {(r["index"], r.get("instruction")) for r in rows}
    return all((p.index, p.instruction) in done for p in pairs)


def _pending_judgements(row: StudyRow, paths: RowPaths, results_root: Path) -> list[tuple[Path, Path, Path, tuple]]:
    # deferred: torch, via cmerl.judging (torch-free CLI start)
    from cmerl.judging import load_pairs, read_verdicts

    jobs = [(paths.results / "outputs_trained.json", paths.results / "outputs_base.json",
             paths.results / "verdicts.jsonl", (row.name, row.eval.base))]
    for other in row.against:
        b = results_root / other / "outputs_trained.json"
        if b.is_file():
            jobs.append((paths.results / "outputs_trained.json", b, paths.results / f"verdicts_vs_{other}.jsonl",
                         (row.name, other)))
    pending = []
    for a, b, out, labels in jobs:
        if out.is_file():
            pairs, _ = load_pairs(a, b)
            _, rows = read_verdicts(out)
            done = {(r["index"], r.get("instruction")) for r in rows}
            if all((p.index, p.instruction) in done for p in pairs):
                continue
        pending.append((a, b, out, labels))
    return pending


def phase_judge(row: StudyRow, paths: RowPaths, *, results_root: Path, stop_after: int | None = None,
                progress: bool = False, print_status: StatusPrinter | None = None) -> PhaseResult:
    """Verdicts of trained vs base (and vs each ``against`` row with outputs), both orders; the judge is
    loaded only when something is left to judge."""
    from cmerl.judging import JudgeSpec  # deferred: torch, via cmerl.judging (torch-free CLI start)

    pending = _pending_judgements(row, paths, results_root)
    missing = [o for o in row.against if not (results_root / o / "outputs_trained.json").is_file()]
    note = f"head-to-head pending: no outputs of {', '.join(missing)} yet" if missing else ""
    if not pending:
        return PhaseResult("judge", True, note)
    if stop_after is not None and stop_after <= 0:
        return PhaseResult("judge", False, "stopped")
    judge = JudgeSpec(name=row.eval.judge, dtype=row.eval.judge_dtype).build()
    complete = True
    try:
        for a, b, out, labels in pending:
            if print_status:
                print_status(f"[judge] {labels[0]} (A) vs {labels[1]} (B), both orders, judge {row.eval.judge} -> {out}")
            complete &= _judge_file(judge, a, b, out, labels=labels, stop_after=stop_after, progress=progress)
    finally:
        del judge
        gc.collect()
    return PhaseResult("judge", complete, note if complete else "stopped while judging")


def training_wall_seconds(events: Sequence[dict], metrics: Sequence[dict]) -> float | None:
    """Wall time spent training (model loading included): each train attempt from its start to its end, or,
    for an attempt that was killed, to the last metrics row it logged."""
    starts = [e for e in events if e.get("phase") == "train" and e.get("event") == "start"]
    if not starts:
        return None
    total = 0.0
    for k, s in enumerate(starts):
        nxt = starts[k + 1]["time"] if k + 1 < len(starts) else float("inf")
        end = next((e for e in events if e.get("phase") == "train" and e.get("event") == "end"
                    and s["time"] <= e["time"] <= nxt), None)
        if end is not None:
            total += end["time"] - s["time"]
            continue
        logged = [m["time"] for m in metrics if isinstance(m.get("time"), (int, float)) and s["time"] <= m["time"] <= nxt]
        if logged:
            total += max(logged) - s["time"]
    return total


def phase_report(row: StudyRow, paths: RowPaths, *, results_root: Path, print_status: StatusPrinter | None = None) -> PhaseResult:
    """``winrate*.json``, ``report.md`` + figures, and ``row.json`` (the table's source)."""
    # deferred: numpy, via cmerl.metrics (slow import, fast CLI start); torch, via cmerl.report and cmerl.winrates (torch-free CLI start)
    from cmerl.metrics import drift_stats
    from cmerl.report import write_report
    from cmerl.winrates import summarize_verdicts

    res = paths.results
    summary = summarize_verdicts(res / "verdicts.jsonl")
    write_json_atomic(res / "winrate.json", summary.to_dict())
    versus = {}
    for other in row.against:
        v = res / f"verdicts_vs_{other}.jsonl"
        if v.is_file():
            s = summarize_verdicts(v)
            write_json_atomic(res / f"winrate_vs_{other}.json", s.to_dict())
            versus[other] = _winrate_brief(s)
    drift = {}
    for role in ("trained", "base"):
        rows, _ = read_records(res / f"outputs_{role}.json")
        outs = [r for _, r in rows]
        drift[role] = drift_stats([r["output"] for r in outs], finish_reasons=[r.get("finish_reason") for r in outs])
        drift[role]["weights_dtype"] = sorted({str(r.get("weights_dtype")) for r in outs})
    metrics = list(iter_jsonl(res / "metrics.jsonl")) if (res / "metrics.jsonl").is_file() else []
    events = list(iter_jsonl(res / "study_log.jsonl")) if (res / "study_log.jsonl").is_file() else []
    held = json.loads((res / "heldout.json").read_text()) if (res / "heldout.json").is_file() else None
    steps = max((m.get("step", 0) for m in metrics), default=0)
    out = {"row": row.name, "title": row.title, "regime": row.regime, "families": row.families,
           "policy": row.train.policy, "rewards": row.train.rewards, "verifiers": row.train.verifiers,
           "method": row.train.method, "advantage_estimator": row.train.advantage_estimator,
           "judge": row.eval.judge, "prompts": row.eval.prompts, "steps": steps, "max_steps": row.train.max_steps,
           "completions_per_step": row.train.per_device_train_batch_size * row.train.gradient_accumulation_steps,
           "train_wall_s": training_wall_seconds(events, metrics),
           "vs_base": _winrate_brief(summary), "vs_rows": versus, "drift": drift,
           "heldout": None if held is None else {k: {kk: vv for kk, vv in v.items() if kk != "cme"}
                                                 for k, v in held["systems"].items()} | {"verifier": held["verifier"]},
           "machines": sorted({f"{e.get('cpu')} ({e.get('inference_dtype')})" for e in events if e.get("cpu")})}
    write_json_atomic(res / "row.json", out)
    write_report(res, metrics=res / "metrics.jsonl" if metrics else None)
    return PhaseResult("report", True)


def _winrate_brief(summary) -> dict:
    w = summary.winrate
    lc = summary.length_controlled or {}
    ag = summary.agreement or {}
    pairs = {k: v.get("agreement") for k, v in (ag.get("pairs") or {}).items()}
    return {"n": w.n, "wins": w.wins, "ties": w.ties, "losses": w.losses, "errors": w.errors,
            "win_rate": w.win_rate, "ci_low": w.ci_low, "ci_high": w.ci_high, "consistency": w.consistency,
            "mean_len_a": w.mean_len_a, "mean_len_b": w.mean_len_b, "lc_win_rate": lc.get("win_rate"),
            "lc_ci_low": lc.get("ci_low"), "lc_ci_high": lc.get("ci_high"),
            "judge_agreement": ag.get("agreement"), "judge_pairs_agreement": pairs}


# --------------------------------------------------------------------------- the driver
@dataclass
class RowRun:
    """What :func:`run_row` did: one :class:`PhaseResult` per phase it reached."""

    row: str
    paths: RowPaths
    phases: list[PhaseResult] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.phases) == len(PHASES) and all(p.done for p in self.phases)


def run_row(row: str | StudyRow, *, config_dir: str | Path = CONFIG_DIR, runs_root: str | Path = RUNS_ROOT,
            results_root: str | Path = RESULTS_ROOT, phases: Sequence[str] = PHASES,
            budget: dict[str, int] | None = None, progress: bool = False, print_status: StatusPrinter | None = None) -> RowRun:
    """Run (or continue) the row's phases in order, stopping at the first one left incomplete.

    ``budget``: per phase, at most that many new units (train: steps; heldout/generate: prompts per
    outputs file; judge: pairs per verdicts file) in this call, then stop with the phase incomplete; a later
    call continues. ``phases`` restricts which phases run (a phase whose inputs are missing raises)."""
    bad = [p for p in phases if p not in PHASES]
    if bad:
        raise StudyError(f"unknown phase(s) {', '.join(bad)} (phases: {', '.join(PHASES)})")
    r = row if isinstance(row, StudyRow) else load_row(row, config_dir=config_dir, runs_root=runs_root)
    paths = row_paths(r.name, runs_root=runs_root, results_root=results_root)
    state = _check_state(r, paths)
    budget = budget or {}
    run = RowRun(r.name, paths)
    write_json_atomic(paths.results / "row_config.json", _resolved(r))
    trained: bool | None = None  # set by the train phase; looked up once when that phase is not run
    for phase in PHASES:
        if phase not in phases:
            continue
        if phase != "train":
            if trained is None:
                trained = train_done(r, paths) or trained_in_results(r, paths, state)
            if not trained:
                run.phases.append(PhaseResult(phase, False, "waiting for training"))
                break
        _log_event(paths, {"phase": phase, "event": "start", **machine_info()})
        t0 = time.time()
        if phase == "train":
            res = phase_train(r, paths, state, max_new_steps=budget.get("train"), progress=progress, print_status=print_status)
            trained = res.done
        elif phase == "heldout":
            res = phase_heldout(r, paths, state, stop_after=budget.get("heldout"), progress=progress, print_status=print_status)
        elif phase == "generate":
            res = phase_generate(r, paths, state, stop_after=budget.get("generate"), progress=progress, print_status=print_status)
        elif phase == "judge":
            res = phase_judge(r, paths, results_root=Path(results_root), stop_after=budget.get("judge"),
                              progress=progress, print_status=print_status)
        else:
            res = phase_report(r, paths, results_root=Path(results_root), print_status=print_status)
        _log_event(paths, {"phase": phase, "event": "end", "done": res.done, "seconds": time.time() - t0,
                           "note": res.note})
        state = _read_state(paths.results)
        state.setdefault("phases", {})[phase] = "done" if res.done else "incomplete"
        _write_state(paths.results, state)
        run.phases.append(res)
        if print_status:
            print_status(f"[{phase}] {'done' if res.done else 'incomplete'}{': ' + res.note if res.note else ''}")
        if not res.done:
            break
    return run


def _resolved(row: StudyRow) -> dict:
    return {"row": row.name, "title": row.title, "regime": row.regime, "families": row.families,
            "source": str(row.source), "train": asdict(row.train), "eval": asdict(row.eval),
            "heldout_verifier": row.heldout_verifier, "against": list(row.against), "notes": row.notes}


# --------------------------------------------------------------------------- status
def row_status(name: str, *, runs_root: str | Path = RUNS_ROOT, results_root: str | Path = RESULTS_ROOT,
               sync: bool = True) -> dict:
    """Where a row stands, from its folders alone (no model loaded): training step, each file's progress.
    ``sync`` copies the training metrics into the results folder first (cheap)."""
    # deferred: torch, via cmerl.training (torch-free CLI start)
    from cmerl.training import checkpoint_step, latest_checkpoint

    paths = row_paths(name, runs_root=runs_root, results_root=results_root)
    if sync and paths.train_dir.is_dir():
        _sync_training(paths)
    last = latest_checkpoint(paths.train_dir) if paths.train_dir.is_dir() else None
    metrics = paths.train_dir / "metrics.jsonl"
    if not metrics.is_file():  # trained on another machine: the copy committed with the results
        metrics = paths.results / "metrics.jsonl"
    logged = [r.get("step", 0) for r in iter_jsonl(metrics)] if metrics.is_file() else []
    files = {}
    for f in ("heldout_outputs_trained.json", "heldout_outputs_base.json", "outputs_trained.json",
              "outputs_base.json"):
        p = paths.results / f
        side = p.with_name(p.name + ".partial.jsonl")
        if p.is_file():
            files[f] = f"complete ({len(json.loads(p.read_text()))} rows)"
        elif side.is_file():
            files[f] = f"partial ({sum(1 for _ in iter_jsonl(side)) - 1} rows)"
    for p in sorted(paths.results.glob("verdicts*.jsonl")) if paths.results.is_dir() else []:
        files[p.name] = f"{sum(1 for _ in iter_jsonl(p)) - 1} pairs"
    state = _read_state(paths.results) if paths.results.is_dir() else {}
    return {"row": name, "last_checkpoint_step": checkpoint_step(last) if last else None,
            "last_logged_step": max(logged, default=None), "final": (paths.train_dir / "final").is_dir(),
            "phases": state.get("phases", {}), "files": files, "report": (paths.results / "row.json").is_file()}


# --------------------------------------------------------------------------- the table
def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str = "{:.0f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _duration(s) -> str:
    if s is None:
        return "n/a"
    return f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


def _reward_cell(train: Mapping[str, Any]) -> str:
    """The reward column from a row's train settings (``row_config.json``'s ``train`` or ``row.json``: keys
    ``rewards``, ``verifiers``, ``method``, ``advantage_estimator``; missing ones take TrainConfig's
    defaults). ``cme (qwen...)``; a reward that reads only the policy (self-certainty...) names no verifier, even when
    the config lists one (the held-out phase's). The baselines train on no reward: ``method: distill`` is
    ``distill: SFT on <verifier>'s answers``, ``dpo`` is ``dpo (preference pairs)``. Per-token advantages
    (dense rewards) are named: ``cme, dense position_std (qwen...)``."""
    rewards, verifiers = train.get("rewards", ["cme"]), train.get("verifiers", [])
    method, advantage_estimator = train.get("method", "grpo"), train.get("advantage_estimator", "scalar")
    if method == "distill":
        return f"distill: SFT on {verifiers[0] if verifiers else 'the teacher'}'s answers"
    if method == "dpo":
        return "dpo (preference pairs)"
    # deferred: torch, via cmerl.training (the registry of built-in rewards; torch-free CLI start)
    from cmerl.training import reward_setup  # noqa: F401  (registers the built-in rewards)
    from cmerl.training.reward_registry import get_reward

    names = "+".join(rewards) + ("" if advantage_estimator == "scalar" else f", dense {advantage_estimator}")
    try:
        reads_verifier = any(get_reward(n).uses_verifiers for n in rewards)
    except ValueError:  # a reward registered by a module not imported here: show the config as written
        reads_verifier = True
    return f"{names} ({', '.join(verifiers)})" if reads_verifier and verifiers else f"{names} (the policy's own)"


def study_table(results_root: str | Path = RESULTS_ROOT) -> str:
    """One markdown table from the ``row.json`` of every row folder (rows still running: their progress).

    Columns: the row; policy, reward and verifier; training steps and wall time; W/T/L against the
    untrained base; tie-adjusted win rate with its 95% bootstrap CI; the length-controlled win rate
    (:mod:`cmerl.length_control`); mean characters trained / base; held-out CME untrained -> trained;
    distinct-2 trained / base; the judge's agreement with GPT-4 Turbo (AlpacaEval easy pairs; and on
    system-vs-system pairs where measured); head-to-head against other rows."""
    root = Path(results_root)
    head = ("| row | policy (regime) | reward (verifier) | steps | train wall | W/T/L vs base | win rate [95% CI] "
            "| LC win rate | mean chars trained / base | held-out CME base → trained | distinct-2 trained / base "
            "| judge agreement | head-to-head |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    names = sorted((p.name for p in root.iterdir() if p.is_dir()), key=_natural_key) if root.is_dir() else []
    for name in names:
        p = root / name / "row.json"
        if not p.is_file():
            st = row_status(name, results_root=root, sync=False) if (root / name / "state.json").is_file() else None
            if st is None:
                continue
            cfg = json.loads((root / name / "row_config.json").read_text()) if (root / name / "row_config.json").is_file() else {}
            tr = cfg.get("train", {})
            steps = f"{st['last_logged_step'] or 0}/{tr.get('max_steps', '?')}"
            done = [p for p in PHASES if st["phases"].get(p) == "done"]
            now = next((p for p in PHASES if p not in done), "report")
            lines.append(f"| {name} | {tr.get('policy', '?')} ({cfg.get('regime', '')}) | {_reward_cell(tr)} | {steps} | "
                         f"{'trained' if 'train' in done else 'training'} | " + " | ".join(["n/a"] * 7)
                         + f" | in progress: {now} |")
            continue
        r = json.loads(p.read_text())
        v, held, d = r["vs_base"], r.get("heldout") or {}, r["drift"]
        ht, hb = held.get("trained", {}), held.get("base", {})
        ag = _pct(v.get("judge_agreement"))
        if v.get("judge_pairs_agreement"):
            ag += "; pairs " + ", ".join(f"{k} {_pct(x)}" for k, x in v["judge_pairs_agreement"].items())
        vs = "; ".join(f"vs {k}: {_pct(x['win_rate'])} [{_pct(x['ci_low'])}-{_pct(x['ci_high'])}] n={x['n']}"
                       for k, x in (r.get("vs_rows") or {}).items()) or "—"
        lc = "n/a" if v.get("lc_win_rate") is None else (
            f"{_pct(v['lc_win_rate'])} [{_pct(v.get('lc_ci_low'))}-{_pct(v.get('lc_ci_high'))}]")
        lines.append(
            f"| {name} | {r['policy']} ({r.get('regime', '')}) | {_reward_cell(r)} "
            f"| {r['steps']} | {_duration(r.get('train_wall_s'))} | {v['wins']}/{v['ties']}/{v['losses']} "
            f"| {_pct(v['win_rate'])} [{_pct(v['ci_low'])}-{_pct(v['ci_high'])}] | {lc} "
            f"| {_num(v.get('mean_len_a'))} / {_num(v.get('mean_len_b'))} "
            f"| {_num(hb.get('cme_mean'), '{:.3f}')} → {_num(ht.get('cme_mean'), '{:.3f}')} "
            f"| {_num(d['trained'].get('distinct_2'), '{:.3f}')} / {_num(d['base'].get('distinct_2'), '{:.3f}')} "
            f"| {ag} | {vs} |")
    if len(lines) == 2:
        lines.append("| (no rows have results yet) |" + " |" * (head.count(" | ")))
    judges = sorted({json.loads((root / n / "row.json").read_text())["judge"] for n in names
                     if (root / n / "row.json").is_file()})
    foot = (f"\nGenerated by `cmerl study table` from `{root.as_posix()}/*/row.json`. Win rates: trained (A) vs its "
            "untrained base (B), ties count half, judged in both orders"
            + (f" by {', '.join(judges)}" if judges else "") + "; LC = length-controlled "
            "(cmerl.length_control); held-out CME = mean verifier log-likelihood (nats/token) of greedy answers "
            "to the training config's held-out UltraFeedback prompts.")
    return "\n".join(lines) + "\n" + foot + "\n"


def update_table_files(files: Sequence[str | Path], results_root: str | Path = RESULTS_ROOT, *,
                       heading: str = "## Replication study (issue 14)") -> list[Path]:
    """Replace the text between the table markers in each file with :func:`study_table` (a file without the
    markers gets a ``heading`` section with them appended). Returns the files that changed."""
    table = study_table(results_root)
    block = f"{TABLE_START}\n{table}{TABLE_END}"
    changed = []
    for f in map(Path, files):
        text = f.read_text(encoding="utf-8") if f.is_file() else ""
        if TABLE_START in text and TABLE_END in text:
            pre, rest = text.split(TABLE_START, 1)
            post = rest.split(TABLE_END, 1)[1]
            new = pre + block + post
        else:
            new = text.rstrip("\n") + ("\n\n" if text else "") + f"{heading}\n\n{block}\n"
        if new != text:
            f.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(f, new)
            changed.append(f)
    return changed
