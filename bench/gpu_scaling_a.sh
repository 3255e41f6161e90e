#!/usr/bin/env bash
# One 4-GPU machine, jobs side by side on disjoint GPUs (what was run for bench/results/*-2gpu/1gpu):
#   A: GPUs 0-1 the card command (gemma-3-4b-it) on 2 GPUs | GPU 2 the same on 1 GPU |
#      GPU 3 the packing-leak mutation (2 steps), then ours vs TRL on 1 GPU (30 steps)
#   B: GPUs 0-1 ours vs TRL (accelerate FSDP2) on 2 GPUs  | GPUs 2-3 gemma-3n-E4B-it on 2 GPUs (time-boxed)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} SFT_HARNESS_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1
mkdir -p results; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
card() { CUDA_VISIBLE_DEVICES=$1 python3 run_validation.py --models "$2" --weights synthetic --nproc-per-node "$3" --run-id "$4" --wandb-mode disabled "${@:5}" > "results/$4.log" 2>&1; echo "$4 exit $?"; }
card 0,1 gemma-3-4b-it 2 card-4b-2gpu --timeout-per-model 400 & a=$!
card 2 gemma-3-4b-it 1 card-4b-1gpu --timeout-per-model 400 & b=$!
( SFT_HARNESS_MUTATION=position_ids_not_reset card 3 gemma-3-4b-it 1 mutation-posids --max-steps 2 --max-samples 64
  CUDA_VISIBLE_DEVICES=3 python3 bench/compare.py --model gemma-3-4b-it --num-gpus 1 --max-steps 30 --name gemma-3-4b-it-1gpu-vs-trl --out-dir "$OUT" > results/cmp1.log 2>&1; echo "cmp1 exit $?" ) & c=$!
wait $a; ( CUDA_VISIBLE_DEVICES=0,1 python3 bench/compare.py --model gemma-3-4b-it --num-gpus 2 --max-steps 30 --name gemma-3-4b-it-2gpu-vs-trl --out-dir "$OUT" > results/cmp2.log 2>&1; echo "cmp2 exit $?" ) &
wait $b $c; card 2,3 gemma-3n-E4B-it 2 card-3n-2gpu --timeout-per-model "${TIMEBOX_3N:-200}" &
wait
for r in card-4b-2gpu card-4b-1gpu mutation-posids card-3n-2gpu; do python3 - "$r" <<'PY'
import json, sys, glob
for f in glob.glob(f"results/{sys.argv[1]}/*/result.json"):
    r = json.load(open(f)); w = json.load(open(f.replace("result.json", "worker.json")))
    print(sys.argv[1], r.get("verdict"), "steps", r.get("steps"), "final", r.get("final_loss"), "tok/s/gpu", r.get("tokens_per_s_per_gpu"),
          "mfu", r.get("mfu"), "peak", r.get("peak_mem_gib"), "verdict_s", r.get("time_to_verdict_s"), "ac", w.get("activation_checkpointing"),
          "attn", w.get("attention"), "time", {k: round(v, 1) for k, v in (w.get("time_s") or {}).items()}, "reasons", r.get("reasons"))
    print("  packing:", (w.get("preflight") or {}).get("packing", {}).get("detail"))
PY
done
tail -3 results/cmp1.log results/cmp2.log
tar czf "$OUT/runs.tgz" results/card-* results/mutation-* results/*.log results/bench-* 2>/dev/null
