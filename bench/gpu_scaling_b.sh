#!/usr/bin/env bash
# One 4-GPU machine: the card command on all 4 GPUs, gemma-3-4b-it then gemma-3n-E4B-it (time-boxed).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} SFT_HARNESS_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1
mkdir -p results; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
python3 run_validation.py --models gemma-3-4b-it --weights synthetic --nproc-per-node 4 --run-id card-4b-4gpu --wandb-mode disabled \
  --timeout-per-model "${TIMEBOX_4B:-220}" > results/card-4b-4gpu.log 2>&1; echo "4b exit $?"
python3 run_validation.py --models gemma-3n-E4B-it --weights synthetic --nproc-per-node 4 --run-id card-3n-4gpu --wandb-mode disabled \
  --timeout-per-model "${TIMEBOX_3N:-320}" > results/card-3n-4gpu.log 2>&1; echo "3n exit $?"
tail -12 results/card-4b-4gpu.log results/card-3n-4gpu.log
tar czf "$OUT/runs.tgz" results/card-* 2>/dev/null
