"""Stroke thickness of drawn digits: ink pixels per skeleton pixel.

A stroke of width ``w`` and length ``L`` covers about ``w * L`` pixels, and its skeleton (the
one-pixel-wide centre line) about ``L``; their ratio estimates the mean stroke width in
pixels whatever the digit. The skeleton is Zhang & Suen's thinning (Zhang and Suen 1984,
"A fast parallel algorithm for thinning digital patterns", CACM 27(3)): two sub-iterations
that peel boundary pixels off in parallel until none can go, each removing a pixel ``P1``
whose 8 neighbours ``P2..P9`` (clockwise from north) satisfy

* ``2 <= B(P1) <= 6`` (B: ink neighbours), ``A(P1) == 1`` (A: 0->1 transitions around the
  ring P2, P3, ..., P9, P2),
* sub-iteration 1: ``P2 * P4 * P6 == 0`` and ``P4 * P6 * P8 == 0``;
  sub-iteration 2: ``P2 * P4 * P8 == 0`` and ``P2 * P6 * P8 == 0``.

Batched over images with tensor shifts (no scikit-image needed).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Ink threshold on images in [-1, 1] (MNIST's background is -1, its ink +1).
INK_THRESHOLD = 0.0


def _ring(x: Tensor) -> list[Tensor]:
    """The 8 neighbours P2..P9 (clockwise from north) of every pixel of (N, H, W), zero-padded."""
    p = torch.nn.functional.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]

    def at(dy: int, dx: int) -> Tensor:
        return p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    return [at(-1, 0), at(-1, 1), at(0, 1), at(1, 1), at(1, 0), at(1, -1), at(0, -1), at(-1, -1)]


def skeletonize(ink: Tensor, max_iterations: int = 100) -> Tensor:
    """Zhang-Suen skeleton of binary images (N, H, W) (bool) -> bool, same shape."""
    x = ink.to(torch.int32)
    for _ in range(max_iterations):
        changed = False
        for sub in (0, 1):
            n = _ring(x)
            b = sum(n)
            a = sum(((n[i] == 0) & (n[(i + 1) % 8] == 1)).to(torch.int32) for i in range(8))
            p2, p4, p6, p8 = n[0], n[2], n[4], n[6]
            if sub == 0:
                c = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                c = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            remove = (x == 1) & (b >= 2) & (b <= 6) & (a == 1) & c
            if bool(remove.any()):
                x = x.masked_fill(remove, 0)
                changed = True
        if not changed:
            break
    return x.bool()


def stroke_thickness(images: Tensor, threshold: float = INK_THRESHOLD) -> Tensor:
    """Ink pixels per skeleton pixel of each image (N, 1, H, W) in [-1, 1] -> (N,).

    Ink is ``image > threshold``; an image without ink has thickness 0.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"stroke_thickness takes (N, 1, H, W) images, got {tuple(images.shape)}")
    ink = images[:, 0].float() > threshold
    skeleton = skeletonize(ink)
    count = ink.flatten(1).sum(1).float()
    length = skeleton.flatten(1).sum(1).float()
    return torch.where(length > 0, count / length.clamp(min=1), torch.zeros_like(count))


__all__ = ["INK_THRESHOLD", "skeletonize", "stroke_thickness"]
