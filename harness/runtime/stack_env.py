"""Stack environments: a virtual environment per version of a training stack under test, so the gate can
judge any release (instructlab-training==0.15.0, trl==1.15.0, transformers==5.17.0, a wheel, a source
folder, a git URL) without touching the harness's own locked environment.

    spec = StackSpec.parse("trl==1.15.0")                     # a malformed spec: UsageError, one line
    env = build_stack_env(spec, cache_dir())                   # once per key; later calls reuse it
    env.python, env.versions                                   # {"trl": "1.15.0", "torch": "2.13.0+cpu", ...}
    env = external_python("/opt/stack/bin/python")             # --stack-python: an environment the user has

Layout: `<cache_root>/stack-envs/<spec>-<hash>/` is the virtual environment itself (uv venv --relocatable),
with `stack.json` (what was installed, the conflicts uv saw) and the cache's `.complete` manifest. The key
hashes the spec (with a digest of a local wheel, sdist or source folder), the harness interpreter (its
version and path), the harness checkout, the harness environment's site-packages and every distribution
they hold (name and version), and the wheelhouse. It is built with harness.runtime.cache.build_once: into
`.<key>.tmp-*` beside it under an fcntl lock, then renamed; a killed or failed build leaves nothing that
passes for complete, and a second process building the same key waits and reuses the first one's.

Reusing the harness environment (torch is ~800 MB, with CUDA several GB); measured with uv 0.13.10 on
the harness venv (101 distributions: torch 2.13.0+cpu, transformers 5.25.0, trl 1.16.0), 2 CPU cores:

- Imports: a `.pth` in the environment's site-packages appends the harness checkout (the worker code,
  never installed there) and then the harness interpreter's site-packages (site.addsitedir, so its own
  .pth files work too). Appended entries come after the environment's own site-packages: what the stack
  environment installs shadows the harness's copy (transformers==5.17.0 over 5.25.0), the rest (torch,
  pyyaml, ...) is imported from the harness environment. The build checks that order in the new env.
- Resolution: uv does not see packages put on sys.path by a .pth (a dry run of trl==1.15.0 in a bare env
  with the .pth: 70 packages to install, torch 2.15.0, triton and the nvidia-* wheels among them), and a
  constraint torch==2.13.0+cpu cannot be met from PyPI or a wheelhouse (no such file there). So the
  environment's site-packages gets a metadata-only mirror ("stub") of each harness distribution: a
  `.dist-info` with its METADATA, WHEEL, entry_points.txt and top_level.txt, and a RECORD listing only
  those files (about 3.5 MB for 101 distributions). uv then sees them as installed: its resolver keeps
  every one that satisfies the spec (no download; offline the wheelhouse needs only what is new), checks
  torch against the stack's own requirement like any other package, and replaces a stub it must change
  (uninstalling the stub's own files, never the harness's) with a real install that shadows the harness.
  Measured, from PyPI with a warm uv cache: trl==1.15.0 installs trl alone (build 1.6 s, 7.7 MB on disk);
  transformers==5.17.0 installs transformers and huggingface-hub 1.33.0 (1.7 s, 63 MB);
  instructlab-training>=0.15,<0.16 installs instructlab-training 0.15.2 (1.8 s, 4.1 MB). A reuse costs
  two interpreter starts (the harness environment's list, the versions inside): about 0.4 s. A stack that
  needs another torch (torch==2.14.0: a dry run) gets its own torch and CUDA wheels, as pip would give it.
  Dropped after measuring: `--constraint` pins (torch is still downloaded, and a local +cpu build cannot
  be named); `uv pip compile --excludes torch` with the harness's versions as preferences, then installing
  the difference with --no-deps (the same result for trl, but every requirement on torch leaves the
  resolution, to be checked by hand afterwards, and offline the wheelhouse needs the whole closure).
- `uv pip check` runs on the result: what the stack's packages break among the harness's (a stack pinning
  an older safetensors than the harness's transformers needs, say) is kept in StackEnv.conflicts.
- The harness distributions' console scripts (torchrun, accelerate, ...) get launchers in the
  environment's bin/ that run its python: a stack that starts `torchrun` from its own bin/ (instructlab's
  run_training does) runs it inside the stack environment.

Offline: with a wheelhouse, uv installs with `--no-index --find-links <wheelhouse>` only; the wheelhouse
needs only what the harness environment does not already satisfy. uv comes from the `uv` package (a
dependency of the harness), else a `uv` on PATH. Torch-free: the gate may import this module.

Not covered: the harness interpreter's PYTHONPATH and user site-packages (only its site-packages are
mirrored); a VCS spec is keyed by its text (pin a commit: a branch that moves is not rebuilt); a package
that finds its own files through importlib.metadata.files() sees the stub's files, not the harness's.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)

from harness.contract.errors import UsageError
from harness.runtime.cache import CacheError, build_once
from harness.runtime.paths import REPO_ROOT

ENVS_DIR = "stack-envs"
LAYOUT = 1  # what an environment holds and how; a change here changes every key
RECORD = "stack.json"
PTH_NAME = "zzz_sft_harness.pth"  # sorts after the stack's own .pth files: their paths come first
STUB_INSTALLER = "sft-harness-stack-env"  # INSTALLER of a harness distribution's metadata-only mirror
# The versions every StackEnv reports, besides the stack's own distribution.
WATCHED = ("transformers", "torch", "accelerate", "trl", "instructlab-training", "axolotl")
UV_INSTALL = "pip install 'uv>=0.13' (or pip install -e . in the harness checkout)"
SPEC_FORMS = "a pip requirement (trl==1.15.0), a wheel or sdist, a source folder or a git+https:// URL"
VCS_SCHEMES = ("git", "hg", "svn", "bzr")
SDIST_SUFFIXES = (".tar.gz", ".zip")
NAMED_URL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\s*(\[[^\]]*\])?\s*@")
# Folders of a source tree that do not go into the package: left out of its digest.
UNBUILT = {"__pycache__", "build", "dist", "node_modules"}
PROBE_TIMEOUT_S = 120

SpecKind = Literal["requirement", "file", "folder", "vcs", "url"]


@dataclass(frozen=True)
class StackSpec:
    """What to install as the stack: one of SPEC_FORMS, checked for shape up front."""

    text: str  # as the user gave it (stripped)
    kind: SpecKind
    target: str  # what uv installs: the requirement, an absolute path or the URL
    name: str | None  # the distribution's canonical name, where the spec says it

    @classmethod
    def parse(cls, text: str) -> StackSpec:
        raw = text.strip()
        if not raw or "\n" in raw or raw.startswith("-"):
            raise UsageError(f"stack spec {text!r}: give one of {SPEC_FORMS}")
        scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
        if scheme.partition("+")[0] in VCS_SCHEMES and "+" in scheme:
            return _vcs_spec(raw)
        if scheme in ("http", "https", "file"):
            return _url_spec(raw)
        if NAMED_URL.match(raw) or not _looks_like_path(raw):
            try:
                requirement = Requirement(raw)
            except InvalidRequirement as exc:
                raise UsageError(
                    f"stack spec {raw!r} is not a pip requirement ({_first_line(str(exc))}); give one of {SPEC_FORMS}"
                ) from None
            if requirement.marker is not None:
                raise UsageError(f"stack spec {raw!r}: a stack spec takes no environment marker (; ...)")
            return cls(raw, "requirement", str(requirement), canonicalize_name(requirement.name))
        return _path_spec(raw)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class StackEnv:
    """An environment that runs the stack: its python, and what it imports, read from inside it."""

    python: Path  # bin/python of the environment (never resolved: the venv is this path)
    folder: Path  # the environment (sys.prefix of python)
    spec: StackSpec | None  # None: an environment the user gave (--stack-python)
    distribution: str | None  # the stack's distribution, where known
    versions: dict[str, str | None]  # the stack's distribution and WATCHED, as importlib.metadata sees them there
    conflicts: tuple[str, ...] = field(default=())  # uv pip check's findings when it was built


def build_stack_env(
    spec: StackSpec | str,
    cache_root: Path,
    wheelhouse: Path | None = None,
    base_python: Path | str = sys.executable,
) -> StackEnv:
    """The environment for spec under cache_root/stack-envs/, built once (uv) on top of base_python's
    environment (the harness's); a later call with the same key reuses it without calling uv."""
    spec = spec if isinstance(spec, StackSpec) else StackSpec.parse(spec)
    if wheelhouse is not None:
        wheelhouse = Path(os.path.abspath(Path(wheelhouse).expanduser()))
        if not wheelhouse.is_dir():
            raise UsageError(f"wheelhouse {wheelhouse} is not a folder")
    harness = _probe(Path(base_python), "describe", isolated=True, what=f"the harness interpreter {base_python}")
    folder = Path(cache_root).expanduser().absolute() / ENVS_DIR / _key(spec, harness, wheelhouse)
    what = f"the stack environment for {spec.text}"
    try:
        build_once(folder, lambda tmp: _build(tmp, spec, harness, wheelhouse, Path(base_python)), _no_check, what)
    except CacheError as exc:  # a cache that cannot be written: the message says what to delete
        raise UsageError(_first_line(str(exc))) from None
    record = json.loads((folder / RECORD).read_text())
    python = folder / "bin" / "python"
    names = ["-", *dict.fromkeys(filter(None, [record["distribution"], *WATCHED]))]
    seen = _probe(python, "inspect", names, isolated=True, what=what)
    return StackEnv(python, folder, spec, record["distribution"], seen["versions"], tuple(record["conflicts"]))


def external_python(path: Path | str) -> StackEnv:
    """--stack-python PATH: an environment the user already has; it must run and import the harness's
    worker code (the harness checkout goes on its PYTHONPATH, as for every job)."""
    python = Path(path).expanduser().absolute()  # not resolve(): a venv's python is a link out of the venv
    if not python.is_file() or not os.access(python, os.X_OK):
        raise UsageError(f"--stack-python {path}: no executable file there")
    seen = _probe(python, "inspect", ["harness", *WATCHED], isolated=False, what=f"--stack-python {path}")
    if tuple(seen["version_info"]) < (3, 11):
        raise UsageError(f"--stack-python {path} is Python {seen['python']}; the harness's worker code needs 3.11+")
    if seen["harness_error"]:
        raise UsageError(
            f"--stack-python {path} cannot import the harness's worker code ({seen['harness_error']}): "
            "install the harness's dependencies there, or give a stack spec instead"
        )
    return StackEnv(python, Path(seen["prefix"]), None, None, seen["versions"])


def uv_command() -> list[str]:
    """uv from the `uv` package beside the harness, else one on PATH; a missing uv is a UsageError."""
    try:
        import uv  # here, not at the top: a missing uv is a UsageError when a stack environment is built

        return [uv.find_uv_bin()]
    except (ImportError, FileNotFoundError, OSError):
        found = shutil.which("uv")
        if found:
            return [found]
    raise UsageError(f"stack environments are built with uv, which is not installed: {UV_INSTALL}")


def uv_problem(output: str) -> str:
    """The one most useful line of a failed uv command: the resolver's "Because ..." explanation, else
    its first error with the deepest detail (a build's or git's last line)."""
    lines = [_bare(line) for line in output.splitlines()]
    lines = [line for line in lines if line]
    because = next((line for line in lines if line.startswith("Because ")), None)
    if because:
        return because
    errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
    details = [
        line
        for line in lines
        if not line.startswith(("error:", "hint:", "warning:", "---", "[stderr]", "[stdout]", "Using Python"))
    ]
    head = errors[0] if errors else ""
    detail = details[-1] if details else ""
    if head and detail and detail not in head:
        return f"{head}: {detail}"
    return head or detail or "uv failed and said nothing"


# ---------------------------------------------------------------------------------------------- specs


def _looks_like_path(text: str) -> bool:
    """As pip reads it: a separator, a leading . or ~, an archive's name, or a source folder that exists here."""
    if "/" in text or text.startswith((".", "~")) or text.endswith((".whl", *SDIST_SUFFIXES)):
        return True
    return any(Path(text, marker).is_file() for marker in ("pyproject.toml", "setup.py"))


def _path_spec(raw: str) -> StackSpec:
    path = Path(os.path.abspath(Path(raw).expanduser()))
    if path.is_file():
        try:
            if path.name.endswith(".whl"):
                name = parse_wheel_filename(path.name)[0]
            elif path.name.endswith(SDIST_SUFFIXES):
                name = parse_sdist_filename(path.name)[0]
            else:
                raise UsageError(
                    f"stack spec {raw!r} is a file but neither a wheel (.whl) nor an sdist (.tar.gz, .zip)"
                )
        except (InvalidWheelFilename, InvalidSdistFilename) as exc:
            raise UsageError(f"stack spec {raw!r}: {_first_line(str(exc))}") from None
        return StackSpec(raw, "file", str(path), canonicalize_name(name))
    if path.is_dir():
        if not any((path / marker).is_file() for marker in ("pyproject.toml", "setup.py", "setup.cfg")):
            raise UsageError(f"stack spec {raw!r} is a folder with no pyproject.toml or setup.py: not a Python source")
        return StackSpec(raw, "folder", str(path), _project_name(path))
    raise UsageError(f"stack spec {raw!r}: no such file or folder ({path}); give one of {SPEC_FORMS}")


def _project_name(folder: Path) -> str | None:
    try:
        name = tomllib.loads((folder / "pyproject.toml").read_text())["project"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a setup.py project: the name is known once uv built it
    return canonicalize_name(name) if isinstance(name, str) else None


def _vcs_spec(raw: str) -> StackSpec:
    url = urlsplit(raw.split("+", 1)[1])
    if url.scheme not in ("https", "http", "ssh", "git", "file") or not (url.netloc or url.path.strip("/")):
        raise UsageError(f"stack spec {raw!r} is not a VCS URL such as git+https://host/owner/repo@ref")
    return StackSpec(raw, "vcs", raw, _egg_name(url.fragment))


def _url_spec(raw: str) -> StackSpec:
    url = urlsplit(raw)
    filename = url.path.rsplit("/", 1)[-1]
    if not (url.netloc or url.scheme == "file") or not filename.endswith((".whl", *SDIST_SUFFIXES)):
        raise UsageError(f"stack spec {raw!r}: a URL must name a wheel or an sdist (or use name @ URL)")
    try:
        name = parse_wheel_filename(filename)[0] if filename.endswith(".whl") else parse_sdist_filename(filename)[0]
    except (InvalidWheelFilename, InvalidSdistFilename) as exc:
        raise UsageError(f"stack spec {raw!r}: {_first_line(str(exc))}") from None
    return StackSpec(raw, "url", raw, canonicalize_name(name))


def _egg_name(fragment: str) -> str | None:
    names = parse_qs(fragment).get("egg")
    return canonicalize_name(names[0]) if names else None


def _source_digest(spec: StackSpec) -> str | None:
    """A local file's content, a source folder's files (path, size, mtime): an edit makes a new environment."""
    if spec.kind == "file":
        digest = hashlib.sha256()
        with open(spec.target, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    if spec.kind == "folder":
        digest = hashlib.sha256()
        for root, dirs, files in os.walk(spec.target):
            dirs[:] = sorted(
                d for d in dirs if not d.startswith(".") and d not in UNBUILT and not d.endswith(".egg-info")
            )
            for name in sorted(files):
                path = Path(root, name)
                stat = path.stat()
                digest.update(f"{path.relative_to(spec.target)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()
    return None


def _key(spec: StackSpec, harness: dict, wheelhouse: Path | None) -> str:
    canonical = spec.target if spec.kind != "requirement" else str(Requirement(spec.text))
    material = {
        "layout": LAYOUT,
        "spec": canonical,
        "source": _source_digest(spec),
        "python": harness["python"],
        "executable": harness["executable"],
        "harness": str(REPO_ROOT),
        "site": harness["site"],
        "provides": harness["dists"],
        "wheelhouse": str(wheelhouse) if wheelhouse else None,
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]
    label = spec.text if spec.kind == "requirement" else Path(urlsplit(spec.target).path).name
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", label).strip("._")[:48] or "stack"
    return f"{slug}-{digest}"


# --------------------------------------------------------------------------------------------- build


def _no_check(tmp: Path) -> None:
    """build_once's verification: _build checks the environment itself, and raises UsageError, one line."""


def _build(tmp: Path, spec: StackSpec, harness: dict, wheelhouse: Path | None, base_python: Path) -> None:
    started, outcome = time.monotonic(), "failed"
    uv = uv_command()
    print(f"building the stack environment for {spec.text} (uv) ...", end="", file=sys.stderr, flush=True)
    try:
        venv = ["venv", "--quiet", "--relocatable", "--no-python-downloads", "--python", str(base_python), str(tmp)]
        _run_uv(uv, venv, spec, tmp.parent)
        python = tmp / "bin" / "python"
        site_dir = tmp / harness["venv_purelib"]  # where a venv of this interpreter keeps its packages
        mirror = [str(site_dir), STUB_INSTALLER]
        _probe(Path(base_python), "stub", mirror, isolated=True, what=f"the harness interpreter {base_python}")
        (site_dir / PTH_NAME).write_text(_pth_text(harness["site"]))
        index = ["--no-index", "--find-links", str(wheelhouse)] if wheelhouse else []
        installed = _run_uv(
            uv, ["pip", "install", "--python", str(python), *index, "--", spec.target], spec, tmp.parent
        )
        own = [line.strip()[2:] for line in installed.splitlines() if line.startswith(" + ")]
        distribution = spec.name or _installed_name(own)
        checked = _run_uv(uv, ["pip", "check", "--python", str(python)], spec, tmp.parent, allowed=(0, 1))
        conflicts = [line.replace("`", "") for line in checked.splitlines() if line.startswith("The package ")]
        _write_launchers(tmp / "bin", site_dir)
        names = ["harness", *([distribution] if distribution else [])]
        seen = _probe(python, "inspect", names, isolated=True, what=f"the stack environment for {spec.text}")
        if seen["harness_error"]:
            raise UsageError(
                f"the stack environment for {spec.text} cannot import the harness's worker code "
                f"({seen['harness_error']}): the stack replaces a package the harness needs"
            )
        _check_path_order(seen["path"], site_dir, harness["site"], spec)
        if distribution and seen["versions"].get(distribution) is None:
            raise UsageError(
                f"the stack environment for {spec.text} does not hold {distribution} after uv installed it"
            )
        record = {
            "spec": spec.text,
            "distribution": distribution,
            "installed": own,  # what the environment holds of its own; the rest is the harness's
            "conflicts": conflicts,
            "build_s": round(time.monotonic() - started, 1),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        summary = ", ".join(own[:4]) + (f" and {len(own) - 4} more" if len(own) > 4 else "")
        outcome = f"its own: {summary or 'nothing, the harness environment satisfies it'}"
        if conflicts:
            outcome += f"; {len(conflicts)} conflict(s) with the harness environment: {conflicts[0]}"
    finally:
        print(f" {time.monotonic() - started:.1f} s; {outcome}", file=sys.stderr, flush=True)


def _check_path_order(path: list[str], own: Path, harness_site: Sequence[str], spec: StackSpec) -> None:
    """The environment's own site-packages, then the harness checkout and the harness's site-packages."""
    real = [os.path.realpath(entry) for entry in path]
    wanted = [os.path.realpath(own), str(REPO_ROOT.resolve()), *(os.path.realpath(entry) for entry in harness_site)]
    positions = [real.index(entry) if entry in real else -1 for entry in wanted]
    if -1 in positions or positions[0] > min(positions[1:]):
        raise UsageError(
            f"the stack environment for {spec.text} does not see its own packages before the harness's "
            f"(sys.path there: {', '.join(path)})"
        )


def _installed_name(own: list[str]) -> str | None:
    """The distribution uv installed from a direct reference (`+ name==1.0 (from file:///...)`)."""
    for line in own:
        if " (from " in line:
            return canonicalize_name(re.split(r"[=\s]", line, maxsplit=1)[0])
    return None


def _pth_text(harness_site: Sequence[str]) -> str:
    """Appended after the environment's own site-packages: the harness checkout, then the harness's
    site-packages (their .pth files processed too)."""
    return "".join([f"{REPO_ROOT}\n", *(f"import site; site.addsitedir({path!r})\n" for path in harness_site)])


LAUNCHER = """#!/bin/sh
'''exec' "$(dirname -- "$(realpath -- "$0")")"/'python' "$0" "$@"
' '''
# {dist}'s {name}, from the harness environment, run by this environment's python (harness.runtime.stack_env)
import sys
from {module} import {head}
if __name__ == "__main__":
    sys.exit({attr}())
"""
ENTRY_POINT = re.compile(r"^(?P<module>[\w.]+)\s*:\s*(?P<attr>[\w.]+)\s*(\[.*\])?$")


def _write_launchers(bin_dir: Path, site_dir: Path) -> None:
    """bin/<script> for each console script of a harness distribution the stack did not replace."""
    for info in sorted(site_dir.glob("*.dist-info")):
        if not _is_stub(info) or not (info / "entry_points.txt").is_file():
            continue
        parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
        parser.optionxform = str
        try:
            parser.read_string((info / "entry_points.txt").read_text())
        except configparser.Error:
            continue
        for group in ("console_scripts", "gui_scripts"):
            for name, value in parser.items(group) if parser.has_section(group) else []:
                match = ENTRY_POINT.match(value.strip())
                script = bin_dir / name
                if not match or not re.fullmatch(r"[\w.-]+", name) or script.exists():
                    continue
                attr = match["attr"]
                dist = info.name.removesuffix(".dist-info")
                head = attr.split(".")[0]
                script.write_text(LAUNCHER.format(dist=dist, name=name, module=match["module"], head=head, attr=attr))
                script.chmod(0o755)


def _is_stub(info: Path) -> bool:
    try:
        return (info / "INSTALLER").read_text().strip() == STUB_INSTALLER
    except OSError:
        return False


def _run_uv(uv: list[str], args: list[str], spec: StackSpec, cwd: Path, allowed: tuple[int, ...] = (0,)) -> str:
    """uv, its stderr and stdout together; a failure is a UsageError with its one most useful line. cwd:
    the cache, so that no project's uv.toml or pyproject.toml settings apply."""
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("VIRTUAL_ENV", None)  # --python names the environment: never the caller's activated one
    proc = subprocess.run([*uv, *args], capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode not in allowed:
        raise UsageError(f"cannot build the stack environment for {spec.text}: {uv_problem(proc.stderr + proc.stdout)}")
    return proc.stderr + proc.stdout


# --------------------------------------------------------------------------------------------- probe

# Runs in the harness interpreter (describe, stub) or in a stack environment (inspect): stdlib only.
PROBE = r"""
import importlib.metadata as md, json, os, platform, re, site, sys, sysconfig

def canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def site_dirs():
    seen, dirs = set(), []
    for path in site.getsitepackages():
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in seen:
            seen.add(real)
            dirs.append(path)
    return dirs

def first_dists(dirs):
    found = {}
    for dist in md.distributions(path=dirs):
        name = dist.metadata["Name"]
        if name and canon(name) not in found:
            found[canon(name)] = (name, dist)
    return found

mode, args = sys.argv[1], sys.argv[2:]
if mode == "describe":
    dirs = site_dirs()
    dists = sorted(canon(name) + "==" + str(dist.version) for name, dist in first_dists(dirs).values())
    venv_purelib = os.path.relpath(sysconfig.get_path("purelib", "venv", vars={"base": "/", "platbase": "/"}), "/")
    out = {"python": sys.version, "executable": sys.executable, "site": dirs, "dists": dists,
           "venv_purelib": venv_purelib}
elif mode == "stub":
    target, installer = args
    for key, (name, dist) in sorted(first_dists(site_dirs()).items()):
        if key == "sft-harness":
            continue
        info = os.path.join(target, re.sub(r"[-_.]+", "_", name) + "-" + dist.version + ".dist-info")
        files = {"METADATA": dist.read_text("METADATA")}
        if files["METADATA"] is None:  # an .egg-info: PKG-INFO and requires.txt
            lines = ["Metadata-Version: 2.1", "Name: " + name, "Version: " + dist.version]
            files["METADATA"] = "\n".join(lines + ["Requires-Dist: " + r for r in dist.requires or []]) + "\n"
        for extra in ("WHEEL", "entry_points.txt", "top_level.txt"):
            text = dist.read_text(extra)
            if text is not None:
                files[extra] = text
        files.setdefault("WHEEL", "Wheel-Version: 1.0\nGenerator: sft-harness\nRoot-Is-Purelib: true\n")
        files["INSTALLER"] = installer + "\n"
        os.makedirs(info, exist_ok=True)
        for filename, text in files.items():
            with open(os.path.join(info, filename), "w", encoding="utf-8") as handle:
                handle.write(text)
        record = "".join(os.path.basename(info) + "/" + f + ",,\n" for f in [*files, "RECORD"])
        with open(os.path.join(info, "RECORD"), "w", encoding="utf-8") as handle:
            handle.write(record)
    out = {}
elif mode == "inspect":  # args: "harness" (import the worker code) or "-", then distribution names
    versions, error = {}, None
    for name in args[1:]:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    if args[0] == "harness":
        try:
            import harness.contract.records
        except BaseException as exc:
            error = (type(exc).__name__ + ": " + str(exc)).splitlines()[0]
    out = {"python": platform.python_version(), "version_info": list(sys.version_info[:2]), "prefix": sys.prefix,
           "purelib": sysconfig.get_path("purelib"), "versions": versions, "harness_error": error,
           "path": sys.path}
print("\n" + json.dumps(out))
"""


def _probe(python: Path, mode: str, args: Sequence[str] = (), *, isolated: bool, what: str) -> dict:
    """PROBE in python: isolated (-I, for the harness and a built environment: what they hold, never the
    caller's PYTHONPATH) or as a job runs it (the harness checkout on PYTHONPATH)."""
    env = {**os.environ}
    if not isolated:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    flags = ["-I", "-B"] if isolated else ["-B"]
    try:
        proc = subprocess.run(
            [str(python), *flags, "-c", PROBE, mode, *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT if not isolated else None,
            timeout=PROBE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"{what} does not run: {_first_line(str(exc))}") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        problem = _last_line(proc.stderr) or f"exit status {proc.returncode}"
        raise UsageError(f"{what} does not run as Python ({problem})")
    return json.loads(lines[-1])


def _bare(line: str) -> str:
    return line.strip().lstrip("×╰─▶├│ ").removeprefix("cause:").strip()


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
