"""Feature extractors: the network a metric looks through.

A :class:`FeatureExtractor` maps images in [-1, 1], shape (N, C, H, W), to
float64 features (N, D) (FID, KID, precision/recall) and to class logits
(N, K) (Inception Score). Two are provided:

- ``"inception"``: the FID InceptionV3 (2048-d pool features, 1008 logits),
  from a weights file the user gives (:mod:`noisecraft.metrics.inception`);
- ``"mnist"``: the shipped MNIST classifier (64-d penultimate features,
  10 logits) (:mod:`noisecraft.metrics.mnist_net`).

Any object with ``feature_dim``, ``__call__`` and ``logits`` works; one that also
has ``features_and_logits`` is run once instead of twice when both are needed.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisecraft.errors import ConfigError, unknown_name


@runtime_checkable
class FeatureExtractor(Protocol):
    """Images in [-1, 1], (N, C, H, W) -> float64 features (N, feature_dim) / logits (N, K)."""

    feature_dim: int

    def __call__(self, images: Tensor) -> Tensor: ...

    def logits(self, images: Tensor) -> Tensor: ...


class NetFeatureExtractor:
    """Wrap a network with ``features(x)``, ``classify(features)`` and ``feature_dim``.

    Images are checked to be in [-1, 1] (values a little outside, as a sampler
    may give, are clamped), given the channel count the network wants (grey
    is repeated to RGB), resized to ``size`` (bilinear) and run in batches
    without gradients. Outputs are float64 on the CPU.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        size: int,
        channels: int,
        antialias: bool = False,
        batch_size: int = 100,
        device: str | torch.device = "cpu",
        name: str = "",
    ) -> None:
        self.net = net.eval().requires_grad_(False).to(device)
        self.feature_dim = int(net.feature_dim)
        self.size, self.channels, self.antialias = size, channels, antialias
        self.batch_size, self.device, self.name = batch_size, torch.device(device), name

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ConfigError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.5 or hi > 1.5:
            raise ConfigError(
                f"images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                "convert 0..255 pixels with x / 127.5 - 1"
            )
        x = x.to(self.device, torch.float32).clamp(-1, 1)
        c = x.shape[1]
        if c != self.channels:
            if c == 1 and self.channels == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise ConfigError(
                    f"the {self.name or 'feature'} network takes {self.channels}-channel images, "
                    f"got {c} channels"
                )
        if x.shape[-2:] != (self.size, self.size):
            # Inception: plain bilinear, as pytorch-fid; MNIST: antialiased (32 -> 28 digits).
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=self.antialias
            )
        return x

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Features (N, D) and logits (N, K), both float64 on the CPU, in one pass."""
        feats, logits = [], []
        for batch in images.split(self.batch_size):
            f = self.net.features(self._prepare(batch))
            feats.append(f.double().cpu())
            logits.append(self.net.classify(f).double().cpu())
        return torch.cat(feats), torch.cat(logits)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return torch.cat(
            [
                self.net.features(self._prepare(b)).double().cpu()
                for b in images.split(self.batch_size)
            ]
        )

    def logits(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[1]


def mnist_extractor(
    path: str | os.PathLike | None = None,
    *,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> NetFeatureExtractor:
    """The shipped MNIST classifier (or the one at ``path``): 28x28 grey digits."""
    from noisecraft.metrics.mnist_net import load_mnist_classifier

    net = load_mnist_classifier(path)
    return NetFeatureExtractor(
        net, size=28, channels=1, antialias=True, batch_size=batch_size, device=device, name="mnist"
    )


def inception_extractor(
    path: str | os.PathLike,
    *,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
) -> NetFeatureExtractor:
    """The FID InceptionV3 from the weights file at ``path`` (resizes to 299 like pytorch-fid)."""
    from noisecraft.metrics.inception import INPUT_SIZE, load_fid_inception

    net = load_fid_inception(path)
    return NetFeatureExtractor(
        net, size=INPUT_SIZE, channels=3, batch_size=batch_size, device=device, name="inception"
    )


EXTRACTORS = ("inception", "mnist")


def get_extractor(
    name: str,
    path: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
) -> NetFeatureExtractor:
    """Build an extractor by name: ``"mnist"`` (path optional) or ``"inception"`` (path needed)."""
    if name == "mnist":
        return mnist_extractor(path, device=device)
    if name == "inception":
        if path is None:
            from noisecraft.metrics.inception import FID_WEIGHTS_NAME, FID_WEIGHTS_URL

            raise ConfigError(
                f"the inception feature net needs its weights file: download {FID_WEIGHTS_NAME} "
                f"from {FID_WEIGHTS_URL} and give its path"
            )
        return inception_extractor(path, device=device)
    raise unknown_name("feature network", name, EXTRACTORS)
