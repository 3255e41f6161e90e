#!/usr/bin/env bash
# The backends on the GPU machine (issue 16): each stack on the card's model, tiny first (fast checks of
# the launch paths), then synthetic full size with a short step budget. Results under $OUT/backends.
# Usage on the device: bash bench/gpu_backends.sh   (after the wheel install line of ../shared/device/wheels.sh)
# EXTRA="--max-tokens-per-gpu 4096" adds CLI options to every selected run (the script takes no arguments).
set -u
out=${OUT:-/tmp/out}/backends
mkdir -p "$out"
source "$(dirname "$0")/gpu_run.sh"
run ilab-tiny 150 --models gemma-3-4b-it --backend instructlab --weights tiny --max-samples 32 --max-steps 60
run trl-tiny-gemma 150 --models gemma-3-4b-it --backend trl --weights tiny --max-samples 32
run trl-tiny 250 --models Llama-3.2-1B-Instruct --backend trl --weights tiny --max-samples 32
run trl-4b ${TRL_4B_S:-200} --models gemma-3-4b-it --backend trl --weights synthetic --max-steps ${STEPS:-40}
run ilab-4b ${ILAB_4B_S:-300} --models gemma-3-4b-it --backend instructlab --weights synthetic --max-steps ${STEPS:-40}
run trl-3n ${TRL_3N_S:-200} --models gemma-3n-E4B-it --backend trl --weights synthetic --max-steps ${STEPS:-40}
run ilab-3n ${ILAB_3N_S:-300} --models gemma-3n-E4B-it --backend instructlab --weights synthetic --max-steps ${STEPS:-40}
