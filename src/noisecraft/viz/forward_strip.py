"""The forward-noising strip: one image at several t, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

One noise draw ``eps`` is shared by every tile (and every schedule row), so the strip shows
the same noise fading in; with one row per schedule it is improved-DDPM's figure 3 (linear
vs cosine). Tiles show ``clamp(x_t, -1, 1)`` as 8-bit pixels (the usual display); the labels
(t and alpha-bar) sit in a band under each tile, never on the image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from noisecraft.diffusion import NoiseSchedule, q_sample
from noisecraft.errors import ConfigError
from noisecraft.io.atomic import atomic_path, check_writable
from noisecraft.io.write_errors import writing
from noisecraft.viz.images import to_uint8

DEFAULT_FRACTIONS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
MIN_TILE = 72  # small images are enlarged (nearest neighbour) to at least this many pixels


def default_steps(num_steps: int) -> list[int]:
    """0, 5, 10, 25, 50, 75, 100 % of T, as t = min(int(f T), T - 1): 0,50,...,999 at T=1000."""
    return sorted({min(int(f * num_steps), num_steps - 1) for f in DEFAULT_FRACTIONS})


def parse_steps(text: str, num_steps: int) -> list[int]:
    """Parse a comma list of timesteps and check each lies in [0, T - 1]."""
    try:
        steps = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ConfigError(
            f"@steps must be a comma list of integers like 0,50,999, got '{text}'",
            settings=["steps"],
        ) from None
    if not steps:
        raise ConfigError("@steps is empty; give timesteps like 0,50,999", settings=["steps"])
    bad = [t for t in steps if not 0 <= t < num_steps]
    if bad:
        raise ConfigError(
            f"timestep {bad[0]} is outside [0, {num_steps - 1}] (T = {num_steps}); "
            "choose t in that range"
        )
    return steps


def image_to_tensor(im: Image.Image, size: int) -> torch.Tensor:
    """A PIL image -> (C, size, size) float32 in [-1, 1]: grey stays 1 channel, else RGB.

    The shorter side is resized to ``size`` (bicubic) and the centre cropped, as the
    image-folder dataset does; pixels map as u / 127.5 - 1.
    """
    if size < 1:
        raise ConfigError(f"@size must be at least 1, got {size}", settings=["size"])
    if im.mode.startswith("I;16"):  # 16-bit grey: scale to 8 bits rather than clip
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).round().astype(np.uint8))
    im = im.convert("L" if im.mode in GREY_MODES else "RGB")
    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.uint8).reshape(size, size, -1)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def strip_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The one noise draw of a strip: ``torch.randn(shape)`` from a CPU generator at ``seed``."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def forward_strip(
    x0: torch.Tensor,
    schedules: Sequence[NoiseSchedule],
    steps: Sequence[int],
    noise: torch.Tensor,
) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. 4) for every schedule and t.

    ``x0`` and ``noise`` are (C, H, W); returns (len(schedules), len(steps), C, H, W)
    with the same ``noise`` in every tile.
    """
    if x0.shape != noise.shape:
        raise ConfigError(f"noise shape {tuple(noise.shape)} != image shape {tuple(x0.shape)}")
    k = len(steps)
    t = torch.tensor(list(steps), dtype=torch.long)
    rows = []
    for s in schedules:
        if int(t.min()) < 0 or int(t.max()) >= s.num_steps:
            raise ConfigError(f"timesteps must lie in [0, {s.num_steps - 1}], got {list(steps)}")
        x = x0.unsqueeze(0).expand(k, *x0.shape)
        e = noise.unsqueeze(0).expand(k, *noise.shape)
        rows.append(q_sample(s, x, t, e))
    return torch.stack(rows)


def abar_label(abar: float) -> str:
    """Tile label: 4 decimals (abar=0.9999), an exponent below 0.01 (abar=2.4e-09)."""
    return f"abar={abar:.4f}" if abar >= 0.01 else f"abar={abar:.1e}"


@dataclass(frozen=True)
class StripLayout:
    """Where each tile of a strip sits: ``scale`` x enlarged tiles, label bands, gaps."""

    rows: int
    cols: int
    size: int  # image pixels per side
    scale: int  # nearest-neighbour enlargement
    left: int  # width of the row-label column (0 without labels)
    band: int  # height of the label band under each tile (0 without labels)
    gap: int = 4

    @property
    def tile(self) -> int:
        return self.size * self.scale

    @property
    def width(self) -> int:
        return self.left + self.cols * (self.tile + self.gap) + self.gap

    @property
    def height(self) -> int:
        return self.rows * (self.tile + self.band + self.gap) + self.gap

    def tile_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of tile (row, col) in the image, PIL crop order."""
        x = self.left + self.gap + col * (self.tile + self.gap)
        y = self.gap + row * (self.tile + self.band + self.gap)
        return x, y, x + self.tile, y + self.tile


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    box = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3]


def strip_layout(
    rows: int,
    cols: int,
    size: int,
    *,
    labels: bool = True,
    row_names: Sequence[str] = (),
    scale: int | None = None,
) -> StripLayout:
    """The layout :func:`render_strip` uses; ``scale`` defaults to enlarging tiles to >= 72 px
    (and to fit the widest label)."""
    font = _font()
    need, left, band = MIN_TILE, 0, 0
    if labels:
        w, h = _text_size(font, abar_label(1e-9))
        need = max(need, w + 6)
        band = 2 * h + 8
        if row_names:
            left = max(_text_size(font, n)[0] for n in row_names) + 8
    if scale is None:
        scale = max(1, math.ceil(need / size))
    if scale < 1:
        raise ConfigError(f"scale must be at least 1, got {scale}")
    return StripLayout(rows, cols, size, scale, left, band)


def render_strip(
    strip: torch.Tensor,
    steps: Sequence[int],
    schedules: Sequence[NoiseSchedule],
    *,
    row_names: Sequence[str] | None = None,
    labels: bool = True,
    scale: int | None = None,
) -> Image.Image:
    """Draw a (R, K, C, H, W) strip on white; each tile labelled "t=..", "abar=.." if ``labels``."""
    r, k, c, h, w = strip.shape
    if h != w:
        raise ConfigError(f"strip tiles must be square, got {h}x{w}")
    names = list(row_names) if row_names is not None else [s.name for s in schedules]
    lay = strip_layout(r, k, h, labels=labels, row_names=names, scale=scale)
    mode = "L" if c == 1 else "RGB"
    canvas = Image.new(mode, (lay.width, lay.height), 255 if mode == "L" else (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    ink = 0 if mode == "L" else (0, 0, 0)
    pixels = to_uint8(strip.reshape(r * k, c, h, w).clamp(-1, 1))
    for i in range(r):
        abar = schedules[i].alphas_cumprod
        for j, t in enumerate(steps):
            arr = pixels[i * k + j]
            tile = Image.fromarray(arr[..., 0] if c == 1 else arr)
            if lay.scale > 1:
                tile = tile.resize((lay.tile, lay.tile), Image.NEAREST)
            x0, y0, _, y1 = lay.tile_box(i, j)
            canvas.paste(tile, (x0, y0))
            if labels:
                line = _text_size(font, "t")[1]
                draw.text((x0 + 2, y1 + 2), f"t={t}", fill=ink, font=font)
                draw.text((x0 + 2, y1 + 4 + line), abar_label(float(abar[t])), fill=ink, font=font)
        if labels and lay.left:
            _, y0, _, y1 = lay.tile_box(i, 0)
            draw.text((4, (y0 + y1) // 2 - 5), names[i], fill=ink, font=font)
    return canvas


def save_forward_strip(
    path: str | os.PathLike,
    x0: torch.Tensor,
    schedules: Sequence[NoiseSchedule],
    steps: Sequence[int],
    *,
    seed: int = 0,
    labels: bool = True,
    row_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Noise ``x0`` (C, H, W) with one draw :func:`strip_noise` and write the strip atomically.

    PNG unless the suffix names another Pillow format; a PNG's ``parameters`` text records
    the schedules, timesteps and seed.
    """
    from PIL.PngImagePlugin import PngInfo

    path = check_writable(path, overwrite=overwrite)
    strip = forward_strip(x0, schedules, steps, strip_noise(x0.shape, seed))
    im = render_strip(strip, steps, schedules, row_names=row_names, labels=labels)
    info = PngInfo()
    names = ", ".join(row_names if row_names is not None else [s.name for s in schedules])
    info.add_text(
        "parameters",
        f"forward process x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; schedules: {names}; "
        f"T: {schedules[0].num_steps}; t: {','.join(map(str, steps))}; seed: {seed}",
    )
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with writing(path), atomic_path(path) as tmp:
        im.save(tmp, format=fmt, **({"pnginfo": info} if fmt == "PNG" else {}))
    return path
