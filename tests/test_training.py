"""GRPO training: config checks, rewards wiring, checkpoints, resume, SIGKILL recovery, learning signal.

Every run uses tiny random models with real tokenizers, saved as HF folders (tests/_training_helpers.py).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from _training_helpers import (
    POLICY_TOKENIZER,
    VERIFIER_TOKENIZER,
    preference_pair,
    tiny_config,
    tiny_random_folder,
    write_config,
    write_prompts,
)

from cmerl import training
from cmerl.diagnostics import RepetitionGuard, batch_diagnostics, distinct_n, repeated_ngram_share
from cmerl.io import iter_jsonl
from cmerl.training import (
    ConfigError,
    GuardedReward,
    RunDirExistsError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    latest_checkpoint,
    load_config,
    read_run_config,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
#: Tiny models gain nothing from a second thread, and OpenMP threads that spin-wait slow down badly on a
#: machine shared with other jobs; subprocesses get the same setting.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama policy (SmolLM2 tokenizer) and a tiny qwen2 verifier (Qwen2.5 tokenizer), plus prompts."""
    root = tmp_path_factory.mktemp("models")
    policy = tiny_random_folder(root / "policy", POLICY_TOKENIZER, arch="llama", seed=0)
    verifier = tiny_random_folder(root / "verifier", VERIFIER_TOKENIZER, arch="qwen2", seed=1)
    prompts = write_prompts(root / "prompts.jsonl")
    return policy, verifier, prompts


def metric_rows(run_dir: Path) -> list[dict]:
    return list(iter_jsonl(Path(run_dir) / training.METRICS_NAME))


# ------------------------------------------------------------------------------------ diagnostics
def test_diagnostics_by_hand():
    assert repeated_ngram_share([1, 2, 3, 4, 5], 4) == 0.0
    # 4-grams of 1 2 3 4 1 2 3 4: (1234)(2341)(3412)(4123)(1234): one of five repeats.
    assert repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4], 4) == pytest.approx(1 / 5)
    assert repeated_ngram_share([7] * 10, 4) == pytest.approx(6 / 7)
    assert repeated_ngram_share([1, 2], 4) == 0.0
    # bigrams (1,2),(2,3) and (1,2),(2,1): 3 unique of 4.
    assert distinct_n([[1, 2, 3], [1, 2, 1]], 2) == pytest.approx(3 / 4)
    assert math.isnan(distinct_n([[1], []], 2))
    stats = batch_diagnostics([[5, 6, 2], [5, 5, 5, 5, 5, 5]], eos_ids=[2], max_completion_length=6)
    assert stats.completion_length_mean == pytest.approx(4.5)
    assert stats.truncated_frac == pytest.approx(0.5)  # the second hit the limit without EOS
    assert stats.repeated_4gram_share == pytest.approx((0 + 2 / 3) / 2)


def test_guarded_reward_floors_degenerate_completions_and_logs():
    logged: dict[str, float] = {}
    extra: dict[str, list] = {}

    def length_reward(prompts, completions, **kwargs):
        return [float(len(c)) if c != "skip" else None for c in completions]

    guard = RepetitionGuard(ngram=4, max_share=0.5, floor=-20.0)
    fn = GuardedReward(length_reward, guard=guard, diagnostics=True, eos_ids=[2], max_completion_length=8)
    floor = training.RepetitionGuardReward(guard)
    ids = [[10, 11, 12, 13, 2], [9] * 8, [9] * 8]
    kwargs = {"prompts": ["p"] * 3, "completions": ["good", "loop", "skip"], "completion_ids": ids,
              "log_metric": logged.__setitem__, "log_extra": extra.__setitem__, "raw_prompt": ["r"] * 3}
    out = fn(**kwargs)
    # The degenerate completion leaves the reward (None: "does not apply"); the guard's own reward floors it.
    assert out == [4.0, None, None]
    assert floor(**kwargs) == [0.0, -20.0, -20.0]
    assert fn.__name__ == "length_reward" and floor.__name__ == "repetition_guard"
    assert logged["repetition_guard/floored_frac"] == pytest.approx(2 / 3)
    assert logged["diagnostics/truncated_frac"] == pytest.approx(2 / 3)
    assert logged["diagnostics/repeated_4gram_share"] == pytest.approx((0 + 4 / 5 + 4 / 5) / 3)
    assert extra["repeated_4gram_share"] == [0.0, 0.8, 0.8]


# ----------------------------------------------------------------------------------------- config
def test_defaults_are_valid_and_map_onto_grpo_config():
    cfg = TrainConfig()
    validate(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated GRPOConfig names are passed
        args = training.grpo_args(cfg)
        on = training.grpo_args(apply_overrides(cfg, ["gradient_checkpointing=true"]))
    for name in training.GRPO_FIELDS:
        assert getattr(args, name) == getattr(cfg, name), name
    assert args.gradient_checkpointing is False and args.remove_unused_columns is False
    assert on.gradient_checkpointing is True and getattr(on, "activation_checkpointing", True) is True


def test_config_errors_name_key_and_file(tmp_path, models):
    policy, verifier, prompts = models
    base = tiny_config(tmp_path, policy, verifier, prompts)
    cases = [
        ({"learnin_rate": 1e-5}, ConfigError, r"bad\.yaml.*unknown key 'learnin_rate'.*did you mean 'learning_rate'"),
        ({"max_steps": "ten"}, ConfigError, r"bad\.yaml.*'max_steps' has a wrong type"),
        ({"lora": "yes"}, ConfigError, r"'lora' has a wrong type"),
        ({"loss_type": "ppo"}, ConfigError, r"'loss_type'.*one of"),
        ({"verifiers": [str(policy)]}, ConfigError, r"bad\.yaml.*'verifiers'.*is the policy model"),
        ({"prompts": str(tmp_path / "missing.jsonl")}, FileNotFoundError, r"bad\.yaml.*'prompts'.*missing\.jsonl"),
        ({"rewards": ["cme", "bleu"]}, ConfigError, r"'rewards'.*unknown reward 'bleu'"),
        ({"reward_weights": [1.0, 2.0]}, ConfigError, r"'reward_weights'.*2 weights for 1 rewards"),
        ({"trl": {"top_kk": 5}}, ConfigError, r"trl\.top_kk.*did you mean 'top_k'"),
        ({"trl": {"learning_rate": 1.0}}, ConfigError, r"top-level cmerl key"),
        ({"per_device_train_batch_size": 6}, ConfigError, r"TRL rejected.*divisible by num_generations"),
    ]
    for change, exc, pattern in cases:
        path = write_config(tmp_path / "bad.yaml", {**base, **change})
        with pytest.raises(exc, match=pattern):
            load_config(path)
    # The self-referential ablation needs the explicit flag, and then passes.
    ok = write_config(tmp_path / "ok.yaml", {**base, "verifiers": [str(policy)], "allow_self_verification": True})
    assert load_config(ok).allow_self_verification


def test_config_errors_come_before_any_model_loads(tmp_path, models, monkeypatch):
    """The CLI refuses bad configs without loading a model (load_model is spied on, not replaced)."""
    from typer.testing import CliRunner

    import cmerl.models
    from cmerl.cli import app

    calls = []
    real = cmerl.models.load_model
    monkeypatch.setattr(cmerl.models, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    policy, verifier, prompts = models
    base = tiny_config(tmp_path, policy, verifier, prompts)
    runner = CliRunner()
    for change, needle in [({"max_stepz": 3}, "max_stepz"), ({"verifiers": [str(policy)]}, "verifiers"),
                           ({"prompts": str(tmp_path / "gone.jsonl")}, "gone.jsonl")]:
        path = write_config(tmp_path / "bad.yaml", {**base, **change})
        result = runner.invoke(app, ["train", "--config", str(path)])
        assert result.exit_code == 2, result.output
        assert needle in result.output and "bad.yaml" in result.output
    assert calls == []


def test_shipped_gpu_config_checks_on_a_cpu_machine():
    """configs/gpu-qwen2.5-1.5b.yaml validates here (bf16 and vLLM checks are deferred to the GPU) and
    its header's batch arithmetic is what the config says."""
    cfg = load_config(REPO / "configs" / "gpu-qwen2.5-1.5b.yaml")
    plan = training.describe_run(cfg, processes=8)
    assert "256 completions = 32 prompts x G=8" in plan
    assert "32 prompts x G=8" in (REPO / "configs" / "gpu-qwen2.5-1.5b.yaml").read_text()


def test_check_prints_the_plan_and_loads_nothing(tmp_path, models, monkeypatch):
    """``cmerl train --check``: config and model names checked, the batch arithmetic printed (for 4
    processes), no model loaded and no run directory created."""
    from typer.testing import CliRunner

    import cmerl.models
    from cmerl.cli import app

    calls = []
    monkeypatch.setattr(cmerl.models, "load_model", lambda *a, **k: calls.append(a))
    policy, verifier, prompts = models
    cfg = {**tiny_config(tmp_path, policy, verifier, prompts), "per_device_train_batch_size": 6,
           "num_generations": 3, "gradient_accumulation_steps": 2, "lora": True, "lora_r": 4}
    path = write_config(tmp_path / "run.yaml", cfg)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", str(path), "--check", "--processes", "4"])
    assert result.exit_code == 0, result.output
    assert "config OK" in result.output and "training LoRA r=4" in result.output
    assert "6 completions x 2 accumulation x 4 processes = 48 completions = 16 prompts x G=3" in result.output
    assert f"cme from {verifier}" in result.output
    assert calls == [] and not Path(cfg["output_dir"]).exists()
    bad = write_config(tmp_path / "bad.yaml", {**cfg, "verifiers": [str(tmp_path / "no-such-model")]})
    result = runner.invoke(app, ["train", "--config", str(bad), "--check"])
    assert result.exit_code == 2 and "no-such-model" in result.output and "config OK" not in result.output


def test_overrides_and_template(tmp_path):
    cfg = apply_overrides(TrainConfig(), ["learning_rate=1e-5", "rewards=cme,self_certainty", "reward_weights=[1, 0.5]",
                                          "lora=true", "max_prompts=null", "trl.top_k=50", "report_to=[]"])
    assert cfg.learning_rate == 1e-5 and cfg.rewards == ["cme", "self_certainty"]
    assert cfg.reward_weights == [1.0, 0.5] and cfg.lora is True and cfg.trl == {"top_k": 50}
    validate(cfg)
    assert training.grpo_args(cfg).top_k == 50
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        apply_overrides(cfg, ["stepz=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(cfg, ["max_steps"])
    # The commented template parses back to the defaults, and documents every key.
    template = training.config_template()
    assert config_from_dict(yaml.safe_load(template)) == TrainConfig()
    for name, _, _, help_text in training.config_reference():
        assert help_text, f"{name} is undocumented"
        assert f"# {help_text}" in template


def test_packaged_configs_are_valid_and_found_by_name(tmp_path, monkeypatch):
    from cmerl.configs import CONFIG_ROOT, find_config, packaged_configs
    from cmerl.demo import demo_config

    names = packaged_configs()
    assert {"demo", "gsm8k-cpu", "gpu-qwen2.5-1.5b", "paper/quality1", "study/row2-smollm2-cme"} <= set(names)
    for name in packaged_configs():
        if not name.startswith("study/"):  # study rows are not train configs (their train: block is, tests/test_study.py)
            load_config(name)
    # the repository's configs/ is the package's folder, so both spellings are one file
    assert (REPO / "configs").resolve() == CONFIG_ROOT
    assert find_config("demo") == CONFIG_ROOT / "demo.yaml" == (REPO / find_config("configs/demo.yaml")).resolve()
    # `cmerl demo` runs the packaged demo.yaml: the one copy of its settings
    assert load_config("demo") == demo_config(["output_dir=runs/demo"], timestamped=False)
    assert load_config("demo").policy != load_config("demo").verifiers[0]
    # a file in the working directory wins over a packaged name; a name that is neither is a clear error
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("policy: smollm2-135m-instruct\nverifiers: [qwen2.5-coder-0.5b-instruct]\n"
                                   "max_steps: 3\n")
    assert load_config("demo").max_steps == 3
    with pytest.raises(FileNotFoundError, match="not a packaged config; `cmerl configs` lists those"):
        load_config("no-such-config")


def test_configs_command_lists_and_prints_packaged_configs():
    from typer.testing import CliRunner

    from cmerl.cli import app
    from cmerl.configs import CONFIG_ROOT

    runner = CliRunner()
    listed = runner.invoke(app, ["configs"])
    assert listed.exit_code == 0 and {"demo", "paper/quality1", "study/row2-smollm2-cme"} <= set(listed.stdout.split())
    shown = runner.invoke(app, ["configs", "paper/quality1"])
    assert shown.exit_code == 0 and shown.stdout == (CONFIG_ROOT / "paper" / "quality1.yaml").read_text()
    missing = runner.invoke(app, ["configs", "paper/nope"])
    assert missing.exit_code == 2 and "paper/nope" in missing.output and "Traceback" not in missing.output


def test_docs_cover_every_config_key():
    text = (REPO / "docs" / "training.md").read_text()
    missing = [name for name, *_ in training.config_reference() if f"`{name}`" not in text]
    assert not missing, f"docs/training.md does not document {missing}"


# --------------------------------------------------------------------------------- end to end runs
@pytest.fixture(scope="module")
def three_step_run(tmp_path_factory, models):
    """A 3-step run (checkpoints at 2 and 3) through the library API, shared by the tests below."""
    policy, verifier, prompts = models
    tmp = tmp_path_factory.mktemp("run3")
    cfg = config_from_dict(tiny_config(tmp, policy, verifier, prompts, max_steps=3, save_steps=2,
                                       report_to=["tensorboard"]))
    validate(cfg)
    result = training.train(cfg)
    return cfg, result


@pytest.mark.e2e
def test_three_steps_end_to_end(three_step_run):
    from cmerl.models import load_model

    cfg, result = three_step_run
    run = Path(cfg.output_dir)
    assert result.global_step == 3
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("reward", "reward_std", "rewards/cme/mean", "rewards/cme/std", "cme/seconds",
                    "diagnostics/completion_length_mean", "diagnostics/truncated_frac", "diagnostics/distinct_2",
                    "diagnostics/repeated_4gram_share", "completions/clipped_ratio"):
            assert isinstance(r.get(key), float), key
    assert [s for s, _, ok in training.list_checkpoints(run) if ok] == [2, 3]
    ckpt = latest_checkpoint(run)
    assert ckpt == run / "checkpoint-3"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "optimizer.pt", "trainer_state.json",
                 training.CONFIG_NAME, training.RUN_CARD_NAME, training.CURVE_NAME, training.MARKER_NAME):
        assert (ckpt / name).is_file(), name
    assert read_run_config(run) == cfg
    card = (ckpt / training.RUN_CARD_NAME).read_text()
    assert "| 3 |" in card and "reward_curve.png" in card
    assert len(list((run / "completions").glob("*.parquet"))) == 3
    assert list((run / "runs").rglob("events.out.tfevents.*")), "no TensorBoard events"
    model, tok = load_model(str(result.final_dir), dtype="float32")
    out = model.generate(torch.tensor([[tok.bos_token_id or 1, 42]]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 5
    # final/ holds the trained weights: those of the last checkpoint, not the initial policy's
    from safetensors.torch import load_file

    final = load_file(result.final_dir / "model.safetensors")
    last = load_file(ckpt / "model.safetensors")
    initial = load_file(Path(cfg.policy) / "model.safetensors")
    assert final.keys() == last.keys() == initial.keys()
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert any(not torch.equal(final[k], initial[k]) for k in final)


def test_logged_rewards_are_the_verifier_scores_of_the_logged_completions(three_step_run, models):
    """The completions table's cme column equals an independent re-scoring of its (prompt, completion)s."""
    import pandas as pd

    from cmerl.scoring import Verifier

    cfg, _ = three_step_run
    _, verifier_dir, _ = models
    table = pd.read_parquet(Path(cfg.output_dir) / "completions" / "completions_00003.parquet")
    assert len(table) == cfg.per_device_train_batch_size
    verifier = Verifier.from_pretrained(str(verifier_dir), dtype="float32")
    prompts = [list(p) for p in table["prompt"]]  # conversational: message lists, as TRL logged them
    scores = verifier.score(prompts, [list(c) for c in table["completion"]])
    for got, s in zip(table["cme"], scores):
        assert got == pytest.approx(s.mean_logprob, abs=1e-4)
    # Advantages are the group-normalised rewards (scale_rewards="group").
    groups = table["cme"].to_numpy().reshape(-1, cfg.num_generations)
    adv = table["advantage"].to_numpy().reshape(-1, cfg.num_generations)
    expect = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
    assert adv == pytest.approx(expect, abs=1e-3)


def test_new_run_refuses_an_existing_run_dir(three_step_run):
    cfg, _ = three_step_run
    with pytest.raises(RunDirExistsError, match="--resume"):
        training.train(cfg)


@pytest.mark.e2e
def test_resume_continues_at_the_right_step_with_the_same_data(three_step_run, tmp_path, models):
    """Resuming the 3-step run to 5 steps reproduces an uninterrupted 5-step run exactly."""
    policy, verifier, prompts = models
    cfg3, _ = three_step_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(cfg3.output_dir, resumed_dir)
    cfg = read_run_config(resumed_dir, ["max_steps=5"])
    assert cfg.output_dir == str(resumed_dir)
    with pytest.raises(ConfigError, match="cannot change when resuming"):
        read_run_config(resumed_dir, ["learning_rate=0.1"])
    result = training.train(cfg, resume=True)
    assert result.global_step == 5
    resumed = metric_rows(resumed_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    ref_cfg = config_from_dict(tiny_config(tmp_path / "ref", policy, verifier, prompts, max_steps=5, save_steps=2,
                                           report_to=["tensorboard"]))
    training.train(ref_cfg)
    reference = metric_rows(ref_cfg.output_dir)
    # What resuming guarantees: the same data order, the same sampled completions, the same rewards, and
    # weights that equal the uninterrupted run's up to float32 rounding. (The logged GRPO loss is a sum of
    # advantages that cancel to ~1e-5; its rounding depends on the CPU's summation order, so it is not
    # compared.)
    for a, b in zip(resumed, reference):
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-4, abs=1e-5), a["step"]
    import pandas as pd
    from safetensors.torch import load_file

    for step in (4, 5):
        name = f"completions/completions_{step:05d}.parquet"
        a, b = pd.read_parquet(resumed_dir / name), pd.read_parquet(Path(ref_cfg.output_dir) / name)
        assert list(a["prompt"]) == list(b["prompt"]) and list(a["completion"]) == list(b["completion"])
    start = load_file(str(policy / "model.safetensors"))
    ref_w = load_file(str(Path(ref_cfg.output_dir) / "final" / "model.safetensors"))
    res_w = load_file(str(resumed_dir / "final" / "model.safetensors"))
    assert ref_w.keys() == res_w.keys()
    moved = sum(float((ref_w[k].double() - start[k].double()).abs().sum()) for k in ref_w if k in start)
    apart = sum(float((ref_w[k].double() - res_w[k].double()).abs().sum()) for k in ref_w)
    assert moved > 0
    # Each Adam step moves a weight by about lr whatever the gradient's size; rounding-level gradient
    # differences move it by a tiny fraction of that. A resume that changed the data or the optimizer state
    # differs by the same order as the training moved the weights (ratio ~1).
    assert apart <= 1e-3 * moved, (apart, moved)


@pytest.mark.e2e
def test_sigkilled_run_resumes_and_never_loads_a_partial_checkpoint(tmp_path, models):
    policy, verifier, prompts = models
    cfg = tiny_config(tmp_path, policy, verifier, prompts, max_steps=200, save_steps=2, log_completions=False)
    path = write_config(tmp_path / "run.yaml", cfg)
    run = Path(cfg["output_dir"])
    cmerl = Path(sys.executable).parent / "cmerl"
    proc = subprocess.Popen([str(cmerl), "train", "--config", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, env=SUBPROCESS_ENV)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            done = [s for s, _, ok in training.list_checkpoints(run) if ok]
            steps = [r["step"] for r in metric_rows(run)] if (run / training.METRICS_NAME).exists() else []
            if done and steps and max(steps) >= max(done) + 1:  # mid-run, past a checkpoint
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint within the deadline")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    last = latest_checkpoint(run)
    last_step = training.checkpoint_step(last)
    logged_before = max(r["step"] for r in metric_rows(run))
    assert logged_before > last_step
    # A checkpoint left half-written (no marker, truncated weights) at a later step must not be loaded.
    partial = run / f"checkpoint-{last_step + 100}"
    shutil.copytree(last, partial)
    (partial / training.MARKER_NAME).unlink()
    (partial / "model.safetensors").write_bytes(b"truncated")
    assert latest_checkpoint(run) == last
    messages: list[str] = []
    resumed = read_run_config(run, [f"max_steps={last_step + 2}"])
    result = training.train(resumed, resume=True, print_status=messages.append)
    assert result.global_step == last_step + 2
    assert not partial.exists()
    assert any(f"resuming from {last}" in m for m in messages)
    steps = [r["step"] for r in metric_rows(run)]
    assert steps == list(range(1, last_step + 3))  # rows after the checkpoint were dropped, then redone


@pytest.mark.e2e
def test_learning_signal_raises_cme(tmp_path):
    """A verifier that strongly prefers half of the policy's likely words: 30 GRPO steps must raise the mean
    CME reward from its analytic starting value to near the preferred words' log-likelihood."""
    policy, verifier, cand, preferred = preference_pair(tmp_path)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config_from_dict(tiny_config(tmp_path, policy, verifier, prompts, max_steps=30, save_steps=1000,
                                       learning_rate=0.02, mask_truncated_completions=False, log_completions=False))
    training.train(cfg)
    cme = [r["rewards/cme/mean"] for r in metric_rows(cfg.output_dir)]
    assert len(cme) == 30
    # Analytic expectations from the constructed distributions (C tokens re-tokenize to themselves).
    from cmerl.models import load_tokenizer

    vocab = len(load_tokenizer(POLICY_TOKENIZER))
    v_logits = torch.zeros(vocab)
    v_logits[cand] = 6.0
    v_logits[preferred] = 10.0
    v_logp = v_logits - torch.logsumexp(v_logits, 0)
    p_logits = torch.zeros(vocab)
    p_logits[cand] = 8.0
    p = torch.softmax(p_logits, 0)
    start = float((p * v_logp).sum())
    best = float(v_logp[preferred[0]])
    first, last = sum(cme[:5]) / 5, sum(cme[-5:]) / 5
    assert first == pytest.approx(start, abs=1.0)
    assert last > first + 2.0, cme
    assert last == pytest.approx(best, abs=1.0)


@pytest.mark.e2e
def test_two_processes_under_accelerate_launch_on_cpu(tmp_path, models):
    """The same config under `accelerate launch` with 2 CPU processes: one DDP group (gloo), each process
    loads its verifier once, and each step's completions table holds both processes' completions."""
    import socket

    import pandas as pd

    policy, verifier, prompts = models
    cfg = tiny_config(tmp_path, policy, verifier, prompts, max_steps=2, save_steps=2, per_device_train_batch_size=4)
    path = write_config(tmp_path / "ddp.yaml", cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bindir = Path(sys.executable).parent
    proc = subprocess.run(
        [str(bindir / "accelerate"), "launch", "--config_file", str(REPO / "examples/accelerate/cpu_2proc.yaml"),
         "--main_process_port", str(port), str(bindir / "cmerl"), "train", "--config", str(path)],
        capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(cfg["output_dir"])
    args = torch.load(run / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert args.world_size == 2
    for rank in (0, 1):
        assert proc.stderr.count(f"(rank {rank} of 2) loading reward models") == 1, proc.stderr[-3000:]
    assert [r["step"] for r in metric_rows(run)] == [1, 2]
    table = pd.read_parquet(run / "completions" / "completions_00002.parquet")
    assert len(table) == 8  # 2 prompts x G=4, gathered from the 2 processes
    groups = [str(list(p)) for p in table["prompt"]]
    assert all(len(set(groups[i:i + 4])) == 1 for i in (0, 4)) and groups[0] != groups[4]


@pytest.mark.e2e
def test_lora_with_weighted_baseline_reward_resumes_and_merges(tmp_path, models):
    """LoRA + rewards [cme, self_certainty] weighted [1, 0.5] (live-policy baseline): the logged total is
    the weighted sum, checkpoints hold the adapter, resume works, final/ is the merged model."""
    from cmerl.models import load_model

    policy, verifier, prompts = models
    cfg = config_from_dict(tiny_config(tmp_path, policy, verifier, prompts, max_steps=2, save_steps=2, lora=True,
                                       lora_r=4, lora_alpha=8, rewards=["cme", "self_certainty"],
                                       reward_weights=[1.0, 0.5], log_completions=False))
    validate(cfg)
    training.train(cfg)
    ckpt = latest_checkpoint(cfg.output_dir)
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    result = training.train(read_run_config(cfg.output_dir, ["max_steps=3"]), resume=True)
    assert result.global_step == 3
    rows = metric_rows(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["reward"] == pytest.approx(r["rewards/cme/mean"] + 0.5 * r["rewards/self_certainty/mean"], abs=1e-4)
        assert r["rewards/self_certainty/mean"] > 0  # KL(uniform || p) is positive
    assert not (result.final_dir / "adapter_config.json").exists()
    model, _ = load_model(str(result.final_dir), dtype="float32")
    assert not any("lora" in name for name, _ in model.named_parameters())
    # final/ is the base policy with the last checkpoint's adapter merged in
    from peft import PeftModel

    base, _ = load_model(str(policy), dtype="float32")
    merged = PeftModel.from_pretrained(base, str(latest_checkpoint(cfg.output_dir))).merge_and_unload()
    want, got = merged.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)
    initial = load_model(str(policy), dtype="float32")[0].state_dict()
    assert any(not torch.allclose(initial[k], got[k]) for k in got)  # the adapter changed something


def test_baseline_scorer_live_policy_tracks_updates_frozen_copy_does_not(tmp_path, models):
    from cmerl.models import load_model, load_tokenizer
    from cmerl.scoring import Verifier

    policy_dir, verifier, prompts = models
    base = tiny_config(tmp_path, policy_dir, verifier, prompts, rewards=["self_likelihood"])
    model, tok = load_model(str(policy_dir), dtype="float32")
    pr, comps = ["Name a colour.", "Say hello."], ["Blue is a colour.", "Hello there!"]
    live = training.build_rewards(config_from_dict({**base, "baseline_scorer": "policy"}), model, tok)[0]
    frozen = training.build_rewards(config_from_dict({**base, "baseline_scorer": "frozen",
                                                      "verifier_dtype": "float32"}), model, tok)[0]
    before_live, before_frozen = live(pr, comps), frozen(pr, comps)
    assert before_live == pytest.approx(before_frozen, abs=1e-4)
    # Scored the way the policy sees its prompts (template default system prompt), not like a verifier.
    ref = Verifier(load_model(str(policy_dir), dtype="float32")[0], load_tokenizer(str(policy_dir)),
                   render=training.policy_render_config(config_from_dict(base)))
    assert before_live == pytest.approx([s.mean_logprob for s in ref.score(pr, comps)], abs=1e-4)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    assert live(pr, comps) != pytest.approx(before_live, abs=1e-3)
    assert frozen(pr, comps) == pytest.approx(before_frozen, abs=1e-6)


@pytest.mark.e2e
def test_remote_verifier_url_trains_with_the_same_rewards(tmp_path, models):
    """`verifiers: [http://...]` scores through a real `cmerl serve` process; the logged rewards equal a
    local re-scoring of the logged completions."""
    import pandas as pd
    from _server_helpers import ServerProcess

    from cmerl.scoring import Verifier

    policy, verifier, prompts = models
    with ServerProcess(["--verifier", str(verifier), "--dtype", "float32"], log=tmp_path / "serve.log",
                       env=SUBPROCESS_ENV).start() as server:
        url = f"{server.url}#tokenizer={verifier}&protocol=cmerl"
        cfg = config_from_dict(tiny_config(tmp_path, policy, verifier, prompts, verifiers=[url], max_steps=2,
                                           save_steps=2))
        validate(cfg)
        training.train(cfg)
    table = pd.read_parquet(Path(cfg.output_dir) / "completions" / "completions_00002.parquet")
    local = Verifier.from_pretrained(str(verifier), dtype="float32")
    scores = local.score([list(p) for p in table["prompt"]], [list(c) for c in table["completion"]])
    assert list(table["cme"]) == pytest.approx([s.mean_logprob for s in scores], abs=1e-4)
    with pytest.raises(ConfigError, match="bad option"):
        validate(apply_overrides(cfg, ["verifiers=[http://127.0.0.1:1#tokenizr=x]"]))
