#!/usr/bin/env bash
# One reward service, N training processes: start `cmerl serve`, wait for /health, train, stop the server.
#
#   NPROC=2 examples/trl_remote/launch.sh [extra args for train_grpo_remote.py]
#
# With GPUs: `accelerate launch --multi_gpu --num_processes $NPROC` (give the server its own GPU:
# SERVER_DEVICE=cuda SERVER_GPU=7 and CUDA_VISIBLE_DEVICES for training). Without: torchrun starts NPROC
# CPU processes (gloo), since accelerate's CPU multi-process mode needs MPI. Every process is one client of
# the same server, which batches their concurrent requests.
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-2}
VERIFIER=${VERIFIER:-qwen2.5-coder-0.5b-instruct}
PORT=${PORT:-8000}
BIN=${BIN:-.venv/bin}
SERVER_DEVICE=${SERVER_DEVICE:-cpu}
CUDA_VISIBLE_DEVICES=${SERVER_GPU:-} "$BIN/cmerl" serve --verifier "$VERIFIER" --device "$SERVER_DEVICE" --port "$PORT" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  kill -0 $SERVER 2>/dev/null || { echo "cmerl serve exited" >&2; exit 1; }
  sleep 1
done
if "$BIN/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  LAUNCH=("$BIN/accelerate" launch --multi_gpu --num_processes "$NPROC")
else
  LAUNCH=("$BIN/torchrun" --nproc_per_node "$NPROC")
fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "${LAUNCH[@]}" examples/trl_remote/train_grpo_remote.py \
  --server-url "http://127.0.0.1:$PORT" --verifier-tokenizer "$VERIFIER" "$@"
