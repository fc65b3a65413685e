"""Tensors in [-1, 1] to PNG grids and animated GIFs (Pillow), written atomically."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from noisecraft.io.atomic import atomic_path, check_writable
from noisecraft.io.write_errors import writing


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, as ``round(clamp(x/2 + 0.5) * 255)``."""
    x = (images.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images, ``nrow`` per row, ``pad`` black pixels apart; HxWxC uint8."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def _pil(arr: np.ndarray, scale: int = 1) -> Image.Image:
    im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return im


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    *,
    nrow: int | None = None,
    scale: int = 1,
    overwrite: bool = False,
    text: dict[str, str] | None = None,
) -> Path:
    """Write a PNG grid of ``images``; refuses to replace a file unless ``overwrite``."""
    from PIL.PngImagePlugin import PngInfo

    path = check_writable(path, overwrite=overwrite)
    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    with writing(path), atomic_path(path) as tmp:
        _pil(make_grid(images, nrow), scale).save(tmp, format="PNG", pnginfo=info)
    return path


def save_gif(
    frames: Sequence[np.ndarray],
    path: str | os.PathLike,
    *,
    duration_ms: int = 80,
    hold_last_ms: int = 1000,
    scale: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write HxWxC uint8 frames as a looping GIF; the last frame is held a little longer."""
    path = check_writable(path, overwrite=overwrite)
    ims = [_pil(f, scale) for f in frames]
    durations = [duration_ms] * (len(ims) - 1) + [hold_last_ms]
    with writing(path), atomic_path(path) as tmp:
        ims[0].save(
            tmp, format="GIF", save_all=True, append_images=ims[1:], duration=durations, loop=0
        )
    return path


class DenoisingRecorder:
    """A sampler callback that records x_t and the predicted x0 side by side, for a GIF.

    Each frame is two grids next to each other: left the current noisy
    sample (scaled back to unit variance, ``x / sqrt(1 + sigma^2)``, i.e. the
    VP view of x_t), right the denoiser's estimate of x0 at that step.
    """

    def __init__(self, nrow: int | None = None, every: int = 1, batch: int = 0):
        self.nrow, self.every, self.batch = nrow, every, batch
        self.frames: list[np.ndarray] = []

    def __call__(self, d: dict) -> None:
        if d.get("batch", 0) != self.batch or d["i"] % self.every:
            return
        sigma = float(d["sigma"])
        xt = d["x"] / math.sqrt(1.0 + sigma**2)
        self.add(xt, d["denoised"])

    def add(self, xt: torch.Tensor, x0: torch.Tensor) -> None:
        left, right = make_grid(xt.clamp(-1, 1), self.nrow), make_grid(x0.clamp(-1, 1), self.nrow)
        gap = np.full((left.shape[0], 6, left.shape[2]), 255, dtype=np.uint8)
        self.frames.append(np.concatenate([left, gap, right], axis=1))


class IntermediateWriter:
    """A sampler callback that saves every ``every``-th step as two PNG grids.

    ``step_NNN_xt.png`` is the noisy sample in the VP view (``x / sqrt(1 + sigma^2)``) and
    ``step_NNN_x0.png`` the denoiser's x0 estimate, as Stable Diffusion's ``save_int`` does.
    :meth:`finish` adds the final images as the last step (``step_SSS_*``, S = the number of
    steps), so the series ends where sampling ends. Only the first batch is drawn.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        every: int,
        nrow: int | None = None,
        scale: int = 1,
        overwrite: bool = False,
    ):
        self.folder, self.every, self.nrow = Path(folder), every, nrow
        self.scale, self.overwrite = scale, overwrite
        self.written: list[Path] = []
        self.last_step, self.batch_size = -1, 0

    def __call__(self, d: dict) -> None:
        if d.get("batch", 0) != 0:
            return
        self.last_step, self.batch_size = d["i"], len(d["x"])
        if d["i"] % self.every:
            return
        sigma = float(d["sigma"])
        xt = (d["x"] / math.sqrt(1.0 + sigma**2)).clamp(-1, 1)
        self._save(d["i"], xt, d["denoised"].clamp(-1, 1))

    def finish(self, images: torch.Tensor) -> None:
        """Save the final ``images`` (all batches; the first batch's are drawn) as the step
        after the last one seen: at sigma = 0, x_t and x0 are both the result."""
        if self.last_step < 0:
            return
        final = images[: self.batch_size].clamp(-1, 1)
        self._save(self.last_step + 1, final, final)

    def _save(self, step: int, xt: torch.Tensor, x0: torch.Tensor) -> None:
        kw = {"nrow": self.nrow, "scale": self.scale, "overwrite": self.overwrite}
        for name, img in (("xt", xt), ("x0", x0)):
            path = self.folder / f"step_{step:03d}_{name}.png"
            self.written.append(save_grid(img, path, **kw))
