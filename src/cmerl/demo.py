"""The default demo (``cmerl demo`` / ``make demo``): a short CME-GRPO run on the packaged models, then
greedy completions of held-out prompts before and after training, each scored by the verifier, and a
head-to-head: a packaged pairwise judge compares the after completions (system a) with the before ones
(system b), both orders, once the policy and verifier are freed.

The demo settings live in the packaged ``configs/demo.yaml`` (``cmerl configs demo`` prints it).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from transformers import GenerationConfig

from cmerl.configs import find_config
from cmerl.data import policy_prompt_ids
from cmerl.io import write_json_atomic
from cmerl.judging import DecisionRule, JudgePrompt, LocalJudge, Pair, run_judge, verdicts_header
from cmerl.metrics import WinRate, format_pct, win_rate
from cmerl.models import check_available
from cmerl.training import (
    StatusPrinter,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    finish,
    start,
    validate,
)

#: The head-to-head judge: the best packaged judge (docs/evaluation.md, /work/shared/MODELS.md); dtype auto
#: (bf16 where the CPU runs it natively, else fp32: emulated bf16 is 4-7x slower).
DEMO_JUDGE = "qwen2.5-coder-1.5b-instruct"
DEMO_JUDGE_DTYPE = "auto"
SAMPLES_NAME = "demo_samples.json"
VERDICTS_NAME = "demo_verdicts.jsonl"

#: The demo run's packaged config (``configs/demo.yaml``; :mod:`cmerl.configs`). Sized from
#: benchmarks/bench_grpo_step.py to finish in under 15 minutes on 2 CPU cores.
DEMO_CONFIG = "demo"


def demo_config(overrides: Sequence[str] = (), *, timestamped: bool = True) -> TrainConfig:
    """The demo config with ``--set`` overrides; without an ``output_dir`` override the run directory is
    ``runs/demo-<YYYYmmdd-HHMMSS>`` (``timestamped``) so repeated demos never collide."""
    path = find_config(DEMO_CONFIG)
    cfg = config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))
    if timestamped and not any(o.startswith("output_dir=") for o in overrides):
        cfg = TrainConfig(**{**asdict(cfg), "output_dir": f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"})
    cfg = apply_overrides(cfg, overrides)
    validate(cfg, source=str(path))
    return cfg


@dataclass
class SampleComparison:
    """One held-out prompt: greedy completions before and after training, with their CME under the verifier."""

    prompt: str
    before: str
    after: str
    cme_before: float
    cme_after: float


@dataclass
class HeadToHead:
    """A judge's verdicts on trained (system a) vs untrained (system b) completions of the same prompts.

    winrate: wins/ties/losses of the trained policy with the tie-adjusted win rate and its bootstrap
    interval (:func:`cmerl.metrics.win_rate`); verdicts_path: the verdicts file (``cmerl winrate`` reads it);
    rows: its verdict rows, in prompt order; seconds: judging wall time, judge load excluded.
    """

    judge: str
    verdicts_path: Path
    winrate: WinRate
    rows: list[dict]
    seconds: float

    def to_dict(self) -> dict:
        return {"judge": self.judge, "verdicts": str(self.verdicts_path), "seconds": self.seconds,
                **self.winrate.to_dict()}


@dataclass
class DemoResult:
    run_dir: Path
    final_dir: Path | None
    samples_path: Path
    samples: list[SampleComparison]
    verifier: str
    steps: int
    reward_first: float | None
    reward_last: float | None
    seconds: float
    head_to_head: HeadToHead | None = None


def generate_greedy(model, tokenizer, prompts: Sequence, *, max_new_tokens: int,
                    system_prompt: str | None = None) -> list[str]:
    """Greedy completions, one prompt at a time, rendered exactly as GRPO renders them for the policy."""

    eos = model.generation_config.eos_token_id
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    out = []
    try:
        for p in prompts:
            ids = policy_prompt_ids(p, tokenizer, system_prompt)
            x = torch.tensor([ids], device=model.device)
            with torch.no_grad():
                y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen)
            out.append(tokenizer.decode(y[0, len(ids):], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def head_to_head(judge, instructions: Sequence[str], trained: Sequence[str], untrained: Sequence[str],
                 output: str | Path, *, rule: DecisionRule | None = None, trained_label: str = "trained policy",
                 untrained_label: str = "untrained policy", source: str | None = None, progress: bool = False,
                 seed: int = 0) -> HeadToHead:
    """Judge ``trained[i]`` (system a) against ``untrained[i]`` (system b) as answers to ``instructions[i]``,
    each pair in both orders, with ``judge`` (any :class:`cmerl.judging.Judge`, e.g. a ``LocalJudge``).

    The rows go to ``output``, a verdicts file (header naming the judge, rule, prompt and both systems) that
    ``cmerl winrate`` reads; an existing file with the same setup is resumed (see
    :func:`cmerl.judging.run_judge`). ``rule`` defaults to ``DecisionRule()`` (ties below 0.2 nats of summed
    margin). Identical completions give a zero margin, hence a tie. Raises
    ValueError when the three lists differ in length or are empty.
    """

    n = len(instructions)
    if n == 0 or len(trained) != n or len(untrained) != n:
        raise ValueError(f"head_to_head needs as many trained ({len(trained)}) and untrained ({len(untrained)}) "
                         f"completions as instructions ({n}), at least one")
    pairs = [Pair(i, ins, a, b, "demo held-out", trained_label, untrained_label)
             for i, (ins, a, b) in enumerate(zip(instructions, trained, untrained))]
    rule = rule or DecisionRule()
    prompt = getattr(judge, "prompt", None) or JudgePrompt.load()
    header = verdicts_header(judge, rule, prompt, a={"path": source, "generator": trained_label},
                             b={"path": source, "generator": untrained_label})
    t0 = time.perf_counter()
    rows = run_judge(judge, pairs, output, rule=rule, header=header, progress=progress)
    seconds = time.perf_counter() - t0
    wr = win_rate([r["verdict"] for r in rows], consistent=[r.get("consistent") for r in rows],
                  len_a=[r.get("len_a") for r in rows], len_b=[r.get("len_b") for r in rows], seed=seed)
    return HeadToHead(judge=judge.name, verdicts_path=Path(output), winrate=wr, rows=rows, seconds=seconds)


def run_demo(cfg: TrainConfig, *, judge: str | None = DEMO_JUDGE, judge_dtype: str = DEMO_JUDGE_DTYPE,
             print_status: StatusPrinter | None = None) -> DemoResult:
    """Train per ``cfg`` (a new run) with before/after samples of its held-out prompts, then (unless
    ``judge`` is None) load ``judge`` and judge after vs before into ``RUN_DIR/demo_verdicts.jsonl``.

    ``RUN_DIR/demo_samples.json`` is written right after training, so a failing judge loses nothing; it is
    rewritten with the head-to-head summary when judging is done.
    """
    emit_status = print_status or (lambda s: None)
    t0 = time.perf_counter()
    if judge:
        check_available(judge)  # fail before training, not after it
    emit_status(f"[bold]cmerl demo[/bold]: GRPO on CME rewards; outputs go to {cfg.output_dir}")
    out, instructions, before, after = _train_and_sample(cfg, emit_status, print_status)  # the session is freed on return
    out.seconds = time.perf_counter() - t0
    _write_samples(out)
    if judge:

        gc.collect()
        emit_status(f"head-to-head: loading judge {judge} after freeing the policy and verifier ...")
        lj = LocalJudge.from_pretrained(judge, dtype=judge_dtype)  # logs "judge <name>: <dtype> (<why>)"
        try:
            emit_status(f"judging {len(instructions)} held-out pairs (after vs before), both orders ...")
            out.head_to_head = head_to_head(
                lj, instructions, after, before, out.run_dir / VERDICTS_NAME,
                trained_label=f"{cfg.policy} after {out.steps} CME-GRPO steps",
                untrained_label=f"{cfg.policy} before training", source=str(out.samples_path),
                progress=print_status is not None, seed=cfg.seed)
        finally:
            del lj
            gc.collect()
        out.seconds = time.perf_counter() - t0
        _write_samples(out)
    return out


def _train_and_sample(cfg: TrainConfig, emit_status: StatusPrinter, print_status: StatusPrinter | None):
    """Train with greedy before/after samples; returns ``(result, instructions, before, after)`` and keeps
    no reference to the training session, so its models can be freed."""
    session = start(cfg, progress=print_status is not None, print_status=print_status)
    heldout = session.prompt_set.heldout
    verifier = session.verifier()
    if not heldout or verifier is None:
        raise ValueError("the demo needs heldout_prompts >= 1 and a cme reward")
    raw = [p if isinstance(p, str) else p[-1]["content"] for p in heldout]
    model = session.trainer.accelerator.unwrap_model(session.trainer.model)
    emit_status(f"greedy completions of {len(heldout)} held-out prompts before training ...")
    before = generate_greedy(model, session.tokenizer, heldout, max_new_tokens=cfg.max_completion_length,
                             system_prompt=cfg.system_prompt)
    cme_before = [s.mean_logprob for s in verifier.score(heldout, before)]
    result = finish(session, print_status=print_status)
    model = session.trainer.accelerator.unwrap_model(session.trainer.model)  # merged when LoRA
    emit_status("greedy completions after training ...")
    after = generate_greedy(model, session.tokenizer, heldout, max_new_tokens=cfg.max_completion_length,
                            system_prompt=cfg.system_prompt)
    cme_after = [s.mean_logprob for s in verifier.score(heldout, after)]
    samples = [SampleComparison(p, b, a, cb, ca) for p, b, a, cb, ca in zip(raw, before, after, cme_before, cme_after)]
    rewards = [h["reward"] for h in session.trainer.state.log_history if "reward" in h]
    out = DemoResult(run_dir=session.run_dir, final_dir=result.final_dir, samples_path=session.run_dir / SAMPLES_NAME,
                     samples=samples, verifier=verifier.name, steps=result.global_step,
                     reward_first=rewards[0] if rewards else None, reward_last=rewards[-1] if rewards else None,
                     seconds=0.0)
    return out, raw, before, after


def _write_samples(out: DemoResult) -> None:
    write_json_atomic(out.samples_path, {
        "verifier": out.verifier, "steps": out.steps, "reward_first_step": out.reward_first,
        "reward_last_step": out.reward_last, "seconds": out.seconds,
        "samples": [asdict(s) for s in out.samples],
        "head_to_head": out.head_to_head.to_dict() if out.head_to_head else None})


def render_comparison(result: DemoResult):
    """A rich renderable: one panel per held-out prompt, before/after text with CME."""
    parts = []
    for i, s in enumerate(result.samples, 1):
        table = Table(show_header=True, expand=True, show_lines=True)
        table.add_column("", width=8)
        table.add_column("completion (greedy)")
        table.add_column("CME", justify="right", width=8)
        table.add_row("before", s.before.strip(), f"{s.cme_before:.3f}")
        table.add_row("after", s.after.strip(), f"{s.cme_after:.3f}")
        parts.append(Panel(table, title=f"held-out prompt {i}: {s.prompt[:100]!r}"))
    n = len(result.samples)
    if n:
        mb = sum(s.cme_before for s in result.samples) / n
        ma = sum(s.cme_after for s in result.samples) / n
        summary = (f"mean CME under {result.verifier} on the held-out prompts: {mb:.3f} before -> {ma:.3f} after "
                   f"({result.steps} GRPO steps")
        if result.reward_first is not None and result.reward_last is not None:
            summary += f"; training reward {result.reward_first:.3f} at step 1 -> {result.reward_last:.3f} at the last step"
        parts.append(summary + "). A few steps show the mechanics; they are too few to change the policy "
                     "reliably: for a real run use `cmerl train` with hundreds of steps.")
    if result.head_to_head is not None:
        parts.append(render_head_to_head(result.head_to_head))
    return Group(*parts)


def render_head_to_head(h: HeadToHead) -> str:
    """Two lines: who judged, wins/ties/losses of the trained policy, and its win rate with the interval."""
    w = h.winrate
    text = (f"head-to-head on {len(h.rows)} held-out prompts, judged by {h.judge} (both orders): trained vs "
            f"untrained wins {w.wins} / ties {w.ties} / losses {w.losses}")
    if w.errors:
        text += f" (errors excluded: {w.errors})"
    text += (f"; win rate of the trained policy (ties count half) {format_pct(w.win_rate, 0)} "
             f"[{int(w.level * 100)}% bootstrap CI {format_pct(w.ci_low, 0)}-{format_pct(w.ci_high, 0)}]")
    return text + (f". {len(h.rows)} pairs and a weak, position-biased judge: an illustration, not a measurement "
                   "(use `cmerl eval` for one).")
