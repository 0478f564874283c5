#!/usr/bin/env bash
# GRPO on OpenRLHF (>= 0.10.2 dotted flags) with the CME reward served by `cmerl serve` at /get_reward.
#
#   examples/openrlhf/train_grpo_cme.sh
#
# OpenRLHF posts {"query", "prompts", "labels"} to --reward.remote_url; query = prompt + response as the
# actor decoded them (its chat template and EOS included). The service strips the prompt prefix and the
# EOS strings, renders (raw prompt, response) with the verifier's own template (--prompt-mode label: the
# raw prompt travels as the label) and answers {"rewards", "scores", "extra_logs"}.
# Alternative without HTTP: --reward.remote_url examples/openrlhf/reward_func.py (the verifier then loads
# inside each vLLM engine actor, or CMERL_SERVER_URL points that file at a server).
set -euo pipefail
cd "$(dirname "$0")/../.."
POLICY=${POLICY:-Qwen/Qwen2.5-1.5B-Instruct}
VERIFIER=${VERIFIER:-qwen2.5-coder-0.5b-instruct}
DATA=${DATA:-runs/openrlhf-data/prompts.jsonl}
PORT=${PORT:-5000}
HOST_IP=${HOST_IP:-$(hostname -I | awk '{print $1}')}

[ -f "$DATA" ] || python examples/openrlhf/make_dataset.py ultrafeedback "$DATA"

CUDA_VISIBLE_DEVICES=7 cmerl serve --verifier "$VERIFIER" --device cuda --host "$HOST_IP" --port "$PORT" \
    --prompt-mode label &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
until curl -sf "http://$HOST_IP:$PORT/health" >/dev/null; do sleep 2; done

ray start --head --node-ip-address 0.0.0.0 --num-gpus 7
ray job submit --address="http://127.0.0.1:8265" \
    --runtime-env-json="{\"working_dir\": \"$(pwd)\", \"env_vars\": {\"CUDA_VISIBLE_DEVICES\": \"0,1,2,3,4,5,6\"}}" \
    -- python3 -m openrlhf.cli.train_ppo_ray \
    --actor.model_name_or_path "$POLICY" \
    --actor.num_nodes 1 --actor.num_gpus_per_node 4 \
    --ref.num_nodes 1 --ref.num_gpus_per_node 1 \
    --vllm.num_engines 2 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.6 \
    --reward.remote_url "http://$HOST_IP:$PORT/get_reward" \
    --data.prompt_dataset "$DATA" --data.input_key prompt --data.label_key label --data.apply_chat_template \
    --data.max_len 1024 --rollout.max_new_tokens 512 \
    --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 8 \
    --algo.kl.init_coef 0.0 \
    --rollout.batch_size 64 --rollout.micro_batch_size 8 \
    --train.batch_size 64 --train.micro_batch_size 2 --train.max_epochs 1 --train.num_episodes 1 \
    --actor.adam.lr 1e-6 --ds.zero_stage 2 --ds.param_dtype bf16 \
    --ckpt.output_dir runs/openrlhf-grpo-cme \
    "$@"
