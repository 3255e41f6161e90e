# Two entry points, each creating the environment it needs: `make validate` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test files spread over this many pytest workers (pytest-xdist), a file's tests kept together (module
# fixtures run once); the distributed tests' jobs are mostly single-threaded start-up, so 2 workers on
# 2 cores overlap them; --no-loadscope-reorder keeps tests/conftest.py's longest-first order (xdist
# would sort files by their number of tests). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
# One intra-op thread per process: the suite runs several torch processes per core, and a second
# OpenMP thread each only spins against the others (measured on 2 cores: 7% less CPU, 5% less wall).
TEST_THREADS ?= 1
PYTEST = OMP_NUM_THREADS=$(TEST_THREADS) $(1) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)
# Where the harness keeps tiny checkpoints, converted GGUF, tokenizers and tokenised data.
CACHE := $(or $(SFT_HARNESS_CACHE),$(HOME)/.cache/sft-harness)

# The exact versions `make validate` and `make test` install (with their hashes): every dependency of
# the harness and of its dev extra (trl, instructlab-training, gguf) except torch. torch comes first,
# from pip (`torch==2.13.0` takes the CPU wheel from /opt/wheels, pip's find-links); a venv that has a
# torch already (a GPU image's) keeps it.
LOCK := requirements/lock.txt
TORCH := 2.13.0
# `make lock` resolves with uv against the CPU wheel in TORCH_WHEELS (requirements/torch-cpu.txt), so
# that no CUDA package (nvidia-*, triton) enters the lock as a torch dependency.
TORCH_WHEELS ?= /opt/wheels
UV_VERSION := 0.13.10
LOCK_TOOLS := .venv-lock
# `make test-latest`: the suite on the newest releases pyproject.toml's ranges allow (torch stays as
# installed), in a venv of its own. Not run by CI.
LATEST := .venv-latest

.PHONY: setup validate test lint test-latest lock clean

# Idempotent: re-runs only when pyproject.toml or the lock changes. torch==2.13.0 first where the venv
# has no torch (pip takes the CPU wheel from local disk; its dependencies come from the lock); a GPU
# image's venv brings its own torch. Then the lock, hash-checked and without resolving anything, the
# harness itself (editable, its dependencies already there) and pip's consistency check.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-deps torch==$(TORCH)
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

setup: $(STAMP)

validate: setup
	$(PY) run_validation.py --models gemma-3-4b-it,gemma-3n-E4B-it --weights tiny --device cpu --nproc-per-node 2

test: setup
	$(call PYTEST,$(PY))

# Style and simple bugs (ruff, configured in pyproject.toml): seconds; .ci/run runs it before the tests.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Refreshes requirements/lock.txt to the newest releases pyproject.toml's ranges allow (uv from PyPI,
# in a venv of its own); commit the lock once `make test` passes on it.
lock:
	test -x $(LOCK_TOOLS)/bin/uv || { python3 -m venv $(LOCK_TOOLS) && echo '*' > $(LOCK_TOOLS)/.gitignore \
		&& $(LOCK_TOOLS)/bin/pip install -q uv==$(UV_VERSION); }
	$(LOCK_TOOLS)/bin/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 --upgrade \
		--generate-hashes --find-links $(TORCH_WHEELS) --override requirements/torch-cpu.txt --no-emit-package torch \
		--custom-compile-command "make lock" --quiet -o $(LOCK)

# Installed afresh each time (eager upgrades), so that it follows new releases.
test-latest:
	test -x $(LATEST)/bin/python || { python3 -m venv $(LATEST) && echo '*' > $(LATEST)/.gitignore; }
	$(LATEST)/bin/python -c "import torch" 2>/dev/null || $(LATEST)/bin/python -m pip install -q torch==$(TORCH)
	$(LATEST)/bin/python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > $(LATEST)/torch-pin.txt
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-pin.txt -e ".[dev]"
	$(LATEST)/bin/python -m pip check
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|huggingface.hub|datasets|wandb|trl|instructlab-training|kernels) '
	$(call PYTEST,$(LATEST)/bin/python)

clean:  # the environments and the caches (run folders under results/ are kept)
	rm -rf $(VENV) $(LATEST) $(LOCK_TOOLS) "$(CACHE)"
