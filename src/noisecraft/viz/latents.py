"""Pictures of latents over a sampling run: the channels on one colour scale, and frames.

A latent diffusion model samples in the VAE's latent space (SD: 4 channels at 1/8 of the
image's size). :func:`channel_grid` draws every channel of every recorded step as a small
image, rows = steps and columns = channels, all on ONE diverging colour scale symmetric
about 0 (``[-m, m]``, ``m`` the largest magnitude shown) with one colour bar, so that a
channel's brightness can be compared across channels and across steps. :func:`side_by_side`
makes the frames of a denoising GIF (x_t left, the predicted x0 right), as the pixel
model's :class:`~noisecraft.viz.images.DenoisingRecorder` does.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["channel_grid", "picture_grid", "shared_scale", "side_by_side"]


def shared_scale(latents: np.ndarray) -> float:
    """The colour scale's half-width ``m``: the largest magnitude in ``latents`` (1 if all 0)."""
    m = float(np.abs(latents).max()) if latents.size else 0.0
    return m if m > 0 else 1.0


def channel_grid(
    latents: np.ndarray,
    row_labels: Sequence[str],
    *,
    title: str = "",
    cmap: str = "RdBu_r",
    cell_inches: float = 1.1,
) -> Image.Image:
    """(S, C, h, w) latents as an S x C grid of images on one colour scale with a colour
    bar (module docstring); ``row_labels`` name the steps. An RGB PIL image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latents = np.asarray(latents, dtype=np.float32)
    s, c = latents.shape[:2]
    m = shared_scale(latents)
    fig, axes = plt.subplots(
        s,
        c,
        figsize=(cell_inches * c + 1.4, cell_inches * s + 0.6),
        squeeze=False,
        layout="constrained",
    )
    im = None
    for r in range(s):
        for k in range(c):
            ax = axes[r][k]
            im = ax.imshow(latents[r, k], cmap=cmap, vmin=-m, vmax=m, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"channel {k}", fontsize=8)
            if k == 0:
                ax.set_ylabel(row_labels[r], fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8, label="latent value (one scale for all)")
    if title:
        fig.suptitle(title, fontsize=9)
    return _figure_image(fig)


def picture_grid(
    rows: dict[str, Sequence[Image.Image]],
    col_labels: Sequence[str],
    *,
    title: str = "",
    cell_inches: float = 1.1,
) -> Image.Image:
    """Pictures in a grid, one labelled row per entry of ``rows`` (e.g. "x_t, VAE"), one
    labelled column per step. An RGB PIL image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    ncol = len(col_labels)
    fig, axes = plt.subplots(
        len(names),
        ncol,
        figsize=(cell_inches * ncol + 0.6, cell_inches * len(names) + 0.5),
        squeeze=False,
        layout="constrained",
    )
    for r, name in enumerate(names):
        for k in range(ncol):
            ax = axes[r][k]
            ax.imshow(np.asarray(rows[name][k].convert("RGB")), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_labels[k], fontsize=7)
            if k == 0:
                ax.set_ylabel(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _figure_image(fig)


def _figure_image(fig: Any) -> Image.Image:
    """A matplotlib figure as an RGB PIL image (and the figure closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 6) -> np.ndarray:
    """One GIF frame: ``left`` and ``right`` (same size) with a white gap, HxWx3 uint8."""
    a, b = np.asarray(left.convert("RGB")), np.asarray(right.convert("RGB"))
    white = np.full((a.shape[0], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([a, white, b], axis=1)
