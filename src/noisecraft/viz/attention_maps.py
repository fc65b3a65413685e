"""Drawing cross-attention maps: a heat map over the image, and a grid with each word below.

The maps come from :mod:`noisecraft.pipelines.observe` as (h, w) arrays in [0, 1] at the
latents' size; :func:`overlay` stretches one to the image's size (bilinear), colours it
(a blue-cyan-yellow-red ramp, dark blue = 0) and blends it over the image in grey.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["heat_colors", "overlay", "token_grid"]

#: (value, RGB) anchors of the heat ramp, linearly interpolated.
_RAMP = (
    (0.0, (0, 0, 96)),
    (0.25, (0, 64, 255)),
    (0.5, (0, 224, 224)),
    (0.75, (255, 224, 0)),
    (1.0, (224, 0, 0)),
)

#: Overlays narrower than this many pixels are enlarged (nearest) so that a label fits.
MIN_CELL = 128


def heat_colors(values: np.ndarray) -> np.ndarray:
    """RGB uint8 (..., 3) of ``values`` in [0, 1] on the heat ramp (values are clipped)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    xs = [a for a, _ in _RAMP]
    rgb = [np.interp(v, xs, [c[k] for _, c in _RAMP]) for k in range(3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """``heat`` (h, w) in [0, 1] stretched to ``image``'s size, coloured and blended over the
    image in grey with weight ``alpha``; an RGB PIL image."""
    size = image.size
    stretched = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F").resize(
        size, Image.Resampling.BILINEAR
    )
    colours = Image.fromarray(heat_colors(np.asarray(stretched)), mode="RGB")
    base = image.convert("L").convert("RGB")
    return Image.blend(base, colours, alpha)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def token_grid(
    image: Image.Image,
    overlays: Sequence[Image.Image],
    labels: Sequence[str],
    *,
    ncol: int | None = None,
    pad: int = 4,
) -> Image.Image:
    """The image, then each overlay, in a grid with its label (the image's: ``image``) below."""
    cells = [image.convert("RGB"), *overlays]
    names = ["image", *labels]
    w, h = cells[0].size
    scale = max(1, -(-MIN_CELL // w))
    w, h = w * scale, h * scale
    ncol = ncol or min(len(cells), 8)
    nrow = -(-len(cells) // ncol)
    font = _font(max(10, min(18, w // 8)))
    label_h = font.getbbox("Ag")[3] + 2 * pad
    grid = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for k, (cell, name) in enumerate(zip(cells, names, strict=True)):
        x = pad + (k % ncol) * (w + pad)
        y = pad + (k // ncol) * (h + label_h + pad)
        grid.paste(cell.resize((w, h), Image.Resampling.NEAREST), (x, y))
        text = name if draw.textlength(name, font=font) <= w else name[: max(1, w // 8)] + "…"
        tw = draw.textlength(text, font=font)
        draw.text((x + (w - tw) / 2, y + h + pad // 2), text, fill="black", font=font)
    return grid
