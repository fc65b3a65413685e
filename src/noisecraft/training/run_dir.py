"""The run directory's housekeeping: checks before training, a lock, and repairs after a kill.

* :func:`check_run_dir` -- before anything is built: ``run.dir`` is (or can become) a folder
  this process can write to (a read-only folder fails now, not at the first checkpoint).
* :class:`RunLock` -- one training process per run directory (``flock`` on the folder itself,
  so nothing is left behind; released by the kernel when the process dies, even by
  ``kill -9``).
* :func:`leftover_without_checkpoint` -- a run stopped before its first checkpoint leaves only
  files the trainer writes again; such a folder is started over instead of refused.
* :func:`truncate_log` -- ``log.csv`` keeps the rows up to the step a run resumes from (rows
  of steps after the last checkpoint are written again by the resumed run).
* :func:`torch_save` / :func:`write_failure` -- a failed write (full disk, read-only folder)
  becomes one :class:`~noisecraft.errors.OutputError` line that names the file and the cause.

Temporaries of interrupted atomic writes are removed with
:func:`noisecraft.io.atomic.remove_stale_temps`.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from noisecraft.errors import ConfigError, OutputError
from noisecraft.io.atomic import atomic_path
from noisecraft.io.write_errors import errno_of

#: What a run directory holds that the trainer writes again when a run starts over.
RESTARTABLE = frozenset({"config.json", "log.csv", "samples"})
_SAMPLE = re.compile(r"^step_\d+\.png$")
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.(tmp|old)$")


def check_run_dir(path: Path) -> None:
    """Refuse a ``run.dir`` that is a file, lies below a file, or cannot be written to."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"run.dir {path} is a file, not a folder; set run.dir to a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(
            f"run.dir {path} cannot be created: {existing} is a file; set run.dir to a folder"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = f"run.dir {path}" if existing == path else f"{existing} (where run.dir {path} goes)"
        raise OutputError(
            f"{what} is not writable ({e.strerror or e}); choose another run.dir or make it "
            "writable"
        ) from None


class RunLock:
    """An exclusive, non-blocking ``flock`` on the run directory (a no-op without ``fcntl``).

    Entering raises :class:`ConfigError` when another process holds it.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise ConfigError(
                    f"run directory {self.path} is in use by another training process; "
                    "wait for it to finish or set run.dir to another folder"
                ) from None
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def leftover_without_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds only what a run that never reached a checkpoint writes
    (``config.json``, ``log.csv``, ``samples/step_N.png``, temporaries)."""
    for entry in path.iterdir():
        if _TEMP.match(entry.name):
            continue
        if entry.name not in RESTARTABLE or entry.is_symlink():
            return False
        if entry.name == "samples":
            if not entry.is_dir():
                return False
            for f in entry.iterdir():
                if not (_SAMPLE.match(f.name) or _TEMP.match(f.name)) or not f.is_file():
                    return False
        elif not entry.is_file():
            return False
    return True


def truncate_log(path: Path, step: int, header: list[str]) -> int:
    """Keep the header and the complete rows of steps ``<= step`` of the CSV log ``path``
    (rewritten atomically; written with ``header`` when missing). Returns the rows dropped."""
    head = ",".join(header) + "\n"
    if not path.is_file():
        with atomic_path(path) as tmp:
            tmp.write_text(head)
        return 0
    text = path.read_text(errors="replace")
    lines = text.splitlines(keepends=True)
    if not lines or not lines[0].endswith("\n"):
        lines = [head]
    kept = [lines[0]]
    for line in lines[1:]:
        first = line.split(",", 1)[0]
        if line.endswith("\n") and first.isdigit() and int(first) <= step:
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped or "".join(kept) != text:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept))
    return dropped


class _RecordingWriter:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write: torch reports
    it only as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``."""

    def __init__(self, f, on_first_write: Callable[[], None] | None = None):
        self.f = f
        self.error: OSError | None = None
        self._hook = on_first_write

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        if self._hook is not None:
            hook, self._hook = self._hook, None
            self.f.flush()
            hook()
        return n

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj: Any, path: Path, on_first_write: Callable[[], None] | None = None) -> None:
    """``torch.save(obj, path)`` that raises the ``OSError`` of a failed write (full disk).
    ``on_first_write``: called once after the first chunk is on disk (the kill test's hook)."""
    import torch

    with open(path, "wb") as f:
        writer = _RecordingWriter(f, on_first_write)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def write_failure(path: Path, error: BaseException, kept_step: int | None) -> OutputError:
    """The one-line error for a write of ``path`` that failed with ``error`` (an ``OSError``,
    or a ``SafetensorError`` that carries "os error N"); ``kept_step``: the step of the
    checkpoint on disk, which the atomic write left as it was."""
    code = errno_of(error)
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        reason = os.strerror(code) if code else " ".join(str(error).split())[:200]
    kept = f"the checkpoint of step {kept_step} is intact; " if kept_step else ""
    return OutputError(
        f"could not write {path} ({reason}); {kept}free disk space or make {path.parent} "
        "writable, then train again to resume"
    )


__all__ = [
    "RESTARTABLE",
    "RunLock",
    "check_run_dir",
    "leftover_without_checkpoint",
    "torch_save",
    "truncate_log",
    "write_failure",
]
