"""GRPO with CME where every training process shares one reward service.

Start the service once (on its own GPU, or CPU), then launch training with any number of processes; each
process sends its completions to the same server, which merges the concurrent requests into batches:

    cmerl serve --verifier qwen2.5-coder-0.5b-instruct --port 8000 &
    accelerate launch --multi_gpu --num_processes 8 \
        examples/trl_remote/train_grpo_remote.py --server-url http://127.0.0.1:8000 \
        --verifier-tokenizer qwen2.5-coder-0.5b-instruct --policy smollm2-135m-instruct

(on CPU, ``torchrun --nproc_per_node 2`` in place of ``accelerate launch``: accelerate's multi-CPU mode needs MPI).

``examples/trl_remote/launch.sh`` does both steps. With ``--verifier-tokenizer`` the pairs are rendered
and tokenized in the training process (the server only runs the model; works with ``vllm serve`` too);
without it the text is sent to the cmerl server, which renders it. The reward is
:class:`cmerl.integrations.trl.AsyncCrossModelEntropy`, so TRL overlaps it with other async rewards.
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from cmerl.data import read_prompts
from cmerl.integrations.trl import AsyncCrossModelEntropy
from cmerl.models import load_model
from cmerl.scoring.remote import RemoteVerifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server-url", required=True, help="cmerl serve (or vllm serve) base URL")
    ap.add_argument("--verifier-tokenizer", default=None, help="render locally with this tokenizer")
    ap.add_argument("--policy", default="smollm2-135m-instruct", help="policy model name or folder")
    ap.add_argument("--prompts", default="ultrafeedback", help="bundled prompt set or a JSONL file")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--per-device-batch", type=int, default=4)
    ap.add_argument("--max-completion-length", type=int, default=64)
    ap.add_argument("--learning-rate", type=float, default=1e-6)
    ap.add_argument("--output-dir", default="runs/trl-remote")
    args = ap.parse_args()

    policy, tokenizer = load_model(args.policy, dtype="float32")
    verifier = RemoteVerifier(args.server_url, args.verifier_tokenizer, timeout=300, max_retries=8)
    reward = AsyncCrossModelEntropy(verifier, policy=args.policy)  # refuses a verifier that is the policy
    prompts = read_prompts(args.prompts)[: args.n_prompts]
    config = GRPOConfig(output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=args.learning_rate,
                        num_generations=args.num_generations, per_device_train_batch_size=args.per_device_batch,
                        max_completion_length=args.max_completion_length, logging_steps=1, report_to=[],
                        save_strategy="no", bf16=False, disable_tqdm=True)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": prompts}))
    trainer.train()
    if trainer.is_world_process_zero():
        rewards = [h["rewards/cme/mean"] for h in trainer.state.log_history if "rewards/cme/mean" in h]
        print(f"trained {trainer.state.global_step} steps; rewards/cme/mean per step: "
              + ", ".join(f"{r:.3f}" for r in rewards))
    verifier.close()


if __name__ == "__main__":
    main()
