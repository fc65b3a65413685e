"""Image styles an adapter can be taught, as pure functions of an image batch.

A LoRA trained on captions that carry a keyword exactly when the image has a style learns to
draw the style on that keyword (kohya's "style LoRA"). The style must be one the frozen VAE can
represent, or the U-Net cannot learn to ask for it: the shipped mini SD's VAE reconstructs
digits drawn at 0.6 of their size (mean abs. error 0.014 on [-1, 1]) as well as normal ones
(0.019), but not inverted ones (dark ink on light paper: error 1.16; its encoder never saw a
light background).

* ``tiny``: the digit shrunk to 0.6 of its size about the image centre (a 28x28 MNIST digit
  padded to 32x32 becomes a ~12 px tall one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from noisecraft.errors import unknown_name

#: The size factor of the ``tiny`` style.
TINY_SCALE = 0.6


def shrink(images: Tensor, factor: float) -> Tensor:
    """``images`` (N, C, H, W) in [-1, 1] scaled by ``factor`` about their centre, the border
    filled with the background (-1)."""
    h, w = images.shape[-2:]
    sh, sw = max(1, round(h * factor)), max(1, round(w * factor))
    small = F.interpolate(images, size=(sh, sw), mode="bilinear", antialias=True)
    top, left = (h - sh) // 2, (w - sw) // 2
    return F.pad(small, (left, w - sw - left, top, h - sh - top), value=-1.0).clamp(-1, 1)


STYLES: dict[str, Callable[[Tensor], Tensor]] = {
    "tiny": lambda x: shrink(x, TINY_SCALE),
}


def apply_style(name: str, images: Tensor) -> Tensor:
    """The images in style ``name`` (:data:`STYLES`)."""
    if name not in STYLES:
        raise unknown_name("style", name, STYLES)
    return STYLES[name](images)


__all__ = ["STYLES", "TINY_SCALE", "apply_style", "shrink"]
