#!/usr/bin/env bash
# The release-candidate matrix on one GPU: instructlab-training 0.15.0 / 0.15.1 / 0.16.2, each in its own
# environment, x tiny gemma-3-4b-it and gemma-3n-E4B-it; the native trainer and TRL at full size.
# Usage on the device: bash bench/gpu_stack_matrix.sh   (ONLY=name1,name2 picks runs; results under $OUT/matrix)
# The device has no package index and carries 64 MiB, too little for uv beside numba's llvmlite, so the
# stack environments are made here with pip from carried wheels and given through --stack-python (what
# --stack builds with uv; tests/test_stack_env.py covers that path):
#   .whl          ../shared/device/wheels.sh trl==1.16.0 (NO_WANDB=1): the harness's packages the image lacks
#   .stackwheels  instructlab_training-<v>-*.whl; common/*.whl (numba, peft, pydantic..., as instructlab
#                 needs them); llvmlite-*.tar.xz (its installed files, xz: the wheel is 56 MB)
#   .gpucache.tar.xz  a converted Gemma tokenizer (transformers < 5.24 converts it wrongly from GGUF)
set -u
out=${OUT:-/tmp/out}/matrix
mkdir -p "$out"
tar -xJf .gpucache.tar.xz
export SFT_HARNESS_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
environment() {  # folder, wheels...: a venv over the image's packages, the harness's wheels and these
  local dir=$1; shift
  python3 -m venv --system-site-packages "$dir" &&
    "$dir/bin/python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check .whl/*.whl "$@"
}
environment /tmp/harness || exit 1
export PYTHON=/tmp/harness/bin/python
mkdir -p /tmp/llvm && tar -xJf .stackwheels/llvmlite-*.tar.xz -C /tmp/llvm
for v in 0.15.0 0.15.1 0.16.2; do
  environment "/tmp/ilab-$v" .stackwheels/common/*.whl .stackwheels/instructlab_training-$v-*.whl || exit 1
  site=$("/tmp/ilab-$v/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  echo /tmp/llvm > "$site/llvmlite.pth"
  "/tmp/ilab-$v/bin/python" -c 'import numba, instructlab.training as t, transformers, torch; print("ilab", t.__file__, "numba", numba.__version__, "transformers", transformers.__version__, "torch", torch.__version__)' 2>&1 | tail -1 | tee -a "$out/envs.txt"
done
source "$(dirname "$0")/gpu_run.sh"
tiny=(--backend instructlab --weights tiny --max-samples 32 --max-steps "${ILAB_STEPS:-300}")
for v in 0.15.0 0.15.1 0.16.2; do
  run "ilab-$v-4b" "${ILAB_S:-180}" --models gemma-3-4b-it "${tiny[@]}" --stack-python "/tmp/ilab-$v/bin/python"
done
for v in 0.15.0 0.15.1 0.16.2; do
  run "ilab-$v-3n" "${ILAB_S:-180}" --models gemma-3n-E4B-it "${tiny[@]}" --stack-python "/tmp/ilab-$v/bin/python"
done
run native-4b "${NATIVE_S:-300}" --models gemma-3-4b-it --weights synthetic
run trl-llama-1b "${TRL_S:-300}" --models Llama-3.2-1B-Instruct --backend trl --weights synthetic
cat "$out/index.txt" 2>/dev/null
