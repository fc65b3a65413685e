"""The outputs folder: every image a server makes is written there, as it is made.

A client that disconnects (or times out) does not lose its images: each is a PNG with its
``parameters`` text (the engine's infotext, :func:`noisecraft.api.result.write_png`,
written atomically), in ``<outputs>/<YYYY-MM-DD>/<NNNNN>-<seed>.png`` as A1111 numbers its
files. Only the worker thread writes here, so numbers do not collide.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from PIL import Image

from noisecraft.api.result import write_png
from noisecraft.io.atomic import free_path

_NUMBERED = re.compile(r"^(\d{5})-")


class OutputFolder:
    """Where results are saved (module docstring); paths are answered relative to it."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _next_number(self, folder: Path) -> int:
        numbers = [
            int(m.group(1))
            for p in folder.glob("*.png")
            if (m := _NUMBERED.match(p.name)) is not None
        ]
        return max(numbers, default=-1) + 1

    def save(self, image: Image.Image, infotext: str, seed: int) -> Path:
        """Write one image; returns its path."""
        folder = self.root / time.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        path = free_path(folder / f"{self._next_number(folder):05d}-{seed}.png")
        return write_png(image, path, infotext, overwrite=False)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


__all__ = ["OutputFolder"]
