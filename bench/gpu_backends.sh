#!/usr/bin/env bash
# The backends on the GPU machine (issue 16): each stack on the card's model, tiny first (fast checks of
# the launch paths), then synthetic full size with a short step budget. Results under $OUT/backends.
# Usage on the device: bash bench/gpu_backends.sh   (after the wheel install line of ../shared/device/wheels.sh)
set -u
out=${OUT:-/tmp/out}/backends
mkdir -p "$out"
run() {  # name, seconds, args...
  local name=$1 limit=$2; shift 2
  local started=$(date +%s)
  timeout "$limit" python3 run_validation.py --device cuda --nproc-per-node 1 --wandb-mode disabled \
      --output-dir "$out/$name" --run-id run "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - started ))s" | tee -a "$out/index.txt"
  find "$out/$name" \( -name checkpoint -o -name instructlab -o -name trl \) -type d -prune -exec rm -rf {} + 2>/dev/null
}
run trl-tiny 150 --models gemma-3-4b-it,Llama-3.2-1B-Instruct --backend trl --weights tiny --max-samples 32
run ilab-tiny 200 --models gemma-3-4b-it --backend instructlab --weights tiny --max-samples 32 --max-steps 60
run trl-4b ${TRL_4B_S:-200} --models gemma-3-4b-it --backend trl --weights synthetic --max-steps ${STEPS:-40}
run ilab-4b ${ILAB_4B_S:-200} --models gemma-3-4b-it --backend instructlab --weights synthetic --max-steps ${STEPS:-40}
