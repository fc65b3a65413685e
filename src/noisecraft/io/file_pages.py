"""Drop a memory-mapped file's pages from the process once its tensors have been copied.

``safetensors`` (``safe_open`` / ``load_file``) and ``torch.load(..., mmap=True)`` (zip
``.ckpt`` / ``.pt``) hand out tensors that are views of a *private* file mapping of the whole
file. Each page counts in the process's RSS (``RssFile``) from the first read until the
mapping goes, and the mapping lives as long as any tensor of the file does. A load that
converts the weights (float16 file -> float32 or bfloat16 model, or a copy to another device)
reads every page, so without help it peaks at the file's size plus the converted weights:
6.78 GB for SD 1.5's 2.13 GB float16 file widened to 4.26 GB of float32 weights
(docs/performance.md).

:class:`FilePages` drops the resident pages lying wholly inside one tensor with
``madvise(addr, len, MADV_DONTNEED)`` (madvise(2)): for a private file mapping whose pages
were never written, the page-table entries go and RSS falls; the page cache keeps the data,
and a later read of those addresses faults the file's bytes back in, so the tensor stays
valid. A page that *was* written (copy-on-write) would revert to the file's content, so only
tensors whose data has just been copied elsewhere are released (:meth:`FilePages.
release_copied`); pages shared with a neighbouring tensor are left alone. Converting tensor by
tensor and releasing each source then peaks at the converted weights plus about one tensor.

Linux only: the mappings are read from ``/proc/self/maps`` and ``MADV_DONTNEED`` is taken
from Python's :mod:`mmap` module; where either is missing, or the C library has no
``madvise``, every call is a no-op (:func:`page_release_supported`). Anonymous memory (a
tensor already copied out of the file, a legacy non-zip ``.ckpt``) is never touched.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from typing import Any

from torch import Tensor


@functools.cache
def _madvise() -> tuple[Any, int] | None:
    """libc's ``madvise`` and Linux's ``MADV_DONTNEED``, or None where they are unusable."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if not sys.platform.startswith("linux") or advice is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn, advice


def page_release_supported() -> bool:
    """True where :class:`FilePages` can drop pages (Linux with ``madvise`` and
    ``/proc/self/maps``); elsewhere its calls do nothing."""
    if _madvise() is None:
        return False
    try:
        with open("/proc/self/maps"):
            return True
    except OSError:
        return False


def private_file_mappings() -> list[tuple[int, int]]:
    """``(start, end)`` of this process's private file-backed mappings (``/proc/self/maps``:
    a path and a ``p`` permission flag; how safetensors and ``torch.load(mmap=True)`` map a
    file). Empty where ``/proc`` is not there."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or not parts[5].startswith("/") or not parts[1].endswith("p"):
                    continue
                start, end = (int(v, 16) for v in parts[0].split("-"))
                ranges.append((start, end))
    except OSError:
        return []
    return ranges


class FilePages:
    """Releases the file pages of tensors that live in a private file mapping.

    The mappings are read once, at the first tensor that might need it (after the files
    being converted are mapped). ``released`` counts the bytes dropped."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] | None = None
        self.released = 0

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The private file mappings seen by this releaser (read on first use)."""
        if self._ranges is None:
            self._ranges = private_file_mappings() if _madvise() is not None else []
        return self._ranges

    def in_file(self, t: Tensor) -> bool:
        """Whether ``t``'s data lies inside one private file mapping."""
        if t.device.type != "cpu" or t.numel() == 0:
            return False
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        return any(lo <= start and end <= hi for lo, hi in self.ranges)

    def __call__(self, t: Tensor) -> None:
        """Drop the pages wholly inside ``t`` if it is a contiguous view of a private file
        mapping; the caller promises ``t``'s pages were never written."""
        madvise = _madvise()
        if madvise is None or not t.is_contiguous() or not self.in_file(t):
            return
        page = mmap.PAGESIZE
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        first = -(-start // page) * page  # pages wholly inside the tensor only
        last = end // page * page
        if last <= first:
            return
        fn, advice = madvise
        if fn(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice) == 0:
            self.released += last - first

    def release_copied(self, source: Tensor, copy: Tensor) -> None:
        """Release ``source``'s file pages if ``copy`` holds its data elsewhere (a cast or a
        move made a new tensor); nothing when ``copy`` is ``source`` or shares its memory."""
        if copy is source or (
            copy.device == source.device and copy.data_ptr() == source.data_ptr()
        ):
            return
        self(source)


__all__ = ["FilePages", "page_release_supported", "private_file_mappings"]
