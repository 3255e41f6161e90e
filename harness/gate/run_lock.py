"""One run at a time writes into a run folder.

Two runs given the same --output-dir and --run-id (or a --resume of a folder still being written)
would interleave metrics and overwrite each other's results. The first holds an exclusive lock on
RUN_DIR/.lock for as long as it writes; a second refuses at once with exit 2, naming the holder. The
kernel drops the lock when its holder dies, however it dies, so a killed run never blocks the next.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.contract.errors import UsageError

LOCK_FILE = ".lock"
NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)


@contextmanager
def run_folder_locked(run_dir: Path) -> Iterator[Path]:
    """Hold RUN_DIR/.lock while the body runs; UsageError if another live process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError as error:
        raise UsageError(f"{run_dir} is not writable ({error.strerror}); give a run folder you can write") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            raise UsageError(
                f"{run_dir} is being written by another run ({holder}); wait for it to end, "
                "or give another --run-id or --output-dir"
            ) from None
        except OSError as error:  # a file system without locks (Lustre without -o flock, NFS with nolock)
            if error.errno not in NO_LOCKS:
                raise
            print(
                f"warning: {run_dir} cannot be locked here ({error.strerror}); a second run into it would not be "
                "refused",
                file=sys.stderr,
            )
            yield run_dir
            return
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0
        )
        yield run_dir
    finally:
        os.close(fd)  # closing releases the lock; the file stays (removing it would race a new holder)
