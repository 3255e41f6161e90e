#!/usr/bin/env bash
# Two-GPU machine, gemma-3n-E4B-it to target with the defaults (session 3):
#   one: GPU 0 gemma-3n on 1 GPU | GPU 1 gemma-3-4b-it on 1 GPU with an injected out-of-memory at
#        step 3 (auto leaves checkpointing off there), so the retry-with-checkpointing path runs on a GPU
#   two: gemma-3n on both GPUs
#   three: gemma-3n on 1 GPU twice, side by side: defaults + --compile | defaults but lr 1.5e-4
# Session 4, a run longer than one 10-minute device call (the tool lets a setsid process outlive its
# call while the machine stays warm, 30 s between calls; a late second call finds a fresh machine and
# the run is lost, as it was in session 4):
#   start: gemma-3n on 1 GPU with the defaults, detached; the call then watches it for WAIT seconds
#   finish: the next call (within 30 s) waits for that run to end and brings its files back
# Expects .whl (../shared/device/wheels.sh) and .gpucache (the converted Gemma tokenizer: carry both).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} SFT_HARNESS_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1
mkdir -p results; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
card() { CUDA_VISIBLE_DEVICES=$1 python3 run_validation.py --models "$2" --weights synthetic --nproc-per-node "$3" --run-id "$4" --wandb-mode disabled "${@:5}" > "results/$4.log" 2>&1; echo "$4 exit $?"; }
budget=${TIMEBOX:-540}
full=card-3n-1gpu-full  # the detached run of start/finish
# Progress of the detached run: its console lines every 60 s until it ends or $1 seconds pass.
watch_until() {
  local end=$((SECONDS + $1))
  while [ ! -e results/$full.done ] && [ $SECONDS -lt $end ]; do
    sleep $(( end - SECONDS < 60 ? end - SECONDS : 60 )); tail -n 1 results/$full.log 2>/dev/null; echo; done
  [ -e results/$full.done ] && echo "run ended" || echo "still running"
}
case "$1" in
  one) card 0 gemma-3n-E4B-it 1 card-3n-1gpu --timeout-per-model "$budget" &
       SFT_HARNESS_INJECT_FAULT=oom@3 card 1 gemma-3-4b-it 1 card-4b-1gpu-oom --timeout-per-model 300 &
       wait; runs="card-3n-1gpu card-4b-1gpu-oom" ;;
  three) card 0 gemma-3n-E4B-it 1 card-3n-1gpu-compile --timeout-per-model "$budget" --compile &
       card 1 gemma-3n-E4B-it 1 card-3n-1gpu-lr1.5e-4 --timeout-per-model "$budget" --lr 1.5e-4 &
       wait; runs="card-3n-1gpu-compile card-3n-1gpu-lr1.5e-4" ;;
  detached) card 0 gemma-3n-E4B-it 1 "$full" --timeout-per-model 1100; touch results/$full.done; exit ;;
  start) rm -f results/$full.done
       setsid bash "$0" detached < /dev/null > /dev/null 2>&1 &
       watch_until "${WAIT:-560}"; exit ;;
  finish) [ -e results/$full.log ] || { echo "no detached run on this machine (a fresh one?)"; exit 1; }
       watch_until "${WAIT:-585}"; runs=$full ;;
  two) card 0,1 gemma-3n-E4B-it 2 card-3n-2gpu --timeout-per-model "$budget"; runs="card-3n-2gpu" ;;
esac
for r in $runs; do python3 bench/run_digest.py "results/$r"; grep -E "^\[setup\]|out of memory|retry" "results/$r.log" | head -5; done
for r in $runs; do cp "results/$r/summary.json" "$OUT/$r-summary.json" 2>/dev/null; done
tar czf "$OUT/runs.tgz" results/card-* 2>/dev/null
