"""The edge-overlap F1 (metrics/edge_overlap.py) against closed forms."""

import pytest
import torch

from noisecraft.metrics.edge_overlap import edge_f1, edge_scores


def line(col: int, rows: range = range(4, 14), size: int = 20) -> torch.Tensor:
    m = torch.zeros(1, size, size, dtype=torch.bool)
    m[0, rows.start : rows.stop, col] = True
    return m


def test_shift_within_tolerance_is_a_match_and_beyond_is_not():
    target = line(8)
    assert edge_f1(line(8), target).item() == 1.0
    assert edge_f1(line(9), target).item() == 1.0  # 1 px off, tolerance 1
    assert edge_f1(line(10), target).item() == 0.0  # 2 px off
    assert edge_f1(line(10), target, tolerance=2).item() == 1.0
    assert edge_f1(line(9), target, tolerance=0).item() == 0.0


def test_extra_and_missing_pixels_give_the_closed_form():
    # target: 10 px; edges: the same 10 px plus k = 6 far away -> P = 10/16, R = 1,
    # F1 = 2 L / (2 L + k) = 20 / 26
    target = line(3)
    edges = target | line(15, range(0, 6))
    s = edge_scores(edges, target)
    assert s["precision"].item() == pytest.approx(10 / 16)
    assert s["recall"].item() == 1.0
    assert s["f1"].item() == pytest.approx(20 / 26)
    # the other way round: P = 1, R = 10/16, the same F1 (symmetric)
    assert edge_f1(target, edges).item() == pytest.approx(20 / 26)
    # half the line drawn (rows 4-8 of 4-13): P = 1, R = 6/10 (rows 4-9 lie within 1 px of
    # the drawn rows), F1 = 2 * 0.6 / 1.6 = 0.75
    half = line(3, range(4, 9))
    s = edge_scores(half, target)
    assert s["precision"].item() == 1.0
    assert s["recall"].item() == pytest.approx(6 / 10)
    assert s["f1"].item() == pytest.approx(0.75)


def test_empty_maps_and_batches():
    empty = torch.zeros(1, 20, 20, dtype=torch.bool)
    assert edge_f1(empty, empty).item() == 1.0
    assert edge_f1(empty, line(5)).item() == 0.0
    assert edge_f1(line(5), empty).item() == 0.0
    batch = edge_f1(torch.cat([line(5), line(9), empty]), torch.cat([line(5), line(5), line(5)]))
    assert batch.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        edge_f1(line(5)[0], line(5)[0])
