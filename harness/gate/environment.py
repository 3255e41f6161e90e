"""The environment lock: what a run ran on (GPUs, driver, CUDA, library versions, the harness's
commit, host, command line), recorded beside its results so a verdict can be reproduced.

Secrets never reach it: the command line goes through redact_secrets, and nothing here copies
os.environ (only named versions and facts are collected)."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REDACTED = "***"
REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("transformers", "accelerate", "datasets", "wandb")

# A name (flag, env variable, dict key) is secret when one of its words is, or ends with, one of these:
# HF_TOKEN, --hf-token, WANDB_API_KEY, --apikey, DB_PASSWORD. "--max-tokens-per-gpu" is not ("tokens").
_SECRET_WORDS = ("token", "key", "secret", "password", "passwd")
# Values that are secrets wherever they appear.
_SECRET_VALUE_PATTERNS = (
    re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{16,}"),  # Hugging Face token
    re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{16,}"),  # OpenAI / Anthropic style key
    re.compile(r"(?<![A-Za-z0-9])gh[pousr]_[A-Za-z0-9]{20,}"),  # GitHub token
    re.compile(r"(?<![A-Za-z0-9])AKIA[0-9A-Z]{16}(?![A-Za-z0-9])"),  # AWS access key id
)
_WANDB_KEY = re.compile(r"[0-9a-fA-F]{40}|local-[0-9a-fA-F]{40}")  # a whole value only: commits look alike
_URL_CREDENTIALS = re.compile(r"(://[^/\s:@]+:)[^/\s@]+@")
# Keys whose values are known not to be secrets even when they look like one (a commit is 40 hex).
_SAFE_KEYS = frozenset({"commit", "git_commit", "revision"})


def is_secret_name(name: str) -> bool:
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower())
    return any(word.endswith(secret) for word in words if word for secret in _SECRET_WORDS)


def looks_like_secret(value: str) -> bool:
    value = str(value)
    return bool(_WANDB_KEY.fullmatch(value)) or any(p.search(value) for p in _SECRET_VALUE_PATTERNS)


def _redact_value(value: str) -> str:
    if _WANDB_KEY.fullmatch(value):
        return REDACTED
    for pattern in _SECRET_VALUE_PATTERNS:
        value = pattern.sub(REDACTED, value)
    return _URL_CREDENTIALS.sub(r"\1" + REDACTED + "@", value)


def _redact_tokens(tokens: list[str]) -> list[str]:
    """argv-style: "--hf-token X" and "--hf-token=X" and "HF_TOKEN=X" hide X; a secret-looking
    value is hidden wherever it stands."""
    out: list[str] = []
    hide_next = False
    for token in tokens:
        if hide_next and not token.startswith("-"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        name, eq, value = token.partition("=")
        if eq and is_secret_name(name.lstrip("-")) and re.fullmatch(r"-{0,2}[A-Za-z_][A-Za-z0-9_.-]*", name):
            out.append(f"{name}={REDACTED}")
        elif token.startswith("-") and not eq and is_secret_name(token.lstrip("-")):
            out.append(token)
            hide_next = True
        else:
            out.append(_redact_value(token))
    return out


def _redact_string(text: str) -> str:
    parts = re.split(r"(\s+)", text)  # keep the whitespace: a command line reads the same afterwards
    words = _redact_tokens(parts[0::2])
    parts[0::2] = words
    return "".join(parts)


def redact_secrets(obj: Any) -> Any:
    """A copy of obj (dicts, lists, tuples, strings) with secrets replaced by "***": values under
    secret-named keys, values after secret-named flags or NAME= prefixes, and values that look like
    tokens (hf_..., sk-..., 40-hex wandb keys). Numbers, booleans and None pass through."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if is_secret_name(key) and isinstance(value, (str, bytes, int, float)) and not isinstance(value, bool):
                out[key] = REDACTED
            elif str(key) in _SAFE_KEYS and isinstance(value, str):
                out[key] = value
            else:
                out[key] = redact_secrets(value)
        return out
    if isinstance(obj, (list, tuple)):
        if all(isinstance(item, str) for item in obj):
            redacted = _redact_tokens(list(obj))
        else:
            redacted = [redact_secrets(item) for item in obj]
        return type(obj)(redacted) if isinstance(obj, tuple) else redacted
    if isinstance(obj, str):
        return _redact_string(obj)
    return obj


def environment_lock(command_argv: list[str]) -> dict:
    """Everything needed to say what this run ran on; safe to write next to the results."""
    argv = redact_secrets([str(a) for a in command_argv])
    return {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "gpu": gpu_info(),
        "cuda": cuda_versions(),
        "versions": package_versions(),
        "harness": git_state(REPO_ROOT),
        "command": {"argv": argv, "line": shlex.join(argv)},
    }


def gpu_info() -> dict:
    try:
        import torch  # the gate's modules stay torch-free: only when the environment is recorded

        if not torch.cuda.is_available():
            return {"count": 0, "model": None, "names": []}
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001 - a broken CUDA setup is a fact to record, not a crash
        return {"count": 0, "model": None, "names": [], "error": f"{type(exc).__name__}: {exc}"}
    return {
        "count": len(names),
        "model": names[0] if len(set(names)) == 1 else ", ".join(sorted(set(names))),
        "names": names,
    }


def cuda_versions() -> dict:
    cuda = cudnn = nccl = None
    try:
        import torch  # the gate's modules stay torch-free: only when the environment is recorded

        cuda = torch.version.cuda
        if torch.backends.cudnn.is_available():
            cudnn = torch.backends.cudnn.version()
        if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except Exception:  # noqa: BLE001
        pass
    return {"cuda": cuda, "driver": driver_version(), "cudnn": cudnn, "nccl": nccl}


def driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[0] if lines else None


def package_versions() -> dict:
    versions: dict[str, str | None] = {}
    try:
        import torch  # the gate's modules stay torch-free: only when the environment is recorded

        versions["torch"] = torch.__version__
    except ImportError:
        versions["torch"] = None
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(root: Path) -> dict | None:
    """{"commit", "dirty"} of the harness checkout; None when root is not the top of a git checkout
    (an installed package inside some other repository does not count)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=15, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != Path(root).resolve():
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}
