"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM.

While :meth:`Trainer.train <noisecraft.training.trainer.Trainer.train>` runs, the first
SIGINT or SIGTERM only sets a flag (:class:`StopRequest`): the current step finishes, every
DDP process agrees to stop after the same step, a checkpoint is written (atomically, as
always) and :class:`TrainingInterrupted` is raised, which the command line turns into the
command that resumes the run and exit code ``128 + signal`` (130 for Ctrl-C, 143 for
SIGTERM). A second signal (half a second or more after the first, in a single process)
raises :class:`KeyboardInterrupt` at once: an atomic write in progress is abandoned and the
previous checkpoint stays. Under torchrun a Ctrl-C reaches each worker twice (from the
terminal and forwarded by the launcher, which kills its workers itself after a timeout), so
there a repeated signal is ignored.

:func:`debug_pause` is a test hook: the kill test sets ``NOISECRAFT_DEBUG_PAUSE`` to stop a
real training process at a named point of a checkpoint write (then kills it there).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal after saving a checkpoint at ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; saved {checkpoint}"
        )

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal: ``128 + signum``."""
        return 128 + self.signum


class StopRequest:
    """Within ``with StopRequest() as stop:``, SIGINT / SIGTERM set ``stop.signum`` instead of
    ending the process; with ``escalate``, a second one at least ``grace`` seconds later raises
    :class:`KeyboardInterrupt`. Handlers are only installed in the main thread (Python
    delivers signals there); elsewhere this is inert."""

    def __init__(self, escalate: bool = True, grace: float = 0.5) -> None:
        self.signum: int | None = None
        self.escalate = escalate
        self.grace = grace
        self._first = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()
        elif self.escalate and time.monotonic() - self._first >= self.grace:
            raise KeyboardInterrupt

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; default
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()


def debug_pause(point: str, step: int) -> None:
    """Test hook: with ``NOISECRAFT_DEBUG_PAUSE=<point>@<step>`` (comma-separated for
    several), announce ``debug-pause <point> <step>`` on stderr and sleep until killed."""
    wanted = os.environ.get("NOISECRAFT_DEBUG_PAUSE")
    if not wanted or f"{point}@{step}" not in wanted.split(","):
        return
    sys.stderr.write(f"debug-pause {point} {step}\n")
    sys.stderr.flush()
    while True:
        time.sleep(60)


__all__ = ["STOP_SIGNALS", "StopRequest", "TrainingInterrupted", "debug_pause"]
