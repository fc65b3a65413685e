"""Sample-quality metrics: FID, KID, Inception Score, precision/recall, bits per dimension.

All metric maths runs in float64 on feature vectors from a
:class:`FeatureExtractor` (the FID InceptionV3 from a user-given weights file,
or the shipped MNIST classifier). :func:`evaluate` is the one entry point.
"""

from noisecraft.metrics.evaluate import METRICS, evaluate, parse_metrics
from noisecraft.metrics.features import (
    EXTRACTORS,
    FeatureExtractor,
    NetFeatureExtractor,
    get_extractor,
    inception_extractor,
    mnist_extractor,
)
from noisecraft.metrics.frechet import (
    GaussianStats,
    feature_stats,
    fid_from_features,
    frechet_distance,
)
from noisecraft.metrics.inception_score import inception_score
from noisecraft.metrics.kid import kernel_inception_distance, mmd2_unbiased
from noisecraft.metrics.precision_recall import knn_radii, precision_recall

__all__ = [
    "EXTRACTORS",
    "METRICS",
    "FeatureExtractor",
    "GaussianStats",
    "NetFeatureExtractor",
    "evaluate",
    "feature_stats",
    "fid_from_features",
    "frechet_distance",
    "get_extractor",
    "inception_extractor",
    "inception_score",
    "kernel_inception_distance",
    "knn_radii",
    "mmd2_unbiased",
    "mnist_extractor",
    "parse_metrics",
    "precision_recall",
]
