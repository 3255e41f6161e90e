#!/usr/bin/env bash
# Issue [K], session 11, one device call: gemma-3n-E4B-it for 20 steps with --compile layers under
# activation checkpointing (the checkpoint inside each compiled layer), then gemma-3-4b-it against TRL's
# SFTTrainer side by side (bench/compare.py, ours with --compile layers, 30 steps). A second call:
# ONLY=card-4b-layers,card-4b-80gib: the card's gemma-3-4b-it to its verdict with --compile layers, and
# with the defaults on an 80 GiB cap (--gpu-memory-gib 80, as on an A100/H100 80GB).
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
card() {  # name, args...: the card's command, one GPU, synthetic weights
  local name=$1; shift
  local started=$(date +%s)
  [[ ",$parts," == *",$name,"* ]] || return 0
  # recompiles logged: session 11's layers run paid ~30 s again at step 11 (the epoch's short last step)
  TORCH_LOGS=${TORCH_LOGS:-recompiles} timeout 290 python3 run_validation.py --weights synthetic --nproc-per-node 1 --wandb-mode disabled --output-dir results \
    --run-id "$name" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - started ))s" | tee -a "$out/index.txt"
  for r in results/"$name"/*/result.json; do cp "$r" "$out/$name.result.json"; done
}
card card-4b-layers --models gemma-3-4b-it --compile layers
card card-4b-80gib --models gemma-3-4b-it --gpu-memory-gib 80
tar czf "$out/logs.tgz" results/*/*/train.log results/*/*/metrics.jsonl results/matrix-*.log 2>/dev/null
