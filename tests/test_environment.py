"""Environment lock: the facts a run ran on, and no secret from the command line or os.environ."""

from __future__ import annotations

import json
import re

import pytest

from harness.gate.environment import REDACTED, REPO_ROOT, environment_lock, git_state, is_secret_name, redact_secrets

HF_TOKEN = "hf_abcdefghijklmnopqrstuvwxyz"
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
ARGV = [
    "run_validation.py",
    "--models",
    "gemma-3-4b-it",
    "--max-tokens-per-gpu",
    "8192",
    "--hf-token",
    HF_TOKEN,
    f"WANDB_API_KEY={WANDB_KEY}",
    "--api-key=sk-proj-abcdefghijklmnopqrstuvwx",
    "--lr",
    "3e-3",
]


def test_lock_has_the_keys_and_no_planted_secret(monkeypatch):
    monkeypatch.setenv("HARNESS_TEST_PLANTED", "planted-env-value-7f3a")
    monkeypatch.setenv("HF_TOKEN", "hf_envtokenenvtokenenvtoken")
    lock = environment_lock(ARGV)
    for key in ("host", "python", "gpu", "cuda", "versions", "harness", "command"):
        assert key in lock
    assert set(lock["gpu"]) >= {"count", "model"}
    assert set(lock["cuda"]) >= {"cuda", "driver"}
    assert set(lock["versions"]) >= {"torch", "transformers", "accelerate", "datasets", "wandb"}
    dump = json.dumps(lock)
    for secret in (HF_TOKEN, WANDB_KEY, "sk-proj", "planted-env-value-7f3a", "hf_envtoken"):
        assert secret not in dump
    argv = lock["command"]["argv"]
    assert argv[argv.index("--hf-token") + 1] == REDACTED
    assert f"WANDB_API_KEY={REDACTED}" in argv and f"--api-key={REDACTED}" in argv
    assert argv[argv.index("--max-tokens-per-gpu") + 1] == "8192"  # "tokens" is not "token"
    assert argv[:3] == ARGV[:3] and argv[-2:] == ["--lr", "3e-3"]


def test_git_state_of_the_checkout_and_of_a_plain_folder(tmp_path):
    state = git_state(REPO_ROOT)
    if state is not None:  # an sdist/wheel install has no checkout
        assert re.fullmatch(r"[0-9a-f]{40}", state["commit"]) and isinstance(state["dirty"], bool)
    assert git_state(tmp_path) is None


@pytest.mark.parametrize(
    "name, secret",
    [
        ("HF_TOKEN", True),
        ("--hf-token", True),
        ("WANDB_API_KEY", True),
        ("apiKey", True),
        ("db_password", True),
        ("PASSWD", True),
        ("client-secret", True),
        ("--max-tokens-per-gpu", False),
        ("tokens_per_s", False),
        ("total_label_tokens", False),
        ("tokenizer", False),
        ("models", False),
    ],
)
def test_secret_names(name, secret):
    assert is_secret_name(name) is secret


def test_redact_secrets_walks_dicts_lists_and_strings():
    data = {
        "HF_TOKEN": "abc",
        "tokens_per_s": 12.5,
        "use_token": True,
        "commit": WANDB_KEY,
        "nested": {"wandb": {"api_key": "zzz"}, "list": [1, f"prefix {HF_TOKEN} suffix", ("--hf-token", "x")]},
        "command": f"python run_validation.py --hf-token {HF_TOKEN} --models a  WANDB_API_KEY={WANDB_KEY}",
        "url": "https://user:pa55@host.example/path",
        "bare": WANDB_KEY,
        "gh": "ghp_abcdefghijklmnopqrstuvwxyz0123",
    }
    out = redact_secrets(data)
    assert out["HF_TOKEN"] == REDACTED and out["tokens_per_s"] == 12.5 and out["use_token"] is True
    assert out["commit"] == WANDB_KEY  # a commit is 40 hex too, and not a secret
    assert out["nested"]["wandb"]["api_key"] == REDACTED
    assert out["nested"]["list"] == [1, f"prefix {REDACTED} suffix", ("--hf-token", REDACTED)]
    assert out["command"] == f"python run_validation.py --hf-token {REDACTED} --models a  WANDB_API_KEY={REDACTED}"
    assert out["url"] == f"https://user:{REDACTED}@host.example/path"
    assert out["bare"] == REDACTED and out["gh"] == REDACTED
    assert data["HF_TOKEN"] == "abc"  # a copy: the input is untouched


def test_lock_does_not_copy_the_environment(monkeypatch):
    import os

    monkeypatch.setenv("HARNESS_UNIQUE_MARKER", "marker-value-91c2")
    dump = json.dumps(environment_lock(["x"]))
    assert "marker-value-91c2" not in dump and "HARNESS_UNIQUE_MARKER" not in dump
    assert os.environ.get("PATH", "\0") not in dump
