"""Atomic file writes: nothing a user had is lost if a write is interrupted.

Every file noisecraft writes goes through :func:`atomic_path`: the content is
written to a temporary file in the same directory, flushed, and renamed over
the target in one ``os.replace`` (atomic on POSIX and Windows). A folder (a
diffusers model) is written the same way by :func:`atomic_folder`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from noisecraft.errors import OutputError, OutputExistsError
from noisecraft.io.write_errors import folder_problem, output_error


def check_writable(path: str | os.PathLike, *, overwrite: bool, folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: an existing one unless
    ``overwrite`` is set; a folder where a file goes (a file where a ``folder`` goes); a
    parent that is a file; a folder (existing, or the one it would be created in) that is
    read-only, not writable or on a full disk. Creates nothing."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file; give a folder path")
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path} exists; pass @overwrite to replace it or choose another path",
            settings=["overwrite"],
        )
    if path.is_dir() and not folder:
        raise OutputError(f"{path} is a folder; give a file name")
    problem = folder_problem(path.parent)
    if problem is not None:
        raise output_error(path, problem)
    return path


def free_path(path: str | os.PathLike) -> Path:
    """``path`` if it does not exist, else the first free ``stem_2.ext``, ``stem_3.ext``, ..."""
    path = Path(path)
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1
    return candidate


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 (and so does safetensors' save_file, which replaces the file):
        # give the result the mode a plain open() would, after the writer is done
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path``, renamed onto ``path`` on success.

    A directory cannot be renamed over a non-empty one, so an existing ``path`` is first
    moved aside, then removed once the new folder is in place (restored if that fails).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a plain mkdir would not
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "folder")
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old / "folder", path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


#: Names of :func:`atomic_path` / :func:`atomic_folder` temporaries: ``.<name>.<8 random
#: characters of tempfile's alphabet>.tmp`` (a file or a folder) and ``.<name>.<...>.old``
#: (the folder an :func:`atomic_folder` moved aside).
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.(?P<kind>tmp|old)$")


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that an interrupted :func:`atomic_path` / :func:`atomic_folder`
    left in ``folder`` (a ``kill -9`` skips their clean-up); return what was removed.

    Only names of our own pattern are touched, never a user's file. A ``.old`` folder holds
    the previous version of a folder that was being replaced: if the new one never arrived
    (the kill came between the two renames), it is moved back instead of removed. Call this
    only where no other process is writing (e.g. a run directory held by its trainer).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed: list[Path] = []
    entries = sorted(folder.iterdir(), key=lambda p: p.name.endswith(".tmp"))  # .old first
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m is None or entry.is_symlink():
            continue
        target = folder / m["target"]
        if m["kind"] == "old":
            if not entry.is_dir():
                continue
            saved = entry / "folder"
            if saved.exists() and not target.exists():
                os.replace(saved, target)  # the replacement never landed: restore the old one
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
