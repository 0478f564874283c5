#!/bin/bash
# Issue 14 chain (one job at a time): finish the learning-rate pilot, evaluate it on held-out UltraFeedback
# prompts, choose the learning rate by the rule fixed in benchmarks/study_pilot.py, then run row 2 from the
# chosen pilot run's step-8 checkpoint (the pilot run IS row 2's first 8 steps: same settings, constant lr).
# Rerun this script to continue after a kill: every step resumes.
cd /work/main
export OMP_NUM_THREADS=2
while [ -f runs/study-pilot/pilot.pid ] && kill -0 "$(cat runs/study-pilot/pilot.pid)" 2>/dev/null; do sleep 30; done
runs/study-pilot/run_pilot.sh || exit 1
.venv/bin/python benchmarks/study_pilot.py runs/study-pilot/lr2e-4 runs/study-pilot/lr8e-4 runs/study-pilot/lr3.2e-3 \
    --n 16 --output benchmarks/results/study/pilot/pilot.json || exit 1
RUN=$(python3 -c "import json;print(json.load(open('benchmarks/results/study/pilot/pilot.json'))['chosen_run'])")
LR=$(python3 -c "import json;print(json.load(open('benchmarks/results/study/pilot/pilot.json'))['chosen_learning_rate'])")
for r in row1-gemma3-cme row3-smollm2-self-certainty row7-smollm2-random-verifier; do  # they reuse row 2's choice
  [ -d runs/study/$r ] || sed -i "s/^  learning_rate: .*/  learning_rate: $LR/" configs/study/$r.yaml
done
ROWDIR=runs/study/row2-smollm2-cme
if [ ! -d $ROWDIR/train ]; then
  sed -i "s/^  learning_rate: .*/  learning_rate: $LR/" configs/study/row2-smollm2-cme.yaml
  mkdir -p $ROWDIR benchmarks/results/study/row2-smollm2-cme
  cp -r runs/study-pilot/$RUN $ROWDIR/train && rm -rf $ROWDIR/train/final
  # the pilot segment's wall time, for the row's training wall-time total
  .venv/bin/python - "$ROWDIR/train" <<'PY'
import json, os, sys, time
from cmerl.io import append_jsonl, iter_jsonl
d = sys.argv[1]
times = [r["time"] for r in iter_jsonl(os.path.join(d, "metrics.jsonl"))]
t0 = os.path.getmtime(os.path.join(d, "runs")) if os.path.isdir(os.path.join(d, "runs")) else min(times)
append_jsonl("benchmarks/results/study/row2-smollm2-cme/study_log.jsonl", [
    {"time": t0, "phase": "train", "event": "start", "note": "pilot run copied as the row's first steps"},
    {"time": max(times), "phase": "train", "event": "end", "done": False, "seconds": max(times) - t0}])
PY
fi
.venv/bin/cmerl study run row2-smollm2-cme
