"""Images in and out of the API: PIL images, files, numpy arrays or tensors.

Inputs become the tensors :func:`~noisecraft.pipelines.generate.generate` takes: an init
image as (1, C, H, W) in [-1, 1] (``u / 127.5 - 1`` for 8-bit pixels), a mask as
(1, 1, H, W) in [0, 1] (white = repaint). Outputs are 8-bit PIL images
(``clamp(x / 2 + 0.5, 0, 1) * 255`` rounded, as diffusers writes them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from noisecraft.errors import ConfigError
from noisecraft.viz.images import to_uint8

#: What an image argument may be.
ImageLike = Image.Image | str | os.PathLike | np.ndarray | Tensor


def open_image(path: str | os.PathLike, setting: str) -> Image.Image:
    """A file as a loaded PIL image (one-line error naming ``setting`` if it cannot be read)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"@{setting} {path} not found; give the path of an image file", settings=[setting]
        )
    try:
        im = Image.open(path)
        im.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(
            f"cannot read @{setting} {path} ({e}); give a PNG or JPEG image", settings=[setting]
        ) from None
    return im


def _pil(image: Any, setting: str) -> Image.Image | None:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return open_image(image, setting)
    return None


def image_tensor(image: ImageLike, channels: int, setting: str = "init_image") -> Tensor:
    """An image as (B, C, H, W) float32 in [-1, 1] with ``channels`` channels (1 = grey).

    A tensor is taken as it is: (C, H, W) or (B, C, H, W), already in [-1, 1]. A numpy array
    is (H, W) or (H, W, C) 8-bit pixels, like a PIL image."""
    if isinstance(image, Tensor):
        t = image[None] if image.ndim == 3 else image
        if t.ndim != 4 or t.shape[1] != channels or not t.is_floating_point():
            raise ConfigError(
                f"@{setting} as a tensor must be float (C, H, W) or (B, C, H, W) with "
                f"{channels} channel(s) in [-1, 1], got {tuple(image.shape)} {image.dtype}",
                settings=[setting],
            )
        return t.float()
    im = _pil(image, setting)
    if im is not None:
        image = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
        raise ConfigError(
            f"@{setting} must be a PIL image, an image file, an (H, W[, C]) array or a tensor, "
            f"got {type(image).__name__}",
            settings=[setting],
        )
    arr = np.asarray(image, dtype=np.float32)
    arr = arr[..., None] if arr.ndim == 2 else arr
    if arr.shape[-1] != channels:
        if channels == 1:
            arr = arr[..., :3].mean(axis=-1, keepdims=True)
        elif arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        else:
            arr = arr[..., :channels]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None] / 127.5 - 1.0


def mask_tensor(mask: ImageLike, setting: str = "mask") -> Tensor:
    """A mask as (B, 1, H, W) in [0, 1]; white (1) = repaint. Tensors are taken as they are:
    (H, W), (1, H, W) or (B, 1, H, W) in [0, 1]."""
    if isinstance(mask, Tensor):
        return mask.float()
    im = _pil(mask, setting)
    arr = np.asarray(im.convert("L")) if im is not None else mask
    if not isinstance(arr, np.ndarray) or arr.ndim not in (2, 3):
        raise ConfigError(
            f"@{setting} must be a PIL image, an image file, an (H, W) array or a tensor, "
            f"got {type(mask).__name__}",
            settings=[setting],
        )
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=-1)
    return torch.from_numpy(np.ascontiguousarray(arr))[None, None] / 255.0


def to_pil(image: Tensor) -> Image.Image:
    """One (C, H, W) image in [-1, 1] as an 8-bit PIL image (grey for one channel)."""
    arr = to_uint8(image[None])[0]
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


__all__ = ["ImageLike", "image_tensor", "mask_tensor", "open_image", "to_pil"]
