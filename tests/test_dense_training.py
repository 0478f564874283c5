"""Dense (token-level) CME: advantage estimators, DenseGRPOTrainer on a real TRL GRPOTrainer, remote scorers.

Tiny random models with real tokenizers (cmerl.testing): a llama policy with the SmolLM2 tokenizer and a qwen2
verifier with the Qwen2.5 tokenizer (cross-tokenizer alignment), or a llama verifier with the policy's own
tokenizer (identity).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _training_helpers import (
    POLICY_TOKENIZER,
    VERIFIER_TOKENIZER,
    tiny_config,
    tiny_random_folder,
    write_prompts,
)

from cmerl import training
from cmerl.io import iter_jsonl
from cmerl.rewards import CrossModelEntropy
from cmerl.scoring import Verifier
from cmerl.testing import tiny_for_tokenizer
from cmerl.token_rewards import TokenRewards
from cmerl.training.advantages import (
    combined_advantages,
    dense_advantages,
    position_normalized,
    reward_to_go,
    scalar_advantages,
)
from cmerl.training.dense import DenseGRPOTrainer

pytest_plugins = ["_server_fixtures"]  # tiny_server (a cmerl serve of a tiny SmolLM2-tokenizer verifier)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["Name a colour.", "Say something about cats.", "What is rain?", "Describe the sea."]


# ------------------------------------------------------------------------------------ estimators
def test_position_normalisation_by_hand():
    values = torch.tensor([[1.0, 2.0, 5.0], [3.0, 4.0, 0.0], [5.0, 9.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    centred = position_normalized(values, mask, 4, scale=False)
    # position 0: mean of 1, 3, 5 = 3; position 1: mean of 2, 4 = 3; position 2: one token, no baseline
    assert centred.tolist() == [[-2.0, -1.0, 0.0], [0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    scaled = position_normalized(values, mask, 4, scale=True)
    assert scaled[:, 0].tolist() == pytest.approx([-2 / (2 + 1e-4), 0.0, 2 / (2 + 1e-4), 0.0])
    assert scaled[:2, 1].tolist() == pytest.approx([-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)])
    assert reward_to_go(values, mask).tolist() == [[8.0, 7.0, 5.0], [7.0, 4.0, 0.0], [5.0, 0.0, 0.0], [0.0] * 3]


def test_constant_token_rewards_give_the_scalar_advantage():
    """position_std of r_it = R_i (all tokens present) and return_to_go at t = 0 are TRL's GRPO advantage."""
    g, t = 4, 6
    rewards = torch.tensor([-3.0, -1.5, -2.25, -0.5, -7.0, -7.5, -6.0, -9.0])
    lengths = torch.tensor([6, 3, 5, 6, 1, 6, 4, 2])
    present = torch.arange(t)[None, :] < lengths[:, None]
    want = scalar_advantages(rewards, g)
    full = torch.ones(8, t, dtype=torch.bool)
    constant = rewards[:, None].expand(8, t).contiguous()
    got = dense_advantages("position_std", values=constant, shares=constant, covered=full, present=full,
                           group_size=g)
    torch.testing.assert_close(got, want[:, None].expand(8, t), rtol=1e-6, atol=1e-6)
    shares = torch.where(present, rewards[:, None] / lengths[:, None], torch.zeros(8, t))
    rtg = dense_advantages("return_to_go", values=shares, shares=shares, covered=present, present=present,
                           group_size=g)
    torch.testing.assert_close(rtg[:, 0], want, rtol=1e-5, atol=1e-5)
    nan_row = rewards.clone()
    nan_row[0] = torch.nan  # a reward that does not apply: out of the baseline, advantage 0
    assert scalar_advantages(nan_row, g)[0] == 0.0
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        dense_advantages("nope", values=constant, shares=constant, covered=full, present=full, group_size=g)


def test_combined_advantages_with_a_guard_and_a_scalar_reward():
    """A degenerate completion (the dense reward returned None, the guard floored it) gets no dense advantage
    and the guard's negative one; the scalar rewards' group advantage is added to every token."""
    g, t = 4, 3
    values = torch.tensor([[-1.0, -2.0, -3.0], [-2.0, -2.0, -2.0], [-3.0, -1.0, 0.0], [-9.0, -9.0, -9.0]])
    present = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    values = values * present
    guard = torch.tensor([0.0, 0.0, 0.0, -20.0])
    cme = torch.tensor([-2.0, -2.0, -2.0, torch.nan])
    rewards_per_func = torch.stack([cme, guard], dim=1)
    tokens = {0: (values, values / 3, present)}
    got = combined_advantages("position_mean", token_rewards=tokens, present=present,
                              rewards_per_func=rewards_per_func, weights=torch.tensor([1.0, 1.0]), group_size=g)
    rest = scalar_advantages(guard, g)
    assert rest[3] < 0 and torch.equal(got[3], rest[3].expand(t))  # no dense part for the floored row
    # position 0: mean of -1, -2, -3 over the three rows where cme applies = -2
    torch.testing.assert_close(got[:3, 0], torch.tensor([1.0, 0.0, -1.0]) + rest[:3])
    torch.testing.assert_close(got[2, 2], rest[2])  # no token there: the scalar part only (masked in the loss)
    only_dense = combined_advantages("position_mean", token_rewards=tokens, present=present,
                                     rewards_per_func=rewards_per_func[:, :1], weights=torch.tensor([1.0]),
                                     group_size=g)
    assert torch.equal(only_dense[3], torch.zeros(t))


# ------------------------------------------------------------------------------------ trainers
@pytest.fixture(scope="module")
def policy_parts(tmp_path_factory):
    """The policy tokenizer and a maker of fresh copies of one tiny policy, loaded from an HF folder (TRL
    builds its KL reference model from that folder when beta > 0)."""
    from transformers import AutoModelForCausalLM

    from cmerl.models import load_tokenizer

    tok = load_tokenizer(POLICY_TOKENIZER)
    folder = tiny_random_folder(tmp_path_factory.mktemp("dense-policy") / "policy", POLICY_TOKENIZER,
                                arch="llama", seed=0)
    return tok, lambda: AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


@pytest.fixture(scope="module")
def cross_verifier():
    from cmerl.models import load_tokenizer

    tok = load_tokenizer(VERIFIER_TOKENIZER)
    return Verifier(tiny_for_tokenizer(tok, arch="qwen2", seed=1), tok, name="tiny-qwen-verifier")


def grpo_args(tmp_path: Path, **overrides):
    from trl import GRPOConfig

    kwargs = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "num_generations": 4,
              "max_completion_length": 8, "max_steps": 2, "learning_rate": 1e-3, "report_to": [], "use_cpu": True,
              "logging_steps": 1, "save_strategy": "no", "seed": 0, "mask_truncated_completions": False,
              "lr_scheduler_type": "constant", "disable_tqdm": True}
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS})


def train(trainer_cls, policy_parts, rewards, args, **kwargs):
    tok, make = policy_parts
    model = make()
    trainer = trainer_cls(model=model, reward_funcs=rewards, args=args, train_dataset=dataset(),
                          processing_class=tok, **kwargs)
    trainer.train()
    return trainer


def params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.e2e
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_scalar_estimator_is_trl_exactly(tmp_path, policy_parts, cross_verifier, loss_type):
    """advantage_estimator scalar: the same weights as the stock GRPOTrainer after 2 steps with KL (beta > 0)."""
    from trl import GRPOTrainer

    tok = policy_parts[0]
    args = grpo_args(tmp_path, loss_type=loss_type, beta=0.1)
    stock = train(GRPOTrainer, policy_parts, [CrossModelEntropy(cross_verifier)], args)
    dense = train(DenseGRPOTrainer, policy_parts, [CrossModelEntropy(cross_verifier, dense=True, policy_tokenizer=tok)],
                  args, advantage_estimator="scalar")
    a, b = params(stock), params(dense)
    assert all(torch.equal(a[k], b[k]) for k in a)
    initial = policy_parts[1]().state_dict()
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # and they trained
    logged = [r for r in dense.state.log_history if "dense/alignment_misses" in r]
    assert len(logged) == 2 and all(r["dense/alignment_misses"] == 0 for r in logged)


class ConstantTokenReward:
    """A dense reward whose per-token rewards all equal the completion's scalar reward (a made-up score of
    its ids), so per-position normalisation must reproduce the scalar GRPO advantage."""

    __name__ = "constant"

    def __init__(self, tokenizer):
        self.dense_tokenizer = tokenizer
        self.last_token_rewards = None

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        rewards = [float(sum(ids) % 997) / 100.0 for ids in completion_ids]
        n = [len(ids) for ids in completion_ids]
        self.last_token_rewards = TokenRewards(
            completion_ids=[list(ids) for ids in completion_ids], values=[[r] * k for r, k in zip(rewards, n)],
            shares=[[r / k] * k for r, k in zip(rewards, n)], covered=[[True] * k for k in n])
        return rewards


@pytest.mark.e2e
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_dense_loss_with_constant_token_rewards_is_the_scalar_loss(tmp_path, policy_parts, loss_type):
    """The dense path (position_std, (B, T) advantages through TRL's loss) with constant per-token rewards and
    equal lengths trains to the same weights as the scalar path, with KL and gradient accumulation.

    Plain SGD, not Adam: the two paths' advantages differ by float rounding (~1e-8), and Adam's first step
    moves every weight by ~lr * sign(grad), so a gradient entry that is rounding noise around zero flips a
    weight by 2 * lr (seen on lm_head: 253 of 1.5M entries off by 3e-5). Under SGD a weight moves by
    lr * grad, so the comparison is as tight as the gradients are."""
    tok = policy_parts[0]
    args = grpo_args(tmp_path, loss_type=loss_type, beta=0.05, gradient_accumulation_steps=2, optim="sgd",
                     learning_rate=0.1, generation_kwargs={"min_new_tokens": 8})  # no EOS: every completion is 8 tokens
    scalar = train(DenseGRPOTrainer, policy_parts, [ConstantTokenReward(tok)], args, advantage_estimator="scalar")
    dense = train(DenseGRPOTrainer, policy_parts, [ConstantTokenReward(tok)], args,
                  advantage_estimator="position_std")
    a, b = params(scalar), params(dense)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    initial = policy_parts[1]().state_dict()
    assert max((a[k] - initial[k]).abs().max().item() for k in a) > 1e-4  # SGD at this lr moved the weights
    losses = [[r["loss"] for r in t.state.log_history if "loss" in r] for t in (scalar, dense)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_trl_loss_takes_per_token_advantages_as_the_broadcast_scalar(tmp_path, policy_parts, cross_verifier):
    """TRL's own _compute_loss with (B, T) advantages equal to the (B,) ones broadcast: the identical loss."""
    tok = policy_parts[0]
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        trainer = DenseGRPOTrainer(model=policy_parts[1](), args=grpo_args(tmp_path, loss_type=loss_type, beta=0.1),
                                   reward_funcs=[CrossModelEntropy(cross_verifier, dense=True, policy_tokenizer=tok)],
                                   train_dataset=dataset(), processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by transformers' training loop otherwise
        inputs = trainer._prepare_inputs(batch)
        per_token = {**inputs, "advantages": inputs["advantages"][:, None].expand_as(inputs["completion_mask"])}
        with torch.no_grad():
            assert torch.equal(trainer.compute_loss(trainer.model, inputs), trainer.compute_loss(trainer.model, per_token))


@pytest.mark.e2e
@pytest.mark.parametrize(("estimator", "loss_type", "lora", "accumulation"), [
    ("position_std", "dapo", False, 1),
    ("position_mean", "grpo", True, 2),
    ("return_to_go", "dr_grpo", False, 2),
])
def test_dense_cme_trains_across_tokenizers(tmp_path, policy_parts, cross_verifier, estimator, loss_type, lora,
                                            accumulation):
    """Real dense CME (qwen2 verifier, SmolLM2 policy): per-token advantages vary within completions, no
    alignment miss, with LoRA, KL, gradient accumulation and each loss type."""
    tok = policy_parts[0]
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    args = grpo_args(tmp_path, loss_type=loss_type, beta=0.05, gradient_accumulation_steps=accumulation)
    reward = CrossModelEntropy(cross_verifier, dense=True, policy_tokenizer=tok)
    trainer = train(DenseGRPOTrainer, policy_parts, [reward], args, advantage_estimator=estimator,
                    peft_config=peft_config)
    logged = [r for r in trainer.state.log_history if "dense/alignment_misses" in r]
    assert len(logged) == 2
    for r in logged:
        assert r["dense/alignment_misses"] == 0 and r["cme/alignment_misses"] == 0
        assert r["dense/nonzero_frac"] > 0.5 and r["dense/advantage_abs_mean"] > 0.1
    adv = torch.cat([b["advantages"] for b in trainer._buffered_inputs])
    assert adv.dim() == 2 and adv.shape[1] == 8
    assert (adv.std(dim=1) > 1e-3).float().mean() > 0.5  # the advantage changes along most completions


@pytest.mark.e2e
def test_dense_config_run_resumes(tmp_path):
    """`dense: true` through the config and cmerl's own run: metrics.jsonl has the dense figures; resume
    continues; an estimator without dense is refused."""
    root = tmp_path / "models"
    policy = tiny_random_folder(root / "policy", POLICY_TOKENIZER, arch="llama", seed=0)
    verifier = tiny_random_folder(root / "verifier", VERIFIER_TOKENIZER, arch="qwen2", seed=1)
    prompts = write_prompts(root / "prompts.jsonl")
    cfg = training.config_from_dict(tiny_config(tmp_path, policy, verifier, prompts, max_steps=1, save_steps=1,
                                                dense=True, advantage_estimator="return_to_go", beta=0.05))
    training.validate(cfg)
    training.train(cfg)
    result = training.train(training.read_run_config(cfg.output_dir, ["max_steps=2"]), resume=True)
    assert result.global_step == 2
    rows = list(iter_jsonl(Path(cfg.output_dir) / training.METRICS_NAME))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["dense/alignment_misses"] == 0 and r["dense/advantage_abs_mean"] > 0 for r in rows)
    with pytest.raises(training.ConfigError, match="advantage_estimator"):
        training.validate(training.apply_overrides(cfg, ["dense=false"]))
    with pytest.raises(training.ConfigError, match="'dense'"):
        training.validate(training.apply_overrides(cfg, ["rewards=[self_likelihood]"]))


# ------------------------------------------------------------------------------------ remote scorers
@pytest.mark.e2e
@pytest.mark.parametrize(("protocol", "with_tokenizer"), [("cmerl", True), ("cmerl", False), ("openai", True)])
def test_remote_dense_rewards_equal_local(tiny_server, tiny_local, protocol, with_tokenizer):
    """Dense CME through `cmerl serve` (/score with token ids, /score with text, vLLM prompt_logprobs) gives
    the local per-token rewards; with the policy's own tokenizer the alignment is the identity."""
    from cmerl.scoring.remote import RemoteVerifier

    tok = tiny_local.tokenizer
    completions = ["Blue, mostly — like the sea.", "  Cats nap\n\na lot. 猫", "🙂"]
    ids = [list(tok(c, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id] for c in completions]
    prompts = PROMPTS[:3]
    local = CrossModelEntropy(tiny_local, dense=True, policy_tokenizer=tok)
    local(prompts=prompts, completions=completions, completion_ids=ids)
    want = local.last_token_rewards
    with RemoteVerifier(tiny_server.url, tok if with_tokenizer else None, protocol=protocol) as rv:
        remote = CrossModelEntropy(rv, dense=True, policy_tokenizer=tok)
        remote(prompts=prompts, completions=completions, completion_ids=ids)
    got = remote.last_token_rewards
    assert got.misses == 0 and got.verifier_tokens == want.verifier_tokens
    for a, b in zip(got.values, want.values):
        assert sum(a) == pytest.approx(sum(b), abs=1e-4)  # conservation: the verifier's sum log-prob
    if with_tokenizer:
        assert got.covered == want.covered
        for a, b in zip(got.values, want.values):
            assert a == pytest.approx(b, abs=1e-4)
        assert got.identity_tokens == want.identity_tokens >= got.verifier_tokens - 2  # all but a merged boundary
    else:  # no tokenizer here: aligned by the server's offsets alone (byte pieces of 猫 share one value)
        assert got.identity_tokens == 0
