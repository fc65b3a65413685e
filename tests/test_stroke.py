"""Stroke thickness (ink per skeleton pixel) and the Zhang-Suen skeleton behind it."""

from __future__ import annotations

import pytest
import torch

from noisecraft.metrics.stroke import skeletonize, stroke_thickness


def _bar(width: int, length: int = 20, size: int = 32) -> torch.Tensor:
    im = -torch.ones(1, 1, size, size)
    im[0, 0, 6 : 6 + length, 10 : 10 + width] = 1
    return im


def test_skeleton_of_a_bar_is_a_one_pixel_line():
    for width in (1, 3, 5):
        sk = skeletonize(_bar(width)[:, 0] > 0)[0]
        cols = sk.any(0).nonzero().flatten()
        assert len(cols) == 1  # one column
        assert sk.sum(1).max() == 1  # one pixel per row
        assert 20 - width <= sk.sum() <= 20  # Zhang-Suen shortens the ends a little


def test_a_one_pixel_line_is_its_own_skeleton():
    ink = _bar(1)[:, 0] > 0
    assert torch.equal(skeletonize(ink), ink)


def test_thickness_grows_with_the_stroke_width_and_ignores_length():
    t = stroke_thickness(torch.cat([_bar(w) for w in (1, 2, 3, 4, 5)]))
    assert (t[1:] > t[:-1]).all()
    assert t[0] == 1.0
    # about the width whatever the length (the skeleton loses ~width-1 pixels at the ends)
    for t in stroke_thickness(torch.cat([_bar(3, 24), _bar(3, 12)])):
        assert 3.0 <= t <= 4.0


def test_blank_image_has_thickness_zero_and_shapes_are_checked():
    assert stroke_thickness(-torch.ones(2, 1, 8, 8)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="N, 1, H, W"):
        stroke_thickness(torch.zeros(2, 3, 8, 8))
