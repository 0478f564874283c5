"""The default demo (``cmerl demo`` / ``make demo``): a short CME-GRPO run on the packaged models, then
greedy completions of held-out prompts before and after training, each scored by the verifier.

The demo settings live in :data:`DEMO_SETTINGS` (``configs/demo.yaml`` is the same config as a file).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cmerl.training import Echo, TrainConfig, apply_overrides, config_from_dict, finish, start, validate

#: The demo run. Sized from benchmarks/bench_grpo_step.py to finish in under 15 minutes on 2 CPU cores.
DEMO_SETTINGS: dict = {
    "policy": "smollm2-135m-instruct",
    "verifiers": ["qwen2.5-coder-0.5b-instruct"],
    "verifier_dtype": "bfloat16",
    "rewards": ["cme"],
    "prompts": "ultrafeedback",
    "max_prompt_length": 96,
    "max_prompts": 200,
    "heldout_prompts": 3,
    "system_prompt": "Answer briefly, in two or three sentences.",
    "num_generations": 4,
    "per_device_train_batch_size": 8,
    "max_completion_length": 64,
    "temperature": 1.0,
    "learning_rate": 1.0e-4,
    "max_steps": 16,
    "save_steps": 8,
    "mask_truncated_completions": False,
    "repetition_guard": True,
    "lora": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "seed": 42,
    "output_dir": "runs/demo",
}


def demo_config(overrides: Sequence[str] = (), *, timestamped: bool = True) -> TrainConfig:
    """The demo config with ``--set`` overrides; without an ``output_dir`` override the run directory is
    ``runs/demo-<YYYYmmdd-HHMMSS>`` (``timestamped``) so repeated demos never collide."""
    cfg = config_from_dict(dict(DEMO_SETTINGS), source="demo config")
    if timestamped and not any(o.startswith("output_dir=") for o in overrides):
        cfg = TrainConfig(**{**asdict(cfg), "output_dir": f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"})
    cfg = apply_overrides(cfg, overrides)
    validate(cfg, source="demo config")
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


def generate_greedy(model, tokenizer, prompts: Sequence, *, max_new_tokens: int,
                    system_prompt: str | None = None) -> list[str]:
    """Greedy completions, one prompt at a time, rendered exactly as GRPO renders them for the policy."""
    import torch
    from transformers import GenerationConfig

    from cmerl.data import to_policy_prompt

    eos = model.generation_config.eos_token_id
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    out = []
    try:
        for p in prompts:
            pp = to_policy_prompt(p, tokenizer, system_prompt)
            if isinstance(pp, str):
                ids = tokenizer(pp)["input_ids"]
            else:
                ids = tokenizer.apply_chat_template(pp, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
            x = torch.tensor([ids], device=model.device)
            with torch.no_grad():
                y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen)
            out.append(tokenizer.decode(y[0, len(ids):], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def run_demo(cfg: TrainConfig, *, echo: Echo | None = None) -> DemoResult:
    """Train per ``cfg`` (a new run) with before/after samples of its held-out prompts; see module docstring."""
    from cmerl.io import write_json_atomic

    say = echo or (lambda s: None)
    t0 = time.perf_counter()
    say(f"[bold]cmerl demo[/bold]: GRPO on CME rewards; outputs go to {cfg.output_dir}")
    session = start(cfg, progress=echo is not None, echo=echo)
    heldout = session.prompt_set.heldout
    verifier = session.verifier()
    if not heldout or verifier is None:
        raise ValueError("the demo needs heldout_prompts >= 1 and a cme reward")
    raw = [p if isinstance(p, str) else p[-1]["content"] for p in heldout]
    model = session.trainer.accelerator.unwrap_model(session.trainer.model)
    say(f"greedy completions of {len(heldout)} held-out prompts before training ...")
    before = generate_greedy(model, session.tokenizer, heldout, max_new_tokens=cfg.max_completion_length,
                             system_prompt=cfg.system_prompt)
    cme_before = [s.mean_logprob for s in verifier.score(heldout, before)]
    result = finish(session, echo=echo)
    model = session.trainer.accelerator.unwrap_model(session.trainer.model)  # merged when LoRA
    say("greedy completions after training ...")
    after = generate_greedy(model, session.tokenizer, heldout, max_new_tokens=cfg.max_completion_length,
                            system_prompt=cfg.system_prompt)
    cme_after = [s.mean_logprob for s in verifier.score(heldout, after)]
    samples = [SampleComparison(p, b, a, cb, ca) for p, b, a, cb, ca in zip(raw, before, after, cme_before, cme_after)]
    rewards = [h["reward"] for h in session.trainer.state.log_history if "reward" in h]
    samples_path = session.run_dir / "demo_samples.json"
    out = DemoResult(run_dir=session.run_dir, final_dir=result.final_dir, samples_path=samples_path, samples=samples,
                     verifier=verifier.name, steps=result.global_step, reward_first=rewards[0] if rewards else None,
                     reward_last=rewards[-1] if rewards else None, seconds=time.perf_counter() - t0)
    write_json_atomic(samples_path, {
        "verifier": out.verifier, "steps": out.steps, "reward_first_step": out.reward_first,
        "reward_last_step": out.reward_last, "seconds": out.seconds,
        "samples": [asdict(s) for s in samples]})
    return out


def render_comparison(result: DemoResult):
    """A rich renderable: one panel per held-out prompt, before/after text with CME."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

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
    return Group(*parts)
