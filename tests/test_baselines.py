"""The baselines of issue 13: the reward registry, the reverse-KL reward, the repetition guard acting on the
combined reward, DPO (``method: dpo``) and distillation (``method: distill`` / ``cmerl distill``).

Every trainer here is TRL's own (GRPOTrainer, DPOTrainer, SFTTrainer) running a few steps on tiny random
models with real tokenizers (tests/_training_helpers.py); each run must change the saved weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from _training_helpers import (
    POLICY_TOKENIZER,
    VERIFIER_TOKENIZER,
    preference_pair,
    tiny_config,
    tiny_random_folder,
    write_config,
    write_prompts,
)
from safetensors.torch import load_file

from cmerl import training
from cmerl.io import iter_jsonl
from cmerl.models import load_tokenizer
from cmerl.rewards import CrossModelEntropy, ReverseKL, SelfLikelihood, SelfVerificationError
from cmerl.scoring import Verifier
from cmerl.training import ConfigError, config_from_dict, validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama policy (SmolLM2 tokenizer), a tiny qwen2 verifier (Qwen2.5 tokenizer), prompts, and a
    preference file with prompt/chosen/rejected rows."""
    root = tmp_path_factory.mktemp("baseline-models")
    policy = tiny_random_folder(root / "policy", POLICY_TOKENIZER, arch="llama", seed=0)
    verifier = tiny_random_folder(root / "verifier", VERIFIER_TOKENIZER, arch="qwen2", seed=1)
    prompts = write_prompts(root / "prompts.jsonl")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}: name a colour.",
                                         "chosen": f"Blue is a calm colour, number {i}.",
                                         "rejected": "no no no no no"}) + "\n" for i in range(8)))
    return policy, verifier, prompts, pairs


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    assert set(before) == set(after)
    return [k for k in before if not torch.equal(before[k], after[k])]


def metric_rows(run_dir) -> list[dict]:
    return list(iter_jsonl(Path(run_dir) / training.METRICS_NAME))


# ------------------------------------------------------------------------------------------- registry
def test_registry_holds_every_reward_and_new_ones_register_themselves(models):
    policy, verifier, prompts, _ = models
    for name in ("cme", "self_certainty", "neg_entropy", "self_likelihood", "reverse_kl"):
        assert name in training.reward_names()
        assert training.get_reward(name).help
    assert training.get_reward("reverse_kl").uses_verifiers and training.get_reward("reverse_kl").uses_policy
    with pytest.raises(ValueError, match="unknown reward 'nope'; use any of cme"):
        training.get_reward("nope")
    with pytest.raises(ValueError, match="reserved"):
        training.register_reward("repetition_guard", help="x")(lambda ctx: None)
    with pytest.raises(ValueError, match="already registered"):
        training.register_reward("cme", help="x")(lambda ctx: None)

    @training.register_reward("toy_length", help="completion length (a toy)")
    def toy(ctx):
        def length(prompts, completions, **kwargs):
            return [float(len(c)) for c in completions]
        return length

    try:
        base = tiny_config(Path("/tmp"), policy, verifier, prompts)
        cfg = config_from_dict({**base, "rewards": ["toy_length"]})
        validate(cfg)  # a registered name is a valid config value at once
        fns = training.build_rewards(cfg, None, None)
        assert [f.__name__ for f in fns] == ["toy_length", "repetition_guard"]
        assert training.trl_reward_weights(cfg) == [1.0, 1.0]
        assert fns[0](prompts=["p"], completions=["abc"], completion_ids=[[1, 2, 3]]) == [3.0]
        assert training.trl_reward_weights(config_from_dict({**base, "repetition_guard": False})) == [1.0]
    finally:
        del training.REWARDS["toy_length"]
    with pytest.raises(ConfigError, match="unknown reward 'toy_length'"):
        validate(config_from_dict({**base, "rewards": ["toy_length"]}))


# ----------------------------------------------------------------------------------------- reverse KL
def test_reverse_kl_is_verifier_minus_policy_loglikelihood(tiny_llama, tiny_llama_verifier, smollm_tokenizer):
    policy = Verifier(tiny_llama, smollm_tokenizer, name="tiny policy")
    prompts = ["Name a colour.", "Say hello.", "What is rain?"]
    completions = ["Blue, like the sea.", "Hello there, friend.", ""]
    logged: dict[str, float] = {}
    rkl = ReverseKL(tiny_llama_verifier, policy, policy=tiny_llama)
    out = rkl(prompts=prompts, completions=completions, log_metric=logged.__setitem__)
    cme = CrossModelEntropy(tiny_llama_verifier)(prompts=prompts, completions=completions)
    own = SelfLikelihood(policy)(prompts=prompts, completions=completions)
    assert rkl.__name__ == "reverse_kl"
    for i in range(2):
        assert out[i] == pytest.approx(cme[i] - own[i], abs=1e-5)
        assert out[i] != pytest.approx(cme[i], abs=1e-3)  # the policy term is really there
    # An empty completion gets the verifier's floor, not floor - floor = 0 (which would beat real answers).
    assert out[2] == tiny_llama_verifier.empty_score
    assert logged["reverse_kl/verifier_logprob_mean"] == pytest.approx(sum(cme) / 3, abs=1e-5)
    with pytest.raises(SelfVerificationError, match="the policy model itself"):
        ReverseKL(tiny_llama_verifier, policy, policy=tiny_llama_verifier.model)


@pytest.mark.e2e
def test_reverse_kl_trains_the_policy(tmp_path, models):
    policy, verifier, prompts, _ = models
    cfg = config_from_dict(tiny_config(tmp_path, policy, verifier, prompts, max_steps=2, save_steps=2,
                                       rewards=["reverse_kl"]))
    result = training.train(cfg)
    assert result.global_step == 2
    assert changed(weights(policy), weights(result.final_dir))
    rows = metric_rows(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # no completion of a tiny random policy repeats a 4-gram: nothing floored here
        assert r["repetition_guard/floored_frac"] == 0.0
        assert r["rewards/reverse_kl/mean"] == pytest.approx(
            r["reverse_kl/verifier_logprob_mean"] - r["reverse_kl/policy_logprob_mean"], abs=1e-4)
    assert "reverse_kl" in (result.final_dir / training.RUN_CARD_NAME).read_text()


@pytest.mark.e2e
def test_guard_floors_the_combined_reward(tmp_path):
    """GRPO on cme - self_likelihood (reverse_kl logged with weight 0) with a guard that floors any completion
    repeating a token. A floored completion's combined reward must be the floor (-20), the lowest of its
    group; flooring each reward before weighting gave it -20 + 20 = 0, above every ordinary completion
    (about -0.1 to -2.5 here), so the guard rewarded the loops it was meant to punish."""
    policy, verifier, _, _ = preference_pair(tmp_path)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config_from_dict(tiny_config(
        tmp_path, policy, verifier, prompts, max_steps=2, save_steps=2, rewards=["cme", "self_likelihood", "reverse_kl"],
        reward_weights=[1.0, -1.0, 0.0], repetition_ngram=1, repetition_max_share=0.0, learning_rate=0.02))
    validate(cfg)
    assert training.grpo_args(cfg).reward_weights == [1.0, -1.0, 0.0, 1.0]
    result = training.train(cfg)
    assert result.global_step == 2
    assert changed(weights(policy), weights(result.final_dir))
    rows = metric_rows(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("rewards/reverse_kl/mean", "rewards/repetition_guard/mean", "repetition_guard/floored_frac"):
        assert all(r.get(key) is not None for r in rows), key

    table = pd.concat([pd.read_parquet(p) for p in sorted(Path(cfg.output_dir, "completions").glob("*.parquet"))])
    floored = table["repetition_guard"] == -20.0
    assert floored.any() and (~floored).any(), "the seeded run should floor some completions and not others"
    assert (table.loc[~floored, "repetition_guard"] == 0.0).all()
    for name in ("cme", "self_likelihood", "reverse_kl"):
        assert table.loc[floored, name].isna().all(), name  # the other rewards do not apply to them
        assert table.loc[~floored, name].notna().all(), name
    ok = table[~floored]
    assert (ok["reverse_kl"] - (ok["cme"] - ok["self_likelihood"])).abs().max() < 1e-4
    # The combined reward TRL sums (NaN = not applicable), and its group-normalised advantage as logged.
    combined = table["cme"].fillna(0) - table["self_likelihood"].fillna(0) + table["repetition_guard"]
    assert (combined[floored] == -20.0).all() and (combined[~floored] > -20.0).all()
    assert (-20.0 + 20.0 > combined[~floored]).all()  # what flooring each reward gave: above them all
    groups = [slice(i, i + cfg.num_generations) for i in range(0, len(table), cfg.num_generations)]
    for g in groups:
        r = combined.iloc[g].to_numpy()
        adv = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
        assert adv == pytest.approx(table["advantage"].iloc[g].to_numpy(), abs=1e-3)
        if floored.iloc[g].any() and not floored.iloc[g].all():
            assert table["advantage"].iloc[g][floored.iloc[g]].max() < table["advantage"].iloc[g][~floored.iloc[g]].min()


# ------------------------------------------------------------------------------------------------ DPO
@pytest.mark.e2e
def test_dpo_trains_on_preference_pairs(tmp_path, models):
    policy, verifier, _, pairs = models
    cfg = config_from_dict(tiny_config(tmp_path, policy, verifier, pairs, method="dpo", max_steps=2, save_steps=2,
                                       per_device_train_batch_size=2, max_completion_length=16, learning_rate=1e-2))
    validate(cfg)
    assert training.dpo_args(cfg).beta == 0.1 and training.dpo_args(cfg).max_length == 128 + 16
    result = training.train(cfg)
    assert result.global_step == 2
    assert changed(weights(policy), weights(result.final_dir))
    rows = metric_rows(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert isinstance(r.get(key), float), (key, r)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    assert training.latest_checkpoint(cfg.output_dir).name == "checkpoint-2"
    card = (result.final_dir / training.RUN_CARD_NAME).read_text()
    assert "# cmerl DPO run card" in card and "DPO (TRL DPOTrainer), beta 0.1" in card and "| 2 |" in card
    assert (result.final_dir / training.CURVE_NAME).is_file()
    # Resumable like a GRPO run: the saved config (method included) and the last complete checkpoint.
    at_2 = weights(result.final_dir)
    resumed = training.train(training.read_run_config(cfg.output_dir, ["max_steps=3"]), resume=True)
    assert resumed.global_step == 3 and [r["step"] for r in metric_rows(cfg.output_dir)] == [1, 2, 3]
    assert changed(at_2, weights(resumed.final_dir))


# -------------------------------------------------------------------------------------------- distill
@pytest.mark.e2e
def test_distill_generates_the_verifiers_answers_resumably_then_fine_tunes(tmp_path, models):
    policy, verifier, prompts, _ = models
    cfg = config_from_dict(tiny_config(tmp_path, policy, verifier, prompts, method="distill", max_steps=2,
                                       save_steps=2, per_device_train_batch_size=4, lora=True, lora_r=4,
                                       learning_rate=1e-2, distill_samples=2))
    validate(cfg)
    assert training.sft_args(cfg).completion_only_loss is True
    training.prepare_run_dir(cfg, resume=False)
    said: list[str] = []
    training.prepare_teacher_outputs(cfg, print_status=said.append)
    out = Path(cfg.output_dir) / training.TEACHER_OUTPUTS_NAME
    rows = json.loads(out.read_text())
    assert len(rows) == 12 * 2 and sorted(r["index"] for r in rows) == list(range(24))
    gen = rows[0]["generation"]
    assert (gen["generator"], gen["temperature"], gen["top_p"], gen["max_new_tokens"], gen["seed"]) == \
        (str(verifier), 0.7, 0.95, 8, 0)
    assert [r["instruction"] for r in rows[:4]] == [rows[0]["instruction"]] * 2 + [rows[2]["instruction"]] * 2
    side = json.loads((out.parent / (out.name + ".fingerprint.json")).read_text())  # what the teacher's weights are
    assert side["settings"]["model"]["weights"].startswith("files:")
    # Resumable: a complete file is reused without loading the verifier; other settings are refused.
    said.clear()
    training.prepare_teacher_outputs(cfg, print_status=said.append)
    assert said == [f"teacher answers: 24 already in {out}"] and json.loads(out.read_text()) == rows
    hotter = config_from_dict({**tiny_config(tmp_path, policy, verifier, prompts), "method": "distill",
                               "distill_samples": 2, "distill_temperature": 1.0})
    with pytest.raises(ConfigError, match="temperature"):
        training.prepare_teacher_outputs(hotter)

    tok = load_tokenizer(str(policy))
    _, dataset, counts = training.distill.teacher_dataset(cfg, tok)
    assert counts["answers"] == 24 and len(dataset) == 24
    first = dataset[0]
    assert first["prompt"][-1] == {"role": "user", "content": rows[0]["instruction"]}
    assert first["completion"][0]["role"] == "assistant"
    assert len(tok(first["completion"][0]["content"], add_special_tokens=False)["input_ids"]) <= 8

    result = training.train(cfg)  # teacher answers complete: straight to SFT
    assert result.global_step == 2
    assert changed(weights(policy), weights(result.final_dir))  # LoRA merged into the saved weights
    metrics = metric_rows(cfg.output_dir)
    assert [r["step"] for r in metrics] == [1, 2]
    assert all(isinstance(r.get("loss"), float) and isinstance(r.get("mean_token_accuracy"), float) for r in metrics)
    card = (result.final_dir / training.RUN_CARD_NAME).read_text()
    assert "distill (SFT on the verifier's answers)" in card and "the budget of a GRPO step" in card


# ------------------------------------------------------------------------------------ config and --check
def test_baseline_configs_are_checked_before_any_model_loads(tmp_path, models):
    policy, verifier, prompts, pairs = models
    base = tiny_config(tmp_path, policy, verifier, prompts)
    with pytest.raises(ConfigError, match="'dpo_beta': must be > 0"):
        validate(config_from_dict({**base, "method": "dpo", "dpo_beta": 0.0}))
    with pytest.raises(ConfigError, match="distill generates the verifier's answers in this process"):
        validate(config_from_dict({**base, "method": "distill", "verifiers": ["http://127.0.0.1:9/"]}))
    with pytest.raises(ConfigError, match="distill needs an independent verifier"):
        validate(config_from_dict({**base, "method": "distill", "verifiers": [str(policy)]}))
    with pytest.raises(ConfigError, match="reverse_kl needs an independent verifier"):
        validate(config_from_dict({**base, "rewards": ["reverse_kl"], "verifiers": [str(policy)]}))
    with pytest.raises(ConfigError, match="not a trl.SFTConfig field"):
        validate(config_from_dict({**base, "method": "distill", "trl": {"num_generations_eval": 2}}))
    # dpo reads no verifier: one that is the policy is no error there.
    validate(config_from_dict({**base, "method": "dpo", "prompts": str(pairs), "verifiers": [str(policy)]}))


def test_check_prints_each_baselines_plan_and_loads_nothing(tmp_path, models, monkeypatch):
    from typer.testing import CliRunner

    import cmerl.models
    from cmerl.cli import app

    calls = []
    monkeypatch.setattr(cmerl.models, "load_model", lambda *a, **k: calls.append(a))
    policy, verifier, prompts, pairs = models
    runner = CliRunner()
    path = write_config(tmp_path / "run.yaml", tiny_config(tmp_path, policy, verifier, prompts,
                                                           rewards=["reverse_kl"]))
    result = runner.invoke(app, ["train", "--config", str(path), "--check"])
    assert result.exit_code == 0, result.output
    assert f"1 x reverse_kl from {verifier} (float32" in result.output and "and the live policy" in result.output
    assert "guard      combined reward -20 when >0.5 of 4-grams repeat" in result.output
    result = runner.invoke(app, ["train", "--config", str(path), "--method", "dpo", "--set", f"prompts={pairs}",
                                 "--check"])
    assert result.exit_code == 0, result.output
    assert "DPO (TRL DPOTrainer), beta 0.1" in result.output and "8 x 1 accumulation x 1 process = 8 preference pairs" \
        in result.output
    result = runner.invoke(app, ["distill", "--config", str(path), "--check", "--processes", "2"])
    assert result.exit_code == 0, result.output
    assert f"answers of {verifier}" in result.output and "temperature 0.7, top_p 0.95, up to 8 tokens" in result.output
    assert "8 x 1 accumulation x 2 processes = 16 (prompt, verifier answer) sequences" in result.output
    assert "the budget of a GRPO step of this config (16 completions of <= 8 tokens)" in result.output
    result = runner.invoke(app, ["train", "--config", str(path), "--method", "ppo", "--check"])
    assert result.exit_code == 2 and "'method'" in result.output
    assert calls == [] and not Path(tmp_path / "run").exists()
