#!/usr/bin/env bash
# On the GPU machine: bash bench/gpu_matrix.sh PLAN [seconds]  -> $OUT/speed_matrix.json, $OUT/logs.tgz
# Expects .whl (../shared/device/wheels.sh) and, on transformers < 5.24, .gpucache (a converted Gemma tokenizer).
set -uo pipefail
plan=$1; limit=${2:-520}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} SFT_HARNESS_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1
mkdir -p results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_attention.py 2>&1 | tail -2
timeout "$limit" python3 bench/speed_matrix.py --plan "$plan" --out "$OUT" ${MATRIX_ARGS:-}
python3 bench/speed_matrix.py --table "$OUT/speed_matrix.json" 2>/dev/null
tar czf "$OUT/logs.tgz" results/matrix-* 2>/dev/null
