"""Stack environments (harness/runtime/stack_env.py), offline: a wheelhouse of tiny wheels written here,
built with uv on top of this venv, whose torch, pyyaml and harness code the environments reuse."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from wheel_files import write_wheel

from harness.contract.errors import UsageError
from harness.runtime import stack_env
from harness.runtime.cache import MARKER
from harness.runtime.stack_env import StackEnv, StackSpec, build_stack_env, external_python


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheelhouse")
    # tinystack needs pyyaml and torch, which only the harness environment holds: reused, never fetched
    write_wheel(folder, "tinystack", "1.0", requires=("pyyaml>=5", "torch>=2"))
    write_wheel(folder, "tinystack", "2.0")
    write_wheel(folder, "newtorchstack", "1.0", requires=("torch>=999",))
    # a package the harness environment has too (transformers requires it): the stack's own copy shadows it
    write_wheel(folder, "safetensors", "0.0.1")
    return folder


@pytest.fixture(scope="module", autouse=True)
def uv_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UV_CACHE_DIR", str(tmp_path_factory.mktemp("uv-cache")))
        yield


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny(wheelhouse, cache_root) -> StackEnv:
    return build_stack_env("tinystack==1.0", cache_root, wheelhouse=wheelhouse)


def run_in(env: StackEnv, code: str) -> str:
    proc = subprocess.run([str(env.python), "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "Error processing" not in proc.stderr, proc.stderr
    return proc.stdout.strip()


def forbid_uv(monkeypatch) -> list[list[str]]:
    """Any uv command from here on fails the test; returns the calls seen (none expected)."""
    calls: list[list[str]] = []

    def no_uv(uv, args, *rest, **kwargs):
        calls.append(args)
        raise AssertionError(f"uv was called: {args}")

    monkeypatch.setattr(stack_env, "_run_uv", no_uv)
    return calls


def test_the_spec_forms_and_their_names(tmp_path):
    assert StackSpec.parse(" trl==1.15.0 ").name == "trl"
    spec = StackSpec.parse("instructlab-training>=0.15,<0.16")
    assert (spec.kind, spec.name) == ("requirement", "instructlab-training")
    assert spec.target == "instructlab-training<0.16,>=0.15"
    wheel = write_wheel(tmp_path, "tinystack", "1.0")
    assert (StackSpec.parse(str(wheel)).kind, StackSpec.parse(str(wheel)).name) == ("file", "tinystack")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "pyproject.toml").write_text('[project]\nname = "My_Stack"\nversion = "0.1"\n')
    folder = StackSpec.parse(str(tmp_path / "src"))
    assert (folder.kind, folder.name, folder.target) == ("folder", "my-stack", str(tmp_path / "src"))
    vcs = StackSpec.parse("git+https://github.com/instructlab/training@v0.15.0#egg=instructlab-training")
    assert (vcs.kind, vcs.name) == ("vcs", "instructlab-training")
    assert StackSpec.parse("trl @ https://example.org/trl-1.15.0-py3-none-any.whl").kind == "requirement"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "trl==",
        "trl===1.0 extra",
        "!!",
        "-e .",
        "trl==1.0\ntorch",
        "git+ftp://x",
        "./no/such/folder",
        "x.whl",
        "trl==1.0; python_version < '3'",
    ],
)
def test_a_malformed_spec_is_one_line(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as caught:
        StackSpec.parse(text)
    assert "\n" not in str(caught.value) and str(caught.value)


def test_a_folder_that_is_not_a_python_source_is_refused(tmp_path):
    with pytest.raises(UsageError, match="no pyproject.toml or setup.py"):
        StackSpec.parse(str(tmp_path))


def test_the_environment_has_the_stack_and_the_harness_environment_beneath_it(tiny):
    assert tiny.distribution == "tinystack"
    assert tiny.versions["tinystack"] == "1.0"
    assert tiny.versions["torch"] == importlib.metadata.version("torch")  # the harness's, not a copy
    assert tiny.conflicts == ()
    code = (
        "import json, sys, tinystack, yaml, harness.contract.records as r; "
        "print(json.dumps([tinystack.__version__, tinystack.__file__, yaml.__file__, r.__file__, sys.prefix]))"
    )
    version, tiny_file, yaml_file, records_file, prefix = json.loads(run_in(tiny, code))
    assert version == "1.0" and Path(tiny_file).is_relative_to(tiny.folder)
    assert not Path(yaml_file).is_relative_to(tiny.folder)  # pyyaml: only the harness environment has it
    assert Path(records_file) == Path(stack_env.REPO_ROOT, "harness", "contract", "records.py")
    assert Path(prefix) == tiny.folder
    site = Path(json.loads(run_in(tiny, "import json, sysconfig; print(json.dumps(sysconfig.get_path('purelib')))")))
    assert not (site / "torch").exists() and (site / "tinystack").is_dir()  # torch is reused, not installed
    assert (tiny.folder / "bin" / "torchrun").is_file()  # the harness's scripts run this environment's python


def test_a_second_build_reuses_the_environment_without_uv(tiny, wheelhouse, cache_root, monkeypatch):
    calls = forbid_uv(monkeypatch)
    again = build_stack_env(StackSpec.parse("tinystack == 1.0"), cache_root, wheelhouse=wheelhouse)
    assert (again.folder, again.versions) == (tiny.folder, tiny.versions) and calls == []


def test_another_version_gets_another_environment(tiny, wheelhouse, cache_root):
    other = build_stack_env("tinystack==2.0", cache_root, wheelhouse=wheelhouse)
    assert other.folder != tiny.folder and other.versions["tinystack"] == "2.0"
    assert run_in(other, "import tinystack; print(tinystack.__version__)") == "2.0"
    assert run_in(tiny, "import tinystack; print(tinystack.__version__)") == "1.0"


def test_the_stacks_own_package_shadows_the_harness_environments(wheelhouse, cache_root):
    env = build_stack_env("safetensors==0.0.1", cache_root, wheelhouse=wheelhouse)
    assert env.versions["safetensors"] == "0.0.1" != importlib.metadata.version("safetensors")
    assert run_in(env, "import safetensors; print(safetensors.__version__)") == "0.0.1"
    # what the harness's packages required of it, now broken, is said (transformers needs a real safetensors)
    assert any("safetensors" in conflict and "transformers" in conflict for conflict in env.conflicts)


@pytest.mark.parametrize(("spec", "named"), [("tinystack==3.0", "tinystack"), ("newtorchstack==1.0", "torch")])
def test_what_the_wheelhouse_cannot_satisfy_is_one_line(spec, named, wheelhouse, tmp_path):
    with pytest.raises(UsageError) as caught:
        build_stack_env(spec, tmp_path, wheelhouse=wheelhouse)
    message = str(caught.value)
    assert "\n" not in message and spec in message and named in message.split(":", 1)[1], message
    left = [path.name for path in (tmp_path / "stack-envs").iterdir()]
    assert all(name.startswith(".") and name.endswith(".lock") for name in left), left  # no environment, no temp


def test_a_failed_build_leaves_nothing_that_is_reused(wheelhouse, tmp_path, monkeypatch):
    def crash(*args):
        raise KeyboardInterrupt  # Ctrl-C after uv installed the stack

    with monkeypatch.context() as patch:
        patch.setattr(stack_env, "_write_launchers", crash)
        with pytest.raises(KeyboardInterrupt):
            build_stack_env("tinystack==2.0", tmp_path, wheelhouse=wheelhouse)
    assert [path.name for path in (tmp_path / "stack-envs").iterdir() if not path.name.endswith(".lock")] == []
    env = build_stack_env("tinystack==2.0", tmp_path, wheelhouse=wheelhouse)
    assert env.versions["tinystack"] == "2.0"
    # a process killed before the rename's marker: the folder is rebuilt, not trusted
    (env.folder / MARKER).unlink()
    assert build_stack_env("tinystack==2.0", tmp_path, wheelhouse=wheelhouse).versions["tinystack"] == "2.0"
    assert (env.folder / MARKER).is_file()


def test_two_builders_of_one_key_build_it_once(wheelhouse, tmp_path, monkeypatch):
    venvs, real = [], stack_env._run_uv

    def counting(uv, args, *rest, **kwargs):
        if args[0] == "venv":
            venvs.append(args)
        return real(uv, args, *rest, **kwargs)

    monkeypatch.setattr(stack_env, "_run_uv", counting)
    results: list[StackEnv] = []

    def build():
        results.append(build_stack_env("tinystack==2.0", tmp_path, wheelhouse=wheelhouse))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 2 and results[0] == results[1] and len(venvs) == 1


def test_external_python(tmp_path):
    with pytest.raises(UsageError, match="no executable file") as caught:
        external_python(tmp_path / "no" / "python")
    assert "\n" not in str(caught.value)
    (tmp_path / "python").write_text("#!/bin/sh\nexit 3\n")
    (tmp_path / "python").chmod(0o755)
    with pytest.raises(UsageError, match="does not run as Python"):
        external_python(tmp_path / "python")
    env = external_python(sys.executable)  # this venv: it runs the harness's code and has torch
    assert env.spec is None and env.versions["torch"] == importlib.metadata.version("torch")


def test_a_missing_uv_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "uv", None)  # import uv: ImportError
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UsageError, match="pip install") as caught:
        stack_env.uv_command()
    assert "\n" not in str(caught.value)


def test_uvs_most_useful_line():
    resolver = (
        "Using Python 3.11.7 environment at: x\nerror: No solution found when resolving dependencies\n"
        "  cause: Because trl was not found in the package registry and you require trl==99, we can conclude ...\n"
    )
    assert stack_env.uv_problem(resolver).startswith("Because trl was not found")
    git = (
        "error: Git operation failed\n  cause: failed to clone into: /c/db\n         --- stderr\n"
        "         fatal: unable to access 'https://example.invalid/x.git/': Could not resolve host\n"
    )
    assert stack_env.uv_problem(git) == (
        "Git operation failed: fatal: unable to access 'https://example.invalid/x.git/': Could not resolve host"
    )
    assert stack_env.uv_problem("") == "uv failed and said nothing"
