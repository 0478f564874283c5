"""A real TRL GRPOTrainer runs with CrossModelEntropy on tiny models, and the reward is what the verifier says."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from cmerl.rewards import CrossModelEntropy
from cmerl.testing import tiny_for_tokenizer

PROMPTS = ["What is 2+2?", "Name a colour.", "Say hi.", "Count to three."]


class SnapshotLogs(TrainerCallback):
    """Copies what GRPOTrainer recorded for the last generation batch (prompts, completions, rewards)."""

    def __init__(self) -> None:
        self.trainer: GRPOTrainer | None = None
        self.steps: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        logs = self.trainer._logs
        self.steps.append({"prompts": list(logs["prompt"]), "completions": list(logs["completion"]),
                           "rewards": {k: list(v) for k, v in logs["rewards"].items()}})


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_grpo_two_steps_reward_is_the_verifiers_score(tmp_path, smollm_tokenizer, tiny_qwen_verifier,
                                                      conversational):
    policy = tiny_for_tokenizer(smollm_tokenizer, arch="llama", seed=11)  # trained: built here, not shared
    before = [p.detach().clone() for p in policy.parameters()]
    cme = CrossModelEntropy(tiny_qwen_verifier, policy=policy)  # other arch, other tokenizer
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS] if conversational else PROMPTS
    snapshot = SnapshotLogs()
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                      save_strategy="no", learning_rate=1e-2, seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=policy, reward_funcs=[cme], args=args, processing_class=smollm_tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[snapshot])
    snapshot.trainer = trainer
    trainer.train()

    assert trainer.state.global_step == 2 and len(snapshot.steps) == 2
    step_logs = [h for h in trainer.state.log_history if "rewards/cme/mean" in h]
    assert len(step_logs) == 2
    for step, logged in zip(snapshot.steps, step_logs):
        assert len(step["completions"]) == 4
        if conversational:
            assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in step["completions"])
        scores = tiny_qwen_verifier.score(step["prompts"], step["completions"])
        expected = [s.mean_logprob for s in scores]
        assert step["rewards"]["cme"] == pytest.approx(expected, abs=1e-5)
        assert logged["rewards/cme/mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)
        assert logged["cme/response_tokens_mean"] == pytest.approx(sum(s.n_tokens for s in scores) / 4)
        assert logged["cme/truncated_frac"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters())), "the policy never moved"
