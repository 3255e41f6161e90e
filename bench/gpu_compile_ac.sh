#!/usr/bin/env bash
# Issue [K], session 11, one device call: gemma-3n-E4B-it for 20 steps with --compile layers under
# activation checkpointing (the checkpoint inside each compiled layer), then gemma-3-4b-it against TRL's
# SFTTrainer side by side (bench/compare.py, ours with --compile layers, 30 steps).
# Usage on the device: bash bench/gpu_compile_ac.sh   (ONLY="3n-layers-ac,compare" picks parts)
# Expects .whl (with trl: ../shared/device/wheels.sh trl==1.16.0) and .gpucache (see bench/gpu_matrix.sh).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} SFT_HARNESS_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
mkdir -p results
parts=${ONLY:-3n-layers-ac,compare}
if [[ ",$parts," == *",3n-layers-ac,"* ]]; then
  TORCH_LOGS=recompiles timeout 300 python3 bench/speed_matrix.py --plan bench/plans/compile-ac.json --only 3n-layers-ac --out "$out"
  python3 bench/speed_matrix.py --table "$out/speed_matrix.json" 2>/dev/null
fi
if [[ ",$parts," == *",compare,"* ]]; then
  timeout 330 python3 bench/compare.py --model gemma-3-4b-it --max-steps 30 --ours-args "--compile layers" \
    --name gemma-3-4b-it-1gpu-vs-trl-layers --out-dir "$out"
fi
tar czf "$out/logs.tgz" results/*/*/train.log results/*/*/metrics.jsonl results/matrix-*.log 2>/dev/null
