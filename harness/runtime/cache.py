"""The one way the harness builds a cache entry (a folder under cache_dir()): once, checked, never trusted half-written.

    folder = build_once(target, build=write_into, verify=check_folder, what="tiny checkpoint of gemma-3-4b-it")

- One writer: an exclusive fcntl lock on `.<name>.lock` beside target; other processes wait on it,
  then find the entry complete.
- build(tmp) writes into a temp folder beside target, verify(tmp) must accept it, then a `.complete`
  marker holding a manifest (every file's relative path and size) is written and tmp is renamed to
  target. A build that wrote nothing usable raises CacheError and publishes nothing.
- Reuse checks the manifest (one stat per file): an entry that lost or truncated a file, or has no
  marker (a killed run, an older harness), is removed and rebuilt, with one line on stderr.
- An entry that cannot be rebuilt (a read-only cache) is refused with a CacheError naming what to delete.

Torch-free: the builders and verifiers that need torch or transformers are passed in.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

MARKER = ".complete"


class CacheError(RuntimeError):
    """A cache entry could not be built, or a broken one not rebuilt; the message says what to do.

    Not a UsageError (the CLI's exit 2, "fix your input"): the user's input is fine. Caches are built
    inside the training job, which records any exception as the job's error and FAILs it; the message
    is what the user acts on. Verifiers raise it with the problem as a phrase ("wrote no config.json").
    """


def build_once(target: Path, build: Callable[[Path], None], verify: Callable[[Path], None], what: str) -> Path:
    """target, built by build(tmp) and accepted by verify(tmp) exactly once across processes."""
    target = Path(target)
    if entry_problem(target) is None:  # a complete entry never changes: reading it needs no lock (nor write access)
        return target
    with _exclusive_lock(target, what):
        problem = entry_problem(target)
        if problem is None:  # another process built it while this one waited
            return target
        _clear(target, what, problem)
        _build_verified(target, build, verify, what)
    return target


def entry_problem(target: Path) -> str | None:
    """None when target is complete with every manifest file at its recorded size, else why not."""
    if not target.is_dir():
        return "absent"
    try:
        files = json.loads((target / MARKER).read_text())["files"]
        expected = {str(name): int(size) for name, size in files.items()}
    except FileNotFoundError:
        return f"no {MARKER} marker"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # an older marker ("ok") or garbage
        return f"unreadable {MARKER} marker"
    for name, size in expected.items():
        try:
            actual = (target / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, not the {size} it was built with"
    return None if expected else f"{MARKER} lists no files"


@contextmanager
def _exclusive_lock(target: Path, what: str):
    lock_path = target.parent / f".{target.name}.lock"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a")  # "a": never truncates what another process holds
    except OSError as exc:
        raise _cannot_rebuild(target, what, f"cannot create the lock {lock_path}: {exc}") from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes, also if this process dies
        yield


def _clear(target: Path, what: str, problem: str) -> None:
    """Remove a broken entry and temp folders that killed builds left (the lock says none is running)."""
    leftovers = sorted(target.parent.glob(f".{target.name}.tmp-*"))
    if target.exists():
        print(f"cache: {what} at {target} was incomplete ({problem}); rebuilding it", file=sys.stderr, flush=True)
        leftovers.append(target)
    for path in leftovers:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            raise _cannot_rebuild(target, what, f"{problem}; removing {path} failed: {exc}") from exc


def _build_verified(target: Path, build: Callable[[Path], None], verify: Callable[[Path], None], what: str) -> None:
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as exc:
        raise _cannot_rebuild(target, what, f"cannot write in {target.parent}: {exc}") from exc
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache's entry from its other users
        build(tmp)  # the builder's own errors (a missing package, a bad config) pass through as they are
        _verify(tmp, verify, what)
        _write_manifest(tmp, what)
        os.rename(tmp, target)  # atomic: a folder named target is complete or a leftover _clear removes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verify(tmp: Path, verify: Callable[[Path], None], what: str) -> None:
    try:
        verify(tmp)
    except CacheError as exc:
        raise CacheError(f"the build of {what} {exc}; nothing was cached") from exc
    except Exception as exc:  # transformers/datasets raise many kinds when a folder does not load back
        raise CacheError(
            f"the build of {what} does not load back ({type(exc).__name__}: {exc}); nothing was cached"
        ) from exc


def _write_manifest(folder: Path, what: str) -> None:
    files = {
        path.relative_to(folder).as_posix(): path.stat().st_size for path in sorted(folder.rglob("*")) if path.is_file()
    }
    # RANK (torchrun's) and pid say who built it: the fresh-cache test checks that the losing rank did.
    built_by = {"pid": os.getpid(), "rank": os.environ.get("RANK")}
    (folder / MARKER).write_text(json.dumps({"what": what, "built_by": built_by, "files": files}, indent=1))


def _cannot_rebuild(target: Path, what: str, why: str) -> CacheError:
    return CacheError(
        f"{what} at {target} cannot be (re)built here ({why}): delete {target} and run again "
        f"with write access to {target.parent}"
    )


def built_by(target: Path) -> dict:
    """Who built a complete entry: {"pid": ..., "rank": torchrun's RANK or None}."""
    return json.loads((Path(target) / MARKER).read_text())["built_by"]
