#!/usr/bin/env bash
# Issue [K], session 12, second device call (one GPU, --weights synthetic), in ~580 s:
#  1. card-4b-layers: the card's gemma-3-4b-it to its verdict with --compile layers, rows filled to one
#     length (no second compilation at the epoch's short step) and the one-rank peak lr (1.5e-4);
#  2. compare: ours (--compile layers) against TRL's SFTTrainer, 30 steps, same settings (bench/compare.py);
#  3. 3n-base-8: gemma-3n-E4B-it with the defaults, 8 steps, profile of steps 4-5 (it crashed in the
#     generation check before the fix: an untrained model emitted an id its per-layer embedding lacks).
# A third call, ONLY=3n-layers-8 DEADLINE=300: gemma-3n-E4B-it with --compile layers (checkpoint inside
# each compiled layer), 8 steps; its metrics are kept even when the deadline ends the run.
# Usage on the device: bash bench/gpu_levers.sh   (ONLY=card-4b-layers,compare,3n-base-8 picks parts)
# Expects .whl (with trl) and .gpucache (see bench/gpu_matrix.sh).
set -u
began=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} SFT_HARNESS_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
parts=${ONLY:-card-4b-layers,compare,3n-base-8}
mkdir -p results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
left() { local cap=$1; local rest=$(( ${DEADLINE:-580} - ($(date +%s) - began) )); echo $(( rest < cap ? rest : cap )); }
wanted() { [[ ",$parts," == *",$1,"* ]]; }
if wanted card-4b-layers; then
  TORCH_LOGS=recompiles timeout "$(left 250)" python3 run_validation.py --weights synthetic --nproc-per-node 1 --wandb-mode disabled \
    --output-dir results --run-id card-4b-layers --models gemma-3-4b-it --compile layers > "$out/card-4b-layers.log" 2>&1
  echo "card-4b-layers rc=$? at $(( $(date +%s) - began ))s" | tee -a "$out/index.txt"
  cp results/card-4b-layers/*/result.json "$out/card-4b-layers.result.json" 2>/dev/null
  cp results/card-4b-layers/*/metrics.jsonl "$out/card-4b-layers.metrics.jsonl" 2>/dev/null
fi
if wanted compare; then
  timeout "$(left 260)" python3 bench/compare.py --model gemma-3-4b-it --max-steps 30 --ours-args "--compile layers" \
    --name gemma-3-4b-it-1gpu-vs-trl-layers-filled --out-dir "$out" > "$out/compare.log" 2>&1
  echo "compare rc=$? at $(( $(date +%s) - began ))s" | tee -a "$out/index.txt"
fi
if wanted 3n-base-8; then
  rm -rf results/matrix-3n-base-8
  SFT_HARNESS_PROFILE=4:2 timeout "$(left 200)" python3 bench/speed_matrix.py --plan bench/plans/diagnose.json --only 3n-base-8 \
    --out "$out/3n" > "$out/3n-base-8.log" 2>&1
  echo "3n-base-8 rc=$? at $(( $(date +%s) - began ))s" | tee -a "$out/index.txt"
  cp results/matrix-3n-base-8/*/train.log "$out/3n-base-8.train.log" 2>/dev/null
  cp results/matrix-3n-base-8/*/profile.txt "$out/3n-base-8.profile.txt" 2>/dev/null
fi
if wanted 3n-layers-8; then
  rm -rf results/matrix-3n-layers-8
  TORCH_LOGS=recompiles timeout "$(left 600)" python3 bench/speed_matrix.py --plan bench/plans/diagnose.json --only 3n-layers-8 \
    --out "$out/3n-layers" > "$out/3n-layers-8.log" 2>&1
  echo "3n-layers-8 rc=$? at $(( $(date +%s) - began ))s" | tee -a "$out/index.txt"
  cp results/matrix-3n-layers-8/*/metrics.jsonl "$out/3n-layers-8.metrics.jsonl" 2>/dev/null
  grep -v "^\[rank0\]:V" results/matrix-3n-layers-8.log | tail -20 > "$out/3n-layers-8.tail.txt" 2>/dev/null
  cp results/matrix-3n-layers-8/*/train.log "$out/3n-layers-8.train.log" 2>/dev/null
fi
