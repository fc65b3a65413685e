"""Outputs that cannot be written, found before the work and answered in one line.

A read-only or full disk, a folder without write permission or a parent that is a file
surface as ``PermissionError``, ``OSError(ENOSPC)`` or safetensors' ``SafetensorError``
from deep inside a writer. :func:`folder_problem` finds them before any work (used by
:func:`noisecraft.io.atomic.check_writable`); :func:`writing` turns those that happen anyway
(the disk fills up during the write) into an :class:`~noisecraft.errors.OutputError` that
names the file, and removes the folders the failed write created. The temporary file itself
is removed by :func:`~noisecraft.io.atomic.atomic_path`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from noisecraft.errors import OutputError

#: what to do, by errno ("cannot write PATH: <this>")
_ADVICE = {
    errno.EACCES: "permission denied in {folder}; choose a folder you can write to",
    errno.EPERM: "permission denied in {folder}; choose a folder you can write to",
    errno.EROFS: "{folder} is on a read-only file system; choose another folder",
    errno.ENOSPC: "no space left on the disk of {folder}; free some space or choose another disk",
    errno.EDQUOT: "the disk quota of {folder} is used up; free some space or choose another disk",
    errno.EFBIG: "the file is too large for the file system of {folder}; choose another disk",
    errno.ENOTDIR: "a part of {folder} is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file name",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
}


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` or its closest ancestor that exists (what a write would have to create in)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def output_error(path: str | os.PathLike, code: int | None, detail: str = "") -> OutputError:
    """The one-line error for writing ``path`` failing with errno ``code``."""
    folder = nearest_existing(Path(path).parent)
    advice = _ADVICE.get(code or -1)
    if advice is None:
        reason = detail or (os.strerror(code) if code else "unknown error")
        advice = f"{reason}; choose another path"
    return OutputError(f"cannot write {path}: {advice.format(folder=folder)}")


def folder_problem(folder: str | os.PathLike) -> int | None:
    """The errno a file created in ``folder`` (existing, or to be created) would fail with:
    ENOTDIR (its nearest existing ancestor is a file), EROFS, EACCES, ENOSPC; None if fine.
    Nothing is created."""
    base = nearest_existing(folder)
    if not base.is_dir():
        return errno.ENOTDIR
    if hasattr(os, "statvfs"):
        st = os.statvfs(base)
        if st.f_flag & os.ST_RDONLY:
            return errno.EROFS
        # root may write into the blocks reserved for it (f_bfree), others only f_bavail
        root = hasattr(os, "geteuid") and os.geteuid() == 0
        if (st.f_bfree if root else st.f_bavail) == 0:
            return errno.ENOSPC
    if not os.access(base, os.W_OK | os.X_OK):
        return errno.EACCES
    return None


def errno_of(e: BaseException) -> int | None:
    """The errno of an ``OSError``, or of the OS error safetensors wraps in its own; None."""
    if isinstance(e, OSError):
        return e.errno
    m = re.search(r"os error (\d+)|code: (\d+)", str(e))  # safetensors' Rust io::Error
    return int(m.group(1) or m.group(2)) if m else None


def _is_write_error(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno is not None
    return type(e).__name__ == "SafetensorError" and errno_of(e) is not None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Around the write of ``path``: an OS error (or safetensors' wrapping of one) becomes an
    :class:`OutputError` naming ``path``, and folders created for it are removed again."""
    path = Path(path)
    existed = nearest_existing(path.parent)
    try:
        yield
    except BaseException as e:
        _remove_created_folders(path.absolute().parent, existed)
        if _is_write_error(e):
            raise output_error(path, errno_of(e), str(getattr(e, "strerror", "") or "")) from e
        raise


@contextlib.contextmanager
def new_outputs_removed_on_error(*paths: str | os.PathLike) -> Iterator[None]:
    """Around a command that writes several outputs: if it fails (or is interrupted) after
    writing some, remove those of ``paths`` that did not exist before, so a failed run leaves
    no half set behind (a grid without its GIF). Outputs that existed are not touched."""
    new = [Path(p) for p in paths if not os.path.lexists(p)]
    try:
        yield
    except BaseException:
        for p in new:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                p.unlink()
        raise


def _remove_created_folders(folder: Path, existed: Path) -> None:
    """Remove the empty folders below ``existed`` on the way to ``folder``."""
    while folder != existed and existed in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


__all__ = [
    "errno_of",
    "folder_problem",
    "nearest_existing",
    "new_outputs_removed_on_error",
    "output_error",
    "writing",
]
