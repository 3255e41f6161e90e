"""Stop requests: Ctrl-C, and the SIGTERM or SIGHUP a scheduler or a closed terminal sends (Slurm at a
job's time limit and on preemption), all end a run the same way: the running job's processes are
ended, that model is INTERRUPTED, the rest NOT RUN, and the run's reports are written.

    with stop_on_signals():       # the sweep: any of them raises Interrupted where the parent is
        ...
    with signals_deferred():      # the reports: a signal now is noted, the files are finished first
        ...
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class Interrupted(KeyboardInterrupt):
    """A stop asked of the whole run; a KeyboardInterrupt, so code that handles Ctrl-C handles it too."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(STOP_SIGNALS.get(signum, f"signal {signum}"))
        self.signum = signum

    @classmethod
    def named(cls, words: str | None) -> Interrupted:
        """The Interrupted whose words() are these (a job's outcome keeps the name only)."""
        return cls(next((signum for signum, name in STOP_SIGNALS.items() if name == words), signal.SIGINT))

    @property
    def words(self) -> str:
        return str(self)

    @property
    def exit_code(self) -> int:
        """What a shell reports for a command a signal ended: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP."""
        return 128 + self.signum


def as_interrupted(error: KeyboardInterrupt) -> Interrupted:
    """Python's own Ctrl-C (a plain KeyboardInterrupt) as an Interrupted."""
    return error if isinstance(error, Interrupted) else Interrupted(signal.SIGINT)


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def _note_late_signal(signum, frame) -> None:
    print(
        f"{STOP_SIGNALS.get(signum, signum)}: the run is already stopping; its reports are being written",
        file=sys.stderr,
        flush=True,
    )


@contextmanager
def _handlers(handler):
    # A signal the caller ignores stays ignored: `nohup` (SIGHUP) and a shell's `cmd &` (SIGINT) mean it.
    wanted = [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, handler) for signum in wanted}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def stop_on_signals():
    """Each stop signal raises Interrupted in the main thread, wherever the parent is."""
    return _handlers(_raise_interrupted)


def signals_deferred():
    """A stop signal while the run's reports are written is noted, not raised: the files come first."""
    return _handlers(_note_late_signal)
