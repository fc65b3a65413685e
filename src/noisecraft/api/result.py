"""What a :class:`~noisecraft.api.pipeline.Pipeline` call returns, and how it is written.

Each image is saved as a PNG whose ``parameters`` text chunk is its AUTOMATIC1111 infotext
(:mod:`noisecraft.pipelines.png_params`), written atomically (temp file + rename); an
existing file is never replaced unless ``overwrite`` is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from noisecraft.io.atomic import atomic_path, check_writable
from noisecraft.io.write_errors import writing


def output_paths(out: str | os.PathLike, n: int) -> list[Path]:
    """``out``, then ``out_1.png``, ``out_2.png``, ... (one per image)."""
    out = Path(out)
    suffix = out.suffix or ".png"
    first = out if out.suffix else out.with_suffix(suffix)
    return [first] + [out.with_name(f"{out.stem}_{i}{suffix}") for i in range(1, n)]


def hint_output_paths(out: str | os.PathLike, n: int) -> list[Path]:
    """``out_control0.png``, ... (one per ControlNet unit) beside ``out``."""
    out = Path(out)
    return [out.with_name(f"{out.stem}_control{i}.png") for i in range(n)]


def write_png(
    image: Image.Image, path: str | os.PathLike, infotext: str, *, overwrite: bool
) -> Path:
    """One PIL image as a PNG with a ``parameters`` text chunk, atomically."""
    path = check_writable(path, overwrite=overwrite)
    info = PngInfo()
    info.add_text("parameters", infotext)
    with writing(path), atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


@dataclass(frozen=True)
class GenerationResult:
    """The images of one call, with their seeds and A1111 parameters.

    * ``images``: one 8-bit PIL image per image asked for;
    * ``seeds``: the seed of each (the seed that re-creates it alone);
    * ``infotexts``: each image's ``parameters`` text (:meth:`Pipeline.replay` reads it back);
    * ``tensors``: the images as (n, C, H, W) floats in [-1, 1] before 8-bit rounding;
    * ``request``: the validated :class:`~noisecraft.pipelines.generate.GenerateRequest`;
    * ``observed``: what the call's ``observe`` asked for
      (:class:`~noisecraft.api.observed.Observed`), None without one;
    * ``hints``: the control image each ControlNet unit got (preprocessed and fitted), in
      unit order; empty without ControlNet.
    """

    images: Sequence[Image.Image]
    seeds: Sequence[int]
    infotexts: Sequence[str]
    tensors: Tensor
    request: Any
    observed: Any = None
    hints: Sequence[Image.Image] = ()

    @property
    def infotext(self) -> str:
        """The first image's infotext (A1111's ``info``)."""
        return self.infotexts[0]

    def save(
        self, out: str | os.PathLike, *, overwrite: bool = False, hints: bool = False
    ) -> list[Path]:
        """Write ``out``, ``out_1.png``, ... (one PNG per image, with its parameters); with
        ``hints`` also each ControlNet unit's control image as ``OUT_control0.png``, ...
        Every path is checked before the first is written."""
        paths = output_paths(out, len(self.images))
        hint_paths = hint_output_paths(out, len(self.hints)) if hints else []
        for path in paths + hint_paths:
            check_writable(path, overwrite=overwrite)
        written = [
            write_png(im, path, text, overwrite=overwrite)
            for im, path, text in zip(self.images, paths, self.infotexts, strict=True)
        ]
        for im, path in zip(self.hints if hints else [], hint_paths, strict=True):
            with writing(path), atomic_path(path) as tmp:
                im.save(tmp, format="PNG")
            written.append(path)
        return written


__all__ = ["GenerationResult", "hint_output_paths", "output_paths", "write_png"]
