"""Metric maths against closed forms, naive loops and pytorch-fid; the evaluate() front end."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from noisecraft.errors import ConfigError, UnknownNameError
from noisecraft.metrics import (
    METRICS,
    GaussianStats,
    evaluate,
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    knn_radii,
    mmd2_unbiased,
    parse_metrics,
    precision_recall,
)


def _random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _sym_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet_closed_form(m1, s1, m2, s2) -> float:
    """d^2 = |m1 - m2|^2 + Tr S1 + Tr S2 - 2 Tr (S1^1/2 S2 S1^1/2)^1/2 (symmetric form, eigh)."""
    r = _sym_sqrt(s1)
    cross = np.trace(_sym_sqrt(r @ s2 @ r))
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


# ----------------------------------------------------------------------------- Fréchet / FID


def test_frechet_diagonal_closed_form():
    # Diagonal covariances commute: d^2 = |dm|^2 + sum (sqrt a - sqrt b)^2 = 25 + 1 + 1.
    d = frechet_distance(
        np.array([0.0, 0.0]), np.diag([1.0, 4.0]), np.array([3.0, 4.0]), np.diag([4.0, 9.0])
    )
    assert d == pytest.approx(27.0, abs=1e-10)
    assert frechet_distance(np.zeros(1), np.eye(1), np.zeros(1), 4 * np.eye(1)) == pytest.approx(1)


def test_frechet_general_matches_symmetric_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(d, rng), _random_spd(d, rng)
    expected = _frechet_closed_form(m1, s1, m2, s2)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_from_large_samples_converges_to_closed_form():
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    m1, m2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = _random_spd(d, rng), _random_spd(d, rng)
    x = rng.multivariate_normal(m1, s1, size=n)
    y = rng.multivariate_normal(m2, s2, size=n)
    expected = _frechet_closed_form(m1, s1, m2, s2)
    assert fid_from_features(x, y) == pytest.approx(expected, abs=0.02)
    assert expected > 1.0  # the test would notice a wrong formula


def test_fid_of_a_set_with_itself_is_zero():
    f = torch.randn(500, 32, generator=torch.Generator().manual_seed(0)).double()
    assert abs(fid_from_features(f, f)) < 1e-8


def _pytorch_fid_reference():
    """pytorch-fid's own ``calculate_frechet_distance``, read from its source file.

    pytorch-fid 0.3.0 is a test-only reference, installed into .venv with
    ``pip install --no-deps pytorch-fid==0.3.0``: its dependency torchvision must
    not be installed (it would replace the pinned torch), and ``pytorch_fid.fid_score``
    imports torchvision at the top. So the function is taken out of the file
    unchanged with ``ast`` and run with the numpy/scipy it imports there.
    """
    pytest.importorskip("pytorch_fid")
    spec = importlib.util.find_spec("pytorch_fid")
    path = Path(next(iter(spec.submodule_search_locations))) / "fid_score.py"
    src = path.read_text()
    node = next(
        n
        for n in ast.parse(src).body
        if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance"
    )
    from scipy import linalg

    ns = {"np": np, "linalg": linalg}
    exec(ast.get_source_segment(src, node), ns)
    return ns["calculate_frechet_distance"]


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")
def test_fid_matches_pytorch_fid():
    reference = _pytorch_fid_reference()
    rng = np.random.default_rng(2)
    a = rng.standard_normal((400, 48))
    b = 0.8 * rng.standard_normal((300, 48)) @ _random_spd(48, rng) + 0.3
    sa, sb = feature_stats(a), feature_stats(b)
    expected = reference(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    # Our statistics are the ones pytorch-fid computes (mean, np.cov rowvar=False).
    np.testing.assert_allclose(sa.sigma, np.cov(a, rowvar=False), rtol=1e-12)


def test_gaussian_stats_round_trip(tmp_path):
    stats = feature_stats(np.random.default_rng(3).standard_normal((20, 5)))
    stats.save(str(tmp_path / "ref.npz"))
    back = GaussianStats.load(str(tmp_path / "ref.npz"))
    assert back.n == 20
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)


def test_frechet_rejects_mismatched_statistics():
    with pytest.raises(ConfigError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------- KID


def _mmd2_naive(x: np.ndarray, y: np.ndarray) -> float:
    """O(n^2) loops over the definition (Gretton et al. 2012 eq. 3, cubic kernel)."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_mmd2_matches_naive_loops():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((15, 5)) + 0.4
    assert mmd2_unbiased(x, y) == pytest.approx(_mmd2_naive(x, y), rel=1e-12)


def test_kid_subsets_of_full_size_equal_the_full_estimate():
    # MMD^2_u does not depend on the order of the vectors; a full-size subset is a permutation.
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((30, 4)), rng.standard_normal((30, 4)) + 0.2
    mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=1000)
    assert mean == pytest.approx(mmd2_unbiased(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_unbiased_for_one_distribution():
    # Mean over 200 independent pairs from N(0, I): within 4 standard errors of 0.
    # (The biased V-statistic, diagonal included, averages ~0.33 here: ~60 standard errors.)
    rng = np.random.default_rng(6)
    vals = np.array(
        [
            mmd2_unbiased(rng.standard_normal((50, 8)), rng.standard_normal((50, 8)))
            for _ in range(200)
        ]
    )
    sem = vals.std() / math.sqrt(len(vals))
    assert abs(vals.mean()) < 4 * sem
    shifted = kernel_inception_distance(
        rng.standard_normal((200, 8)),
        rng.standard_normal((200, 8)) + 1.0,
        num_subsets=5,
        subset_size=100,
    )[0]
    assert shifted > 50 * sem


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_of_uniform_logits_is_one():
    mean, std = inception_score(torch.zeros(100, 10), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_even_classes_is_k():
    k = 7
    logits = 60.0 * np.tile(np.eye(k), (10, 1))  # 70 samples, each split of 14 has 2 per class
    mean, std = inception_score(logits, splits=5)
    assert mean == pytest.approx(k, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)
    # All samples confident in the same class: IS = 1.
    assert inception_score(60.0 * np.tile(np.eye(k)[:1], (20, 1)))[0] == pytest.approx(1.0)


def test_inception_score_closed_form_two_classes():
    # p(y|x) = (0.8, 0.2) for half, (0.2, 0.8) for the other half; p(y) = (0.5, 0.5).
    logit = math.log(4.0)
    logits = np.array([[logit, 0.0]] * 5 + [[0.0, logit]] * 5)
    kl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert inception_score(logits)[0] == pytest.approx(math.exp(kl), rel=1e-12)


# ----------------------------------------------------------------------------- precision / recall


def _pr_naive(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        return np.sort(cdist(x, x), axis=1)[:, k]

    def coverage(q, s, r):
        return float(np.mean([(cdist(p[None], s)[0] <= r).any() for p in q]))

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def test_precision_recall_matches_naive_definition():
    rng = np.random.default_rng(7)
    real = rng.standard_normal((120, 6))
    fake = 1.3 * rng.standard_normal((90, 6)) + 0.5
    p, r = precision_recall(real, fake, k=3)
    assert (p, r) == pytest.approx(_pr_naive(real, fake, 3), abs=1e-12)
    assert 0.05 < p < 0.95 and 0.05 < r < 1.0  # a case where both are informative
    np.testing.assert_allclose(knn_radii(real, 3, block=7), np.sort(cdist(real, real), 1)[:, 3])


def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((200, 10))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    assert precision_recall(x, rng.standard_normal((150, 10)) + 100.0) == (0.0, 0.0)
    # Half the generated points are real points, half far away: precision 1/2 exactly.
    fake = np.concatenate([x[:50], rng.standard_normal((50, 10)) + 100.0])
    assert precision_recall(x, fake)[0] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- evaluate()


def test_parse_metrics():
    assert parse_metrics("FID, kid,fid") == ["fid", "kid"]
    assert parse_metrics(["pr", "is"]) == ["pr", "is"]
    assert set(METRICS) == {"fid", "kid", "is", "pr", "bpd"}
    with pytest.raises(UnknownNameError) as e:
        parse_metrics("fid,kdi")
    assert "did you mean 'kid'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError):
        parse_metrics(" , ")


class PoolFeatures:
    """A stand-in extractor: 4x4 average-pooled pixels (16-d); logits: 4 quadrant means."""

    feature_dim = 16

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1).double()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 20.0 * torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1).double()


def test_evaluate_matches_the_metric_functions():
    g = torch.Generator().manual_seed(9)
    real = torch.rand(80, 1, 8, 8, generator=g) * 2 - 1
    fake = (torch.rand(60, 1, 8, 8, generator=g) * 2 - 1) * 0.7
    ext = PoolFeatures()
    out = evaluate(
        fake, real, metrics="fid,kid,is,pr", extractor=ext, kid_subsets=4, kid_subset_size=30
    )
    fr, ff = ext(real), ext(fake)
    assert out["fid"] == pytest.approx(fid_from_features(ff, fr), rel=1e-12)
    kid = kernel_inception_distance(ff, fr, num_subsets=4, subset_size=30, seed=0)
    assert (out["kid"], out["kid_std"]) == pytest.approx(kid, rel=1e-12)
    assert out["is"] == pytest.approx(inception_score(ext.logits(fake))[0], rel=1e-12)
    assert (out["precision"], out["recall"]) == pytest.approx(precision_recall(fr, ff))
    same = evaluate(real, real, metrics="fid,pr", extractor=ext)
    assert abs(same["fid"]) < 1e-8 and same["precision"] == same["recall"] == 1.0


def test_evaluate_reports_each_metric_as_it_is_done():
    """on_metric sees the results so far after each metric (eval writes its JSON there)."""
    g = torch.Generator().manual_seed(9)
    real = torch.rand(80, 1, 8, 8, generator=g) * 2 - 1
    fake = (torch.rand(60, 1, 8, 8, generator=g) * 2 - 1) * 0.7
    seen: list[dict] = []
    out = evaluate(
        fake,
        real,
        metrics="pr,fid,kid,bpd",
        extractor=PoolFeatures(),
        kid_subsets=2,
        kid_subset_size=30,
        bpd_fn=lambda b: b.flatten(1).mean(1),
        on_metric=seen.append,
    )
    assert [list(s) for s in seen] == [
        ["fid"],
        ["fid", "kid", "kid_std"],
        ["fid", "kid", "kid_std", "precision", "recall"],
        ["fid", "kid", "kid_std", "precision", "recall", "bpd"],
    ]
    assert seen[-1] == out and seen[0]["fid"] == out["fid"]


def test_evaluate_refuses_too_few_samples_for_fid_before_extracting():
    ext = PoolFeatures()
    x = torch.zeros(16, 1, 8, 8)
    with pytest.raises(ConfigError) as e:
        evaluate(x, torch.zeros(100, 1, 8, 8), metrics="fid", extractor=ext)
    msg = str(e.value)
    assert "at least 17" in msg and "16 samples" in msg and "\n" not in msg
    assert ext.calls == 0
    with pytest.raises(ConfigError, match="16 reference images"):
        evaluate(torch.zeros(100, 1, 8, 8), x, metrics="kid,fid", extractor=ext)


def test_evaluate_bpd_and_its_errors():
    ref = torch.arange(10.0).view(10, 1, 1, 1) / 10

    def bpd_fn(batch):
        return batch.flatten(1).mean(1) + 1.0

    out = evaluate(ref, ref, metrics="bpd", bpd_fn=bpd_fn, bpd_batch_size=3)
    assert out == {"bpd": pytest.approx(1.45)}
    with pytest.raises(ConfigError, match="bpd_fn"):
        evaluate(ref, ref, metrics="bpd")
    with pytest.raises(ConfigError, match="extractor"):
        evaluate(ref, ref, metrics="fid")
    with pytest.raises(ConfigError, match="reference"):
        evaluate(ref, None, metrics="fid", extractor=PoolFeatures())


def test_metric_functions_are_float64_and_pure():
    # Same inputs -> same outputs (seeded subsets), and float32 inputs are promoted.
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((40, 3)).astype(np.float32), rng.standard_normal((40, 3))
    a = kernel_inception_distance(x, y, num_subsets=3, subset_size=20, seed=1)
    b = kernel_inception_distance(x, y, num_subsets=3, subset_size=20, seed=1)
    assert a == b
    assert mmd2_unbiased(x, y) == pytest.approx(mmd2_unbiased(x.astype(np.float64), y), rel=1e-15)
