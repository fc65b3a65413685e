"""One entry point for sample-quality metrics: ``evaluate(samples, reference, metrics=...)``.

Metrics (names as on the command line):

- ``fid``: Fréchet distance of feature Gaussians (:mod:`.frechet`) -> ``fid``
- ``kid``: unbiased MMD^2, cubic kernel, over subsets (:mod:`.kid`) -> ``kid``, ``kid_std``
- ``is``: Inception Score of the samples (:mod:`.inception_score`) -> ``is``, ``is_std``
- ``pr``: improved precision / recall, k-NN balls (:mod:`.precision_recall`)
  -> ``precision``, ``recall``
- ``bpd``: bits per dimension of the *reference* (held-out) images under the
  model, from a ``bpd_fn`` the caller gives (the model's VLB) -> ``bpd``

Sizes are checked before any network runs, so a too-small sample fails at once
with the size it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from noisecraft.errors import ConfigError, unknown_name
from noisecraft.metrics.features import FeatureExtractor
from noisecraft.metrics.frechet import fid_from_features
from noisecraft.metrics.inception_score import inception_score
from noisecraft.metrics.kid import kernel_inception_distance
from noisecraft.metrics.precision_recall import precision_recall

METRICS = ("fid", "kid", "is", "pr", "bpd")
_NEEDS_FEATURES = {"fid", "kid", "pr"}


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """``"fid,kid"`` -> ``["fid", "kid"]`` (order kept, duplicates dropped, case-insensitive).

    An unknown name raises :class:`~noisecraft.errors.UnknownNameError` suggesting the closest.
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for part in parts:
        name = part.strip().lower()
        if not name:
            continue
        if name not in METRICS:
            raise unknown_name("metric", name, METRICS)
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigError(f"no metric given; choose from: {', '.join(METRICS)}")
    return names


def _check_sizes(
    names: list[str],
    n_samples: int,
    n_reference: int,
    dim: int,
    *,
    is_splits: int,
    pr_k: int,
) -> None:
    if "fid" in names:
        for what, n in (("samples", n_samples), ("reference images", n_reference)):
            if n <= dim:
                raise ConfigError(
                    f"FID with {dim}-d features needs more than {dim} images per set for a "
                    f"full-rank covariance, got {n} {what}; use at least {dim + 1} "
                    "(thousands for a stable value) or leave fid out of the metrics"
                )
    if "kid" in names and min(n_samples, n_reference) < 2:
        raise ConfigError(
            f"KID needs at least 2 images per set, got {n_samples} samples, "
            f"{n_reference} reference images"
        )
    if "pr" in names and min(n_samples, n_reference) <= pr_k:
        raise ConfigError(
            f"precision/recall with k={pr_k} needs more than {pr_k} images per set, "
            f"got {n_samples} samples, {n_reference} reference images"
        )
    if "is" in names and n_samples < is_splits:
        raise ConfigError(
            f"the Inception Score with {is_splits} splits needs at least {is_splits} samples, "
            f"got {n_samples}"
        )


def evaluate(
    samples: Tensor,
    reference: Tensor | None,
    *,
    metrics: str | Sequence[str] = ("fid",),
    extractor: FeatureExtractor | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 1,
    pr_k: int = 3,
    bpd_fn: Callable[[Tensor], Tensor] | None = None,
    bpd_batch_size: int = 64,
    seed: int = 0,
    on_metric: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Compute ``metrics`` for generated ``samples`` against real ``reference`` images.

    Both are (N, C, H, W) tensors in [-1, 1]. ``extractor`` maps images to
    features and logits (e.g. :func:`~noisecraft.metrics.features.mnist_extractor`);
    ``bpd_fn`` maps a batch of reference images to per-image bits/dim.
    Returns a flat ``{name: value}`` dict (see the module docstring for the keys).
    ``on_metric`` is called with (a copy of) the results so far after each metric, so a
    caller can save them as they come.
    """
    names = parse_metrics(metrics)
    needs_reference = _NEEDS_FEATURES.intersection(names) or "bpd" in names
    if needs_reference and reference is None:
        raise ConfigError(f"metrics {', '.join(names)} need reference images; pass reference")
    n_ref = len(reference) if reference is not None else 0
    if _NEEDS_FEATURES.intersection(names) or "is" in names:
        if extractor is None:
            raise ConfigError(
                "fid/kid/is/pr need a feature network: pass extractor "
                "(e.g. noisecraft.metrics.mnist_extractor())"
            )
        _check_sizes(
            names, len(samples), n_ref, extractor.feature_dim, is_splits=is_splits, pr_k=pr_k
        )
    if "bpd" in names and bpd_fn is None:
        raise ConfigError("bpd needs the model: pass bpd_fn (images -> bits/dim per image)")

    out: dict[str, float] = {}
    feats_fake = feats_real = logits_fake = None
    if _NEEDS_FEATURES.intersection(names) or "is" in names:
        both = getattr(extractor, "features_and_logits", None)
        if "is" in names and both is not None:
            feats_fake, logits_fake = both(samples)
        else:
            if _NEEDS_FEATURES.intersection(names):
                feats_fake = extractor(samples)
            if "is" in names:
                logits_fake = extractor.logits(samples)
        if _NEEDS_FEATURES.intersection(names):
            feats_real = extractor(reference)

    def done() -> None:
        if on_metric is not None:
            on_metric(dict(out))

    if "fid" in names:
        out["fid"] = fid_from_features(feats_fake, feats_real)
        done()
    if "kid" in names:
        out["kid"], out["kid_std"] = kernel_inception_distance(
            feats_fake, feats_real, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
        done()
    if "is" in names:
        out["is"], out["is_std"] = inception_score(logits_fake, splits=is_splits)
        done()
    if "pr" in names:
        out["precision"], out["recall"] = precision_recall(feats_real, feats_fake, k=pr_k)
        done()
    if "bpd" in names:
        with torch.no_grad():
            values = torch.cat(
                [
                    bpd_fn(b).detach().double().flatten().cpu()
                    for b in reference.split(bpd_batch_size)
                ]
            )
        if len(values) != n_ref:
            raise ConfigError(f"bpd_fn must return one value per image, got {len(values)}/{n_ref}")
        out["bpd"] = values.mean().item()
        done()
    return out
