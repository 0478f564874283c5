#!/usr/bin/env bash
# GRPO on verl (>= 0.8 config layout) with the CME reward served by `cmerl serve`.
#
#   examples/verl/run_grpo_cme.sh            # 1 node: GPUs 0-6 train, GPU 7 serves the verifier
#
# verl does not pass prompts to reward functions, so the dataset carries them in extra_info.prompt
# (examples/verl/make_dataset.py, or cmerl.integrations.verl.prepare_dataset for an existing file).
# verl calls compute_score once per response from its reward workers; the server merges those
# concurrent calls into batches. For a multi-node verifier, run `cmerl serve --ray --replicas N` instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
POLICY=${POLICY:-Qwen/Qwen2.5-1.5B-Instruct}
VERIFIER=${VERIFIER:-qwen2.5-coder-0.5b-instruct}   # any cmerl model name: alias, HF folder, hub id
DATA=${DATA:-runs/verl-data}
PORT=${PORT:-8000}
HOST_IP=${HOST_IP:-$(hostname -I | awk '{print $1}')}

[ -f "$DATA/train.parquet" ] || python examples/verl/make_dataset.py ultrafeedback "$DATA"

# The verifier on its own GPU, reachable from the Ray workers (bind to the node's address, require a key).
export CMERL_API_KEY=${CMERL_API_KEY:-$(python -c "import secrets; print(secrets.token_hex(16))")}
CUDA_VISIBLE_DEVICES=7 cmerl serve --verifier "$VERIFIER" --device cuda --host "$HOST_IP" --port "$PORT" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
until curl -sf "http://$HOST_IP:$PORT/health" >/dev/null; do sleep 2; done

CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6 python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/val.parquet" \
    data.prompt_key=prompt \
    data.train_batch_size=56 \
    data.max_prompt_length=512 \
    data.max_response_length=512 \
    data.filter_overlong_prompts=True \
    actor_rollout_ref.model.path="$POLICY" \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=56 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4 \
    reward.custom_reward_function.path=examples/verl/cme_reward.py \
    reward.custom_reward_function.name=compute_score_async \
    +reward.custom_reward_function.reward_kwargs.server_url="http://$HOST_IP:$PORT" \
    trainer.logger='["console"]' \
    trainer.project_name=cmerl \
    trainer.experiment_name=verl-grpo-cme \
    trainer.n_gpus_per_node=7 \
    trainer.nnodes=1 \
    trainer.save_freq=50 \
    trainer.test_freq=10 \
    trainer.total_epochs=1 \
    "$@"
