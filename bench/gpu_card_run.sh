#!/usr/bin/env bash
# The card's command on a GPU machine, once per GPU count: bash bench/gpu_card_run.sh OUT_DIR 4 2 1
# Expects the wheels of ../shared/device/wheels.sh in .whl and, on transformers < 5.24 (whose GGUF
# conversion of the Gemma tokenizer is wrong), a converted Gemma tokenizer under $SFT_HARNESS_CACHE.
set -uo pipefail
out=$1; shift
models=${MODELS:-gemma-3-4b-it,gemma-3n-E4B-it}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpus.csv"
for n in "$@"; do
  python3 run_validation.py --models "$models" --weights synthetic --nproc-per-node "$n" \
    --run-id "gpu$n" --timeout-per-model "${TIMEOUT:-300}" ${EXTRA_ARGS:-}
  echo "exit code at $n GPUs: $?"
  cp "results/gpu$n/summary.json" "$out/summary-gpu$n.json" 2>/dev/null
done
tar czf "$out/results.tgz" results/gpu*
