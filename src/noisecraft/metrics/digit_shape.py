"""Simple, checkable measurements of generated digits: how tall their ink is, and which digit
the shipped MNIST classifier reads once a shrunken digit is enlarged back.

They judge the style LoRA of the mini Stable Diffusion (``configs/mnist_text_lora.toml``:
"tiny" digits at 0.6 of the normal size): MNIST digits are normalised to a 20-pixel box, so
a normal digit's ink is 15-20 px tall and a tiny one's 8-13 px.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Ink heights (in pixels, of a 32x32 image) at or below which a digit counts as tiny.
TINY_MAX_HEIGHT = 14


def ink_height(images: Tensor, threshold: float = 0.0) -> Tensor:
    """(N,) height in pixels of the rows holding ink (value > ``threshold`` on [-1, 1]); 0 for
    an image without ink."""
    ink = (images.float().mean(1) > threshold).any(-1)  # (N, H): rows with ink
    rows = torch.arange(ink.shape[-1]).expand_as(ink)
    top = torch.where(ink, rows, ink.shape[-1]).min(-1).values
    bottom = torch.where(ink, rows, -1).max(-1).values
    return (bottom - top + 1).clamp(min=0)


def enlarge(images: Tensor, factor: float) -> Tensor:
    """``images`` scaled by ``factor`` (> 1) about their centre, cropped to their size."""
    h, w = images.shape[-2:]
    big = F.interpolate(images.float(), scale_factor=factor, mode="bilinear", align_corners=False)
    top, left = (big.shape[-2] - h) // 2, (big.shape[-1] - w) // 2
    return big[..., top : top + h, left : left + w]


def read_digits(images: Tensor, scale: float = 1.0) -> Tensor:
    """(N,) the digit the shipped classifier reads in 32x32 images (its 28x28 centre), after
    enlarging them by ``1 / scale`` (``scale`` = the size the digits were drawn at)."""
    from noisecraft.metrics.features import mnist_extractor

    x = images if scale == 1.0 else enlarge(images, 1.0 / scale)
    h, w = x.shape[-2:]
    top, left = (h - 28) // 2, (w - 28) // 2
    with torch.no_grad():
        return mnist_extractor().logits(x[..., top : top + 28, left : left + 28]).argmax(1)


def tiny_style_scores(images: Tensor, digits: Tensor, scale: float) -> dict[str, float]:
    """How a batch of 32x32 digits drawn for ``digits`` shows the "tiny" style: the share that
    is tiny (:data:`TINY_MAX_HEIGHT`), tiny and read as its digit once enlarged by ``1 / scale``,
    and normal-sized and read as its digit."""
    tiny = ink_height(images) <= TINY_MAX_HEIGHT
    digits = digits.to(torch.long)
    small_ok = read_digits(images, scale) == digits
    normal_ok = read_digits(images) == digits
    share = lambda m: m.float().mean().item()  # noqa: E731
    return {
        "tiny": share(tiny),
        "tiny_and_read": share(tiny & small_ok),
        "normal_and_read": share(~tiny & normal_ok),
    }


__all__ = ["TINY_MAX_HEIGHT", "enlarge", "ink_height", "read_digits", "tiny_style_scores"]
