# Sourced by the bench/gpu_*.sh scripts on the GPU machine: the carried wheels (.whl, from
# ../shared/device/wheels.sh) and, on transformers < 5.24, the converted Gemma tokenizer (.gpucache).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} SFT_HARNESS_CACHE=$PWD/.gpucache PYTHONUNBUFFERED=1
mkdir -p results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1
