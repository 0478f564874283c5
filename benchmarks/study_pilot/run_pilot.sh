#!/bin/bash
# Study pilot (issue 14): 3 LoRA learning rates x 8 steps on row 2's setup (SmolLM2-135M-Instruct + CME from
# Qwen2.5-Coder-0.5B-Instruct, 1 prompt x 8 completions x <=64 tokens per step), then held-out evaluation.
cd /work/main
export OMP_NUM_THREADS=2
for lr in 8e-4 3.2e-3 2e-4; do
  if [ -d runs/study-pilot/lr$lr/final ]; then continue; fi
  if [ -f runs/study-pilot/lr$lr/cmerl_config.yaml ]; then
    .venv/bin/cmerl train --resume runs/study-pilot/lr$lr
  else
    .venv/bin/cmerl train --config runs/study-pilot/lr$lr.yaml
  fi
done
echo PILOT TRAINING DONE
