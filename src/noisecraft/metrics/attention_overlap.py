"""How well an attention map covers an object: the share of the map's top pixels on its mask.

The check of DAAM-style maps (Tang et al. 2023 score them by IoU against segmentation masks
after thresholding); here on digits, whose mask is their ink: ``overlap`` = |top-q map
pixels ∩ mask| / |top-q map pixels|, the map stretched (bilinear) to the mask's size first.
A map that ignores the image scores the mask's own area fraction on average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ink_mask", "top_overlap"]


def ink_mask(image: Tensor) -> Tensor:
    """The ink of a digit image in [-1, 1] (C, H, W) or (H, W): pixels above 0 (any channel)."""
    return (image > 0).reshape(-1, *image.shape[-2:]).any(dim=0)


def top_overlap(heat: Tensor, mask: Tensor, top: float = 0.2) -> float:
    """Share of the ``top`` fraction of ``heat`` (h, w)'s pixels, at ``mask`` (H, W)'s size,
    that lie on the mask; ties at the threshold are broken by position (``topk``)."""
    if not 0.0 < top <= 1.0:
        raise ValueError(f"top must be in (0, 1], got {top}")
    size = tuple(mask.shape[-2:])
    heat = heat.float().reshape(1, 1, *heat.shape[-2:])
    if tuple(heat.shape[-2:]) != size:
        heat = F.interpolate(heat, size=size, mode="bilinear", align_corners=False)
    flat = heat.flatten()
    k = max(1, round(top * flat.numel()))
    idx = torch.topk(flat, k).indices
    return float(mask.flatten()[idx].float().mean())
