"""How well the edges of an image match a wanted edge map: the F1 score of edge pixels within
a tolerance (the boundary F-measure of Martin, Fowlkes & Malik 2004, with a square
neighbourhood in place of their bipartite matching).

Precision is the share of the image's edge pixels that lie within ``tolerance`` pixels
(Chebyshev distance: the (2 tol + 1)^2 square around them) of a wanted edge pixel; recall the
share of wanted edge pixels within ``tolerance`` of one of the image's; F1 = 2 P R / (P + R).
Two empty maps agree (F1 = 1); one empty map against a non-empty one scores 0. It judges a
ControlNet: the canny edges of its output against the canny hint it was given
(``bench/controlnet_quality.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _near(edges: Tensor, tolerance: int) -> Tensor:
    """(N, H, W) bool: pixels within ``tolerance`` (Chebyshev) of an edge pixel."""
    if tolerance == 0:
        return edges
    k = 2 * tolerance + 1
    return F.max_pool2d(edges[:, None].float(), k, stride=1, padding=tolerance)[:, 0] > 0


def edge_scores(edges: Tensor, target: Tensor, tolerance: int = 1) -> dict[str, Tensor]:
    """Per-image ``precision``, ``recall`` and ``f1`` (each (N,)) of the boolean edge maps
    ``edges`` against ``target`` (both (N, H, W); nonzero = edge), within ``tolerance`` px."""
    if edges.shape != target.shape or edges.ndim != 3:
        raise ValueError(
            f"edge maps must both be (N, H, W), got {tuple(edges.shape)} and {tuple(target.shape)}"
        )
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    e, t = edges != 0, target != 0
    n_e, n_t = e.sum((1, 2)).double(), t.sum((1, 2)).double()
    hit_e = (e & _near(t, tolerance)).sum((1, 2)).double()
    hit_t = (t & _near(e, tolerance)).sum((1, 2)).double()
    precision = torch.where(n_e > 0, hit_e / n_e.clamp(min=1), (n_t == 0).double())
    recall = torch.where(n_t > 0, hit_t / n_t.clamp(min=1), (n_e == 0).double())
    total = precision + recall
    f1 = torch.where(total > 0, 2 * precision * recall / total.clamp(min=1e-12), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1}


def edge_f1(edges: Tensor, target: Tensor, tolerance: int = 1) -> Tensor:
    """(N,) F1 of edge pixels within ``tolerance`` px (:func:`edge_scores`)."""
    return edge_scores(edges, target, tolerance)["f1"]


__all__ = ["edge_f1", "edge_scores"]
