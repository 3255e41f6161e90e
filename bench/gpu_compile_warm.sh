#!/usr/bin/env bash
# Whole-layer compilation with a cold, then a warm compile cache: the card's gemma-3-4b-it to its verdict
# with --compile layers twice on the same machine (the second run reads what the first left in
# $SFT_HARNESS_CACHE/inductor), so that its default can be decided on time to verdict, not on steady MFU.
# Usage on the device: bash bench/gpu_compile_warm.sh   (ONLY=name1,name2 picks runs; results under $OUT/compile-warm)
# Expects .whl (../shared/device/wheels.sh, NO_WANDB=1) and .gpucache.tar.xz (a converted Gemma tokenizer).
set -u
out=${OUT:-/tmp/out}/compile-warm
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
tar -xJf .gpucache.tar.xz
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} SFT_HARNESS_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
source "$(dirname "$0")/gpu_run.sh"
run layers-cold "${LIMIT_S:-330}" --models gemma-3-4b-it --weights synthetic --compile layers ${CARD:-}
du -sh "$SFT_HARNESS_CACHE/inductor" 2>&1 | tee -a "$out/index.txt"
run layers-warm "${LIMIT_S:-330}" --models gemma-3-4b-it --weights synthetic --compile layers ${CARD:-}
cat "$out/index.txt"
