#!/usr/bin/env bash
# Issue [K], session 12, one device call (one GPU, --weights synthetic):
#  1. gemma-3-4b-it --compile layers for 14 steps with recompiles and graph breaks logged (sessions 10-11
#     paid ~30 s again at step 11, the epoch's short last step) and a profile of steps 5-6;
#  2. gemma-3n-E4B-it with the defaults for 10 steps with a profile of steps 5-6 (where its time goes);
#  3. the card's gemma-3-4b-it to its verdict with a lower peak learning rate (steps to target), in
#     what is left of ~560 s.
# Usage on the device: bash bench/gpu_diagnose.sh   (ONLY=4b-layers-14,3n-base-10,card-4b-lr picks parts)
# Expects .whl and .gpucache (see bench/gpu_matrix.sh).
set -u
began=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} SFT_HARNESS_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
parts=${ONLY:-4b-layers-14,3n-base-10,card-4b-lr}
mkdir -p results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for name in 4b-layers-14 3n-base-10; do
  [[ ",$parts," == *",$name,"* ]] || continue
  SFT_HARNESS_PROFILE=5:2 TORCH_LOGS=recompiles,graph_breaks timeout 200 python3 bench/speed_matrix.py \
    --plan bench/plans/diagnose.json --only "$name" --out "$out/$name" > "$out/$name.log" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - began ))s" | tee -a "$out/index.txt"
  python3 bench/speed_matrix.py --table "$out/$name/speed_matrix.json" 2>/dev/null
  grep -h -A12 "__recompiles\|__graph_breaks" results/matrix-"$name".log results/matrix-"$name"/*/train.log > "$out/$name.compile-log.txt" 2>/dev/null
done
if [[ ",$parts," == *",card-4b-lr,"* ]]; then
  left=$(( 570 - ($(date +%s) - began) ))
  timeout "$left" python3 run_validation.py --weights synthetic --nproc-per-node 1 --wandb-mode disabled --output-dir results \
    --run-id card-4b-lr --models gemma-3-4b-it --lr 1.5e-4 > "$out/card-4b-lr.log" 2>&1
  echo "card-4b-lr rc=$? limit ${left}s at $(( $(date +%s) - began ))s" | tee -a "$out/index.txt"
  cp results/card-4b-lr/*/result.json "$out/card-4b-lr.result.json" 2>/dev/null
  cp results/card-4b-lr/*/metrics.jsonl "$out/card-4b-lr.metrics.jsonl" 2>/dev/null
fi
tar czf "$out/logs.tgz" results/*/*/train.log results/*/*/metrics.jsonl results/matrix-*.log 2>/dev/null
