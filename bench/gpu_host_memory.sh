#!/usr/bin/env bash
# Issue 17 item 4, on the GPU machine: host memory of loading a full-size gemma-3-4b-it checkpoint (the
# VLM with its SigLIP tower, random weights, bf16 shards as the hub ships them) on 1, 2 and 4 ranks,
# rank 0 reading and broadcasting against every rank reading. Results: $OUT/host-memory-<mode>.json.
#   cpu: gloo on CPU (shards in host memory too), no GPU used: runs beside a GPU job
#   gpu: every rank on GPU 0 through gloo (one GPU lent): the host side of an N-GPU node
# Usage on the device, after the wheel install line: bash bench/gpu_host_memory.sh cpu|gpu
set -u
mode=$1; ckpt=${CKPT:-/tmp/g4b-synthetic}
[ -e "$ckpt/model.safetensors.index.json" ] || CUDA_VISIBLE_DEVICES=$([ "$mode" = gpu ] && echo 0) \
  python3 bench/host_memory.py --write-synthetic gemma-3-4b-it "$ckpt" || exit 1
case "$mode" in
  cpu) CUDA_VISIBLE_DEVICES= python3 bench/host_memory.py --model "$ckpt" --nproc ${NPROC:-1,2,4} --output "$OUT/host-memory-cpu.json" ;;
  gpu) python3 bench/host_memory.py --model "$ckpt" --nproc ${NPROC:-1,2,4} --one-gpu --device cuda --output "$OUT/host-memory-gpu.json" ;;
esac
