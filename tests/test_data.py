import pytest
import torch
from PIL import Image

from noisecraft.errors import DataError, UnknownNameError
from noisecraft.training.config import DataConfig
from noisecraft.training.data import batch_indices, load_dataset


def test_mnist_is_real_digits_in_range():
    ds = load_dataset(DataConfig(name="mnist", image_size=28))
    assert ds.images.shape == (5000, 1, 28, 28)
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert ds.num_classes == 10 and torch.bincount(ds.labels).tolist() == [500] * 10
    # a digit is mostly background: the border rows are black
    assert (ds.images[:, :, 0, :] == -1).float().mean() > 0.99


def test_digits_resized():
    ds = load_dataset(DataConfig(name="digits", image_size=16))
    assert ds.images.shape == (1797, 1, 16, 16) and ds.labels.shape == (1797,)


def test_folder_of_any_sizes_with_classes_and_corrupt_files(tmp_path):
    for cls, size in [("cats", (40, 30)), ("dogs", (17, 50))]:
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", size, (i * 80, 10, 200)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"not an image")
    ds = load_dataset(DataConfig(name="folder", path=str(tmp_path), image_size=16, channels=3))
    assert ds.images.shape == (6, 3, 16, 16)
    assert ds.skipped == 1
    assert ds.class_names == ("cats", "dogs") and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # colour survives: blue channel of (0, 10, 200) maps to 200/127.5 - 1
    assert abs(ds.images[0, 2].mean().item() - (200 / 127.5 - 1)) < 0.02


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(DataConfig(name="folder", path=str(tmp_path / "missing")))
    with pytest.raises(DataError, match="no images"):
        load_dataset(DataConfig(name="folder", path=str(tmp_path)))
    with pytest.raises(UnknownNameError, match="did you mean 'mnist'"):
        load_dataset(DataConfig(name="minst"))


def test_batch_order_is_pure_and_covers_each_epoch():
    a = [batch_indices(10, 4, s, seed=3) for s in range(5)]
    b = [batch_indices(10, 4, s, seed=3) for s in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    stream = torch.cat(a)  # 20 indices = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(batch_indices(10, 4, 0, seed=4), a[0])
