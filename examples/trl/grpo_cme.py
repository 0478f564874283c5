"""CME as a plain TRL reward function: TRL's own GRPOTrainer, no cmerl recipe.

Everything here is stock TRL except the reward function, a ``cmerl.rewards.CrossModelEntropy`` around a
frozen verifier of another model family. Runs offline on CPU with the packaged models (a few minutes for
the default 4 steps); any HF folder or hub id works for --policy / --verifier.

    python examples/trl/grpo_cme.py --steps 4 --output-dir runs/trl-cme
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from cmerl.data import read_prompts
from cmerl.models import load_model
from cmerl.rewards import CrossModelEntropy
from cmerl.scoring import Verifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default="smollm2-135m-instruct")
    ap.add_argument("--verifier", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-completion-length", type=int, default=48)
    ap.add_argument("--output-dir", default="runs/trl-cme")
    args = ap.parse_args()

    policy, tokenizer = load_model(args.policy)  # float32: trained
    verifier = Verifier.from_pretrained(args.verifier)  # frozen; dtype auto: bf16 only where native
    cme = CrossModelEntropy(verifier, policy=policy)  # refuses a verifier that is the policy itself

    # Short bundled UltraFeedback prompts, in TRL's conversational format.
    prompts = [p for p in read_prompts("ultrafeedback") if len(p) < 200][:64]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])

    config = GRPOConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=args.max_completion_length, learning_rate=1e-5, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False,
    )
    trainer = GRPOTrainer(model=policy, processing_class=tokenizer, reward_funcs=[cme], args=config,
                          train_dataset=dataset)
    trainer.train()
    for row in trainer.state.log_history:
        if "rewards/cme/mean" in row:
            print(f"step {row['step']}: mean CME {row['rewards/cme/mean']:.3f}, "
                  f"completion length {row['completions/mean_length']:.0f}")


if __name__ == "__main__":
    main()
