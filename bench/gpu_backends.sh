#!/usr/bin/env bash
# The backends on the GPU machine (issue 16): each stack on the card's model, tiny first (fast checks of
# the launch paths), then synthetic full size with a short step budget. Results under $OUT/backends.
# Usage on the device: bash bench/gpu_backends.sh   (after the wheel install line of ../shared/device/wheels.sh)
# EXTRA="--max-tokens-per-gpu 4096" adds CLI options to every selected run (the script takes no arguments).
set -u
out=${OUT:-/tmp/out}/backends
mkdir -p "$out"
run() {  # name, seconds, args...   ONLY=name1,name2 runs just those
  local name=$1 limit=$2; shift 2
  [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$name,"* ]] || return 0
  local started=$(date +%s)
  # the harness's own job timeout ends every rank; `timeout` (later) only guards the CLI itself
  timeout $(( limit + ${CLI_SLACK:-60} )) python3 run_validation.py --device cuda --nproc-per-node 1 --wandb-mode disabled \
      --timeout-per-model "$limit" \
      --output-dir "$out/$name" --run-id run "$@" ${EXTRA:-} > "$out/$name.log" 2>&1 &
  local cli=$!
  while kill -0 $cli 2>/dev/null; do  # where the time goes: the job log's last line and GPU memory, every 10 s
    echo "$(( $(date +%s) - started ))s gpu $(nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null) |" \
      "$(tail -qn1 "$out/$name"/run/*/train.log 2>/dev/null | cut -c1-300)" >> "$out/$name.watch"
    sleep 10
  done
  wait $cli
  echo "$name rc=$? $(( $(date +%s) - started ))s" | tee -a "$out/index.txt"
  for r in "$out/$name"/run/*/result.json; do [ -f "$r" ] && cp "$r" "$out/$name.$(basename "$(dirname "$r")").result.json"; done
  # the job's own log (the stack's output, timestamped per line by the harness) and the stack's step metrics
  for f in "$out/$name"/run/*/train.log "$out/$name"/run/*/metrics.jsonl; do
    [ -f "$f" ] && tail -c 400000 "$f" > "$out/$name.$(basename "$(dirname "$f")").$(basename "$f")"; done
  rm -rf "$out/$name"  # the run folders are too deep to come back; result.json and the log do
}
run ilab-tiny 150 --models gemma-3-4b-it --backend instructlab --weights tiny --max-samples 32 --max-steps 60
run trl-tiny-gemma 150 --models gemma-3-4b-it --backend trl --weights tiny --max-samples 32
run trl-tiny 250 --models Llama-3.2-1B-Instruct --backend trl --weights tiny --max-samples 32
run trl-4b ${TRL_4B_S:-200} --models gemma-3-4b-it --backend trl --weights synthetic --max-steps ${STEPS:-40}
run ilab-4b ${ILAB_4B_S:-300} --models gemma-3-4b-it --backend instructlab --weights synthetic --max-steps ${STEPS:-40}
run trl-3n ${TRL_3N_S:-200} --models gemma-3n-E4B-it --backend trl --weights synthetic --max-steps ${STEPS:-40}
run ilab-3n ${ILAB_3N_S:-300} --models gemma-3n-E4B-it --backend instructlab --weights synthetic --max-steps ${STEPS:-40}
