"""Control images: the preprocessors that need no model, and fitting a hint to the image size.

A ControlNet reads a "hint" (RGB in [0, 1], white lines on black for the edge models). The
preprocessors turn an ordinary picture into one, as AUTOMATIC1111's ControlNet extension
names them:

* ``none``: the image is already a hint;
* ``canny``: Canny (1986) edges of the grey image, white on black, hysteresis thresholds 100
  and 200 on the 8-bit gradient magnitude (the extension's defaults), a Gaussian of sigma 1
  first; computed by scikit-image (the ``control`` extra), imported only when used;
* ``scribble``: a drawing in dark lines on light paper -> white lines on black (grey below
  128 is a line), for the scribble models;
* ``threshold``: grey above 127 -> white, else black (the extension's ``threshold``).

Then the hint is fitted to the output size (:func:`fit_hint`) in the extension's three resize
modes: ``crop`` ("Crop and Resize": scaled to cover, centre cropped), ``resize`` ("Just
Resize": stretched) and ``fill`` ("Resize and Fill": scaled to fit, the rest filled with the
median colour of the hint's border). As in the extension, the preprocessor runs on the
image as given and its result is resized; a binary hint (canny, scribble, threshold) is
binarised again after resizing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from noisecraft.errors import ConfigError, unknown_name

#: Preprocessor name -> whether its hint is binary (re-binarised after a resize).
PREPROCESSORS = {"none": False, "canny": True, "scribble": True, "threshold": True}
#: Resize mode -> the extension's name for it (its infotext ``Resize Mode``).
RESIZE_MODES = {"crop": "Crop and Resize", "resize": "Just Resize", "fill": "Resize and Fill"}

CANNY_LOW, CANNY_HIGH, CANNY_SIGMA = 100.0, 200.0, 1.0


def check_preprocess(name: str) -> str:
    """``name`` if it is a known preprocessor, else a one-line error naming the choices."""
    if name not in PREPROCESSORS:
        raise unknown_name("control preprocessor", str(name), PREPROCESSORS, setting="preprocess")
    return name


def check_resize(mode: str) -> str:
    """``mode`` if it is a known resize mode, else a one-line error naming the choices."""
    if mode not in RESIZE_MODES:
        raise unknown_name("control resize mode", str(mode), RESIZE_MODES, setting="resize")
    return mode


def _grey255(image: Tensor) -> Tensor:
    """(1, 3, h, w) in [0, 1] -> (h, w) grey in [0, 255] (ITU-R 601 luma, as PIL's "L")."""
    r, g, b = image[0].float() * 255.0
    return 0.299 * r + 0.587 * g + 0.114 * b


def _rgb(mask: Tensor) -> Tensor:
    return mask.float()[None, None].expand(1, 3, -1, -1).contiguous()


def canny(image: Tensor) -> Tensor:
    """Canny edges of ``image`` (module docstring) as a white-on-black hint."""
    try:
        from skimage.feature import canny as sk_canny
    except ImportError:
        raise ConfigError(
            "the canny preprocessor needs scikit-image: pip install 'noisecraft[control]'"
        ) from None
    grey = _grey255(image).cpu().double().numpy()
    edges = sk_canny(
        grey,
        sigma=CANNY_SIGMA,
        low_threshold=CANNY_LOW,
        high_threshold=CANNY_HIGH,
        mode="nearest",
    )
    return _rgb(torch.from_numpy(np.ascontiguousarray(edges)))


def preprocess(image: Tensor, name: str) -> Tensor:
    """The hint of ``image`` (1, 3, h, w) in [0, 1] by preprocessor ``name``, same size."""
    check_preprocess(name)
    image = image.float().clamp(0, 1)
    if name == "none":
        return image
    if name == "canny":
        return canny(image)
    grey = _grey255(image)
    return _rgb(grey < 128) if name == "scribble" else _rgb(grey > 127)


def _resize(image: Tensor, height: int, width: int) -> Tensor:
    if tuple(image.shape[-2:]) == (height, width):
        return image
    out = F.interpolate(image, size=(height, width), mode="bicubic", antialias=True)
    return out.clamp(0, 1)


def fit_hint(hint: Tensor, height: int, width: int, mode: str, binary: bool = False) -> Tensor:
    """``hint`` (1, 3, h, w) fitted to ``height`` x ``width`` by resize ``mode`` (module
    docstring); ``binary``: round the result back to 0 / 1."""
    check_resize(mode)
    h, w = hint.shape[-2:]
    if (h, w) == (height, width):
        return hint
    if mode == "resize":
        out = _resize(hint, height, width)
    elif mode == "crop":
        k = max(height / h, width / w)
        nh, nw = max(height, round(h * k)), max(width, round(w * k))
        scaled = _resize(hint, nh, nw)
        top, left = (nh - height) // 2, (nw - width) // 2
        out = scaled[..., top : top + height, left : left + width]
    else:
        k = min(height / h, width / w)
        nh, nw = min(height, max(1, round(h * k))), min(width, max(1, round(w * k)))
        border = torch.cat([hint[0, :, 0], hint[0, :, -1], hint[0, :, :, 0], hint[0, :, :, -1]], 1)
        colour = border.median(dim=1).values
        out = colour.reshape(1, 3, 1, 1).expand(1, 3, height, width).clone()
        top, left = (height - nh) // 2, (width - nw) // 2
        out[..., top : top + nh, left : left + nw] = _resize(hint, nh, nw)
    out = out.contiguous()
    return (out > 0.5).float() if binary else out


def make_hint(
    image: Tensor, height: int, width: int, *, preprocess_name: str, resize: str
) -> Tensor:
    """The hint a ControlNet unit gets: ``image`` (1, 3, h, w) in [0, 1] preprocessed, then
    fitted to ``height`` x ``width``."""
    hint = preprocess(image, preprocess_name)
    return fit_hint(hint, height, width, resize, binary=PREPROCESSORS[preprocess_name])


__all__ = [
    "PREPROCESSORS",
    "RESIZE_MODES",
    "canny",
    "check_preprocess",
    "check_resize",
    "fit_hint",
    "make_hint",
    "preprocess",
]
