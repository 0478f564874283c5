"""Held-out evaluation during training: every N steps, judge the policy against its step-0 self on a
fixed prompt split that is neither trained on nor reported on, and keep ``best/`` by that win rate.

The reference code picked its best checkpoint on UltraFeedback prompts drawn from the same pool as its
training prompts, and reported on prompts it may have selected on. Here the split is checked before
training starts: a held-out prompt that is also a training prompt, or one of the evaluation prompts
(``heldout_eval_exclude``, default the 805 AlpacaEval instructions), is refused with
:class:`HeldOutOverlapError` (prompts compared after collapsing whitespace and case).

Files under ``RUN_DIR/heldout/``: ``outputs_step0.json`` and ``outputs_step<N>.json`` (greedy, AlpacaEval
format), ``verdicts_step<N>.jsonl`` (step N = A vs step 0 = B, both orders), ``heldout.jsonl`` (one row
per evaluation: step, win rate, interval, n), and ``split.json`` (the split's source, size and sha256).
``RUN_DIR/best/`` holds the model with the highest held-out win rate so far and ``cmerl_best.json``
saying which step, which win rate, which judge, and which split chose it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from cmerl.generation import GenerationConfig, PromptItem, generate_outputs, load_prompt_items
from cmerl.io import append_jsonl, iter_jsonl, write_json_atomic
from cmerl.training.config import StatusPrinter, TrainConfig

BEST_DIR = "best"
BEST_MARKER = "cmerl_best.json"
HELDOUT_DIR = "heldout"


class HeldOutOverlapError(ValueError):
    """The held-out split shares prompts with the training prompts or an evaluation prompt set."""


def normalise(text: str) -> str:
    """The form prompts are compared in: whitespace runs collapsed, stripped, case-folded."""
    return " ".join(text.split()).casefold()


def prompt_text(prompt: str | list) -> str:
    """A prompt as text: a string as is, a message list as its last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else json.dumps(prompt)


@dataclass(frozen=True)
class HeldOutSplit:
    """The held-out prompts (text) and where they came from; ``sha256`` is over the normalised prompts."""

    name: str
    instructions: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(normalise(t) for t in self.instructions).encode("utf-8")).hexdigest()

    def to_dict(self) -> dict:
        return {"name": self.name, "n": len(self.instructions), "sha256": self.sha256}


def check_split_overlap(split: HeldOutSplit, training: Sequence[str | list], excluded: dict[str, Sequence[str]]) -> None:
    """Raise :class:`HeldOutOverlapError` when a held-out prompt is a training prompt or belongs to one of
    the ``excluded`` evaluation sets (name -> prompts), naming the count and the first shared prompt."""
    held = {normalise(t): t for t in split.instructions}
    if len(held) < len(split.instructions):
        raise HeldOutOverlapError(f"held-out split {split.name} repeats a prompt; give distinct prompts")
    for what, others in [("the training prompts", [prompt_text(p) for p in training]),
                         *[(f"the evaluation prompts {name!r}", list(v)) for name, v in excluded.items()]]:
        shared = [held[k] for k in dict.fromkeys(normalise(t) for t in others) if k in held]
        if shared:
            raise HeldOutOverlapError(
                f"held-out split {split.name} shares {len(shared)} prompt(s) with {what}, e.g. {shared[0][:80]!r}; "
                "a checkpoint chosen on it would be chosen on data it trained on or is reported on. Use other "
                "prompts (heldout_eval_prompts) or the run's own heldout_prompts")


def heldout_split(cfg: TrainConfig, training: Sequence[str | list], run_heldout: Sequence[str | list]) -> HeldOutSplit:
    """The split of a run (``heldout_eval_prompts``, else the run's own ``heldout_prompts``), first
    ``heldout_eval_n`` prompts, checked against ``training`` and ``heldout_eval_exclude``."""

    if cfg.heldout_eval_prompts is None:
        if not run_heldout:
            raise ValueError("heldout_eval_steps needs held-out prompts: set heldout_prompts >= 1 or "
                             "heldout_eval_prompts")
        name = f"{cfg.prompts} (last {len(run_heldout)} prompts, heldout_prompts)"
        texts = [prompt_text(p) for p in run_heldout]
    else:
        name = cfg.heldout_eval_prompts
        texts = [it.instruction for it in load_prompt_items(cfg.heldout_eval_prompts)]
    split = HeldOutSplit(name, tuple(texts[:cfg.heldout_eval_n]))
    excluded = {spec: [it.instruction for it in load_prompt_items(spec)] for spec in cfg.heldout_eval_exclude}
    check_split_overlap(split, training, excluded)
    return split


def _callback_base():

    return TrainerCallback


class HeldOutEval(_callback_base()):
    """The callback (main process only; see module docstring). ``judge_factory`` builds the judge once,
    on the first evaluation (default: :func:`cmerl.judge_modes.build_judge` of ``heldout_eval_judge``)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, split: HeldOutSplit, tokenizer, *,
                 print_status: StatusPrinter | None = None, judge_factory: Callable[[], object] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / HELDOUT_DIR
        self.split = split
        self.tokenizer = tokenizer
        self.print_status = print_status
        self.judge_factory = judge_factory
        self._judge = None

        self.items = [PromptItem(k, t) for k, t in enumerate(split.instructions)]
        self.generation = GenerationConfig(max_new_tokens=cfg.heldout_eval_max_new_tokens, temperature=0.0,
                                           system_prompt=cfg.system_prompt, dtype=cfg.policy_dtype)

    # -- helpers
    def _say(self, text: str) -> None:
        if self.print_status:
            self.print_status(text)

    def _generate(self, model, step: int) -> Path:

        path = self.dir / f"outputs_step{step}.json"
        was_training = model.training
        model.eval()
        try:
            generate_outputs(model, self.tokenizer, self.items, path, generator=f"step-{step}", config=self.generation)
        finally:
            model.train(was_training)
        return path

    def _judge_once(self):
        if self._judge is None:
            if self.judge_factory is not None:
                self._judge = self.judge_factory()
            else:
                # deferred: torch, via cmerl.judge_modes and cmerl.judging (slow import, loaded only when used)
                from cmerl.judge_modes import build_judge
                from cmerl.judging import JudgeSpec

                self._judge = build_judge(self.cfg.heldout_eval_judge, JudgeSpec(self.cfg.heldout_eval_judge))
        return self._judge

    def best(self) -> dict | None:
        """The ``cmerl_best.json`` of the run so far, if any."""
        p = self.run_dir / BEST_DIR / BEST_MARKER
        return json.loads(p.read_text()) if p.is_file() else None

    # -- trainer hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return

        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / "split.json", {**self.split.to_dict(), "instructions": list(self.split.instructions)})
        if (self.dir / "outputs_step0.json").is_file():
            return
        if state.global_step == 0 and model is not None:
            self._say(f"held-out evaluation: step-0 outputs on {len(self.items)} prompts of {self.split.name}")
            self._generate(model, 0)
        else:  # resumed without step-0 outputs: make them with the starting model
            # deferred: torch, via cmerl.evaluation (slow import, loaded only when used)
            from cmerl.evaluation import ensure_outputs

            ensure_outputs(self.cfg.policy, self.items, self.dir / "outputs_step0.json", self.generation,
                           generator="step-0")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.cfg.heldout_eval_steps
        if not state.is_world_process_zero or not every or state.global_step % every or model is None:
            return
        self.evaluate(model, state.global_step)

    def evaluate(self, model, step: int) -> dict:
        """Generate at ``step``, judge against step 0, record, and refresh ``best/`` when it is the best."""
        # deferred: torch, via cmerl.judging and cmerl.winrates (slow import, loaded only when used)
        from cmerl.judging import DecisionRule, load_pairs, run_judge, verdicts_header
        from cmerl.winrates import summarize_verdicts

        outputs = self._generate(model, step)
        pairs, _ = load_pairs(outputs, self.dir / "outputs_step0.json")
        judge = self._judge_once()
        rule = DecisionRule()
        verdicts = self.dir / f"verdicts_step{step}.jsonl"
        header = verdicts_header(judge, rule, judge.prompt, a={"path": str(outputs), "generator": f"step-{step}"},
                                 b={"path": str(self.dir / "outputs_step0.json"), "generator": "step-0"})
        run_judge(judge, pairs, verdicts, rule=rule, header=header)
        w = summarize_verdicts(verdicts).winrate
        row = {"step": step, "win_rate": w.win_rate, "ci_low": w.ci_low, "ci_high": w.ci_high, "n": w.n,
               "errors": w.errors, "judge": judge.name, "split": self.split.to_dict(), "time": time.time()}
        append_jsonl(self.dir / "heldout.jsonl", [row])
        best = self.best()
        improved = w.win_rate is not None and (best is None or w.win_rate > best["win_rate"])
        self._say(f"held-out win rate at step {step} vs step 0: {w.win_rate:.3f} (n={w.n})"
                  + (" -> best/" if improved else ""))
        if improved:
            self._save_best(model, {**row, "against": "step-0 outputs of the same run",
                                    "verdicts": str(verdicts), "chosen_by": "held-out split " + self.split.name})
        return row

    def _save_best(self, model, record: dict) -> None:
        target = self.run_dir / BEST_DIR
        tmp = Path(tempfile.mkdtemp(dir=self.run_dir, prefix=".best.tmp-"))
        try:
            model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            write_json_atomic(tmp / BEST_MARKER, record)
            if target.exists():
                shutil.rmtree(target)
            tmp.chmod(0o755)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def heldout_rows(run_dir: str | Path) -> list[dict]:
    """The rows of ``RUN_DIR/heldout/heldout.jsonl`` (empty when the run had no held-out evaluation)."""
    return list(iter_jsonl(Path(run_dir) / HELDOUT_DIR / "heldout.jsonl"))


__all__ = ["HeldOutEval", "HeldOutOverlapError", "HeldOutSplit", "check_split_overlap", "heldout_rows",
           "heldout_split", "normalise"]
