"""Base64 images in and out of requests, within limits; the A1111 mask blur.

An image in a request is decoded by Pillow as PNG, JPEG or WebP only (never by pickle or
any other loader), after its base64 text and decoded bytes are checked against
``max_image_bytes`` and its header's size against ``max_pixels`` (a decompression bomb is
refused before it is decoded).
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from noisecraft.errors import ConfigError

#: The formats a request's image may be in.
FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,")


class ImageTooLargeError(ConfigError):
    """A request's image is over the byte limit (HTTP 413)."""


def decode_image(text: str, field: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """A request's base64 image (optionally a ``data:image/...;base64,`` URL), loaded."""
    text = _DATA_URL.sub("", text.strip(), count=1)
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:
        raise ImageTooLargeError(
            f"{field} is over {max_bytes:,} bytes; send a smaller image", settings=[]
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{field} is not valid base64 image data") from None
    if len(raw) > max_bytes:
        raise ImageTooLargeError(f"{field} is over {max_bytes:,} bytes; send a smaller image")
    try:
        im = Image.open(io.BytesIO(raw), formats=FORMATS)
        width, height = im.size
        if width * height > max_pixels:
            raise ConfigError(
                f"{field} is {width}x{height} = {width * height:,} pixels, more than the "
                f"server allows ({max_pixels:,}); send a smaller image"
            )
        im.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
        raise ConfigError(f"cannot read {field} ({e}); send a PNG, JPEG or WebP image") from None
    return im


def encode_png_file(data: bytes) -> str:
    """Bytes of a PNG as base64 text (what A1111 answers, no ``data:`` prefix)."""
    return base64.b64encode(data).decode("ascii")


def encode_image(im: Image.Image) -> str:
    """A PIL image as base64 PNG text."""
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return encode_png_file(buf.getvalue())


def _gauss_1d(sigma: float) -> np.ndarray:
    size = 2 * int(2.5 * sigma + 0.5) + 1  # A1111's kernel size for a mask blur
    x = np.arange(size) - size // 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """A1111's mask blur: a Gaussian of standard deviation ``blur_x`` along rows and
    ``blur_y`` along columns, kernel ``2 * int(2.5 * sigma + 0.5) + 1`` wide, borders
    mirrored (OpenCV's default). A1111 runs OpenCV's fixed-point blur, so pixels may differ
    by one level from this float one."""
    arr = np.asarray(mask.convert("L"), dtype=np.float64)
    for axis, sigma in ((1, blur_x), (0, blur_y)):
        if sigma <= 0:
            continue
        k = _gauss_1d(float(sigma))
        r = len(k) // 2
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        mode = "reflect" if arr.shape[axis] > r else "symmetric"
        padded = np.pad(arr, pad, mode=mode)
        arr = np.apply_along_axis(lambda v, k=k: np.convolve(v, k, mode="valid"), axis, padded)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


__all__ = [
    "FORMATS",
    "ImageTooLargeError",
    "blur_mask",
    "decode_image",
    "encode_image",
    "encode_png_file",
]
