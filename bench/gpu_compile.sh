#!/usr/bin/env bash
# Issue [K], torch.compile on one GPU: the card's gemma-3-4b-it to its verdict with --compile (pointwise)
# and with --compile layers, then gemma-3n-E4B-it for 20 steps with --compile (activation checkpointing
# on). The 2026-12-03 runs named the first "card-4b-auto" (auto meant pointwise then; off is the default now).
# Usage on the device: bash bench/gpu_compile.sh   (ONLY="card-4b-layers" picks runs)
# Expects .whl and .gpucache (see bench/gpu_matrix.sh); results and job logs under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} SFT_HARNESS_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
run() {  # name, args...
  local name=$1; shift
  local started=$(date +%s)
  python3 run_validation.py --weights synthetic --nproc-per-node 1 --wandb-mode disabled --output-dir results \
    --run-id "$name" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - started ))s" | tee -a "$out/index.txt"
  for r in results/"$name"/*/result.json; do cp "$r" "$out/$name.result.json"; done
}
for name in ${ONLY:-card-4b-pointwise card-4b-layers 3n-20-pointwise}; do
  case $name in
    card-4b-pointwise) run "$name" --models gemma-3-4b-it --compile ;;
    card-4b-layers) run "$name" --models gemma-3-4b-it --compile layers ;;
    3n-20-pointwise) run "$name" --models gemma-3n-E4B-it --max-steps 20 --compile ;;
  esac
done
tar czf "$out/logs.tgz" results/*/*/train.log results/*/*/metrics.jsonl 2>/dev/null
