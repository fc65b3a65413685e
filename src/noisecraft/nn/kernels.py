"""Faster CPU inference kernels for linear layers and convolutions (same math, other kernels).

On the CPU, ``nn.Linear`` runs its matrix product through the BLAS PyTorch is built with (MKL
for the x86 wheels), and ``nn.Conv2d`` through oneDNN's direct convolution. Measured with
torch 2.13 on a 2-core AMD EPYC (float32, one thread, Stable Diffusion 1.5's U-Net shapes):

* oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op ``torch.compile``'s CPU
  backend uses for linear layers) is 1.5-4x faster than ``F.linear``: e.g. (2048 x 320) @
  (320 x 2560) 25 ms instead of 49 ms, (2048 x 320) @ (320 x 320) 2.1 ms instead of 6.3 ms.
* A 1x1 convolution through ``torch.ops.mkldnn._convolution_pointwise`` is up to 2x faster
  than ``F.conv2d`` (1280 -> 1280 channels at 32x32: 41 ms instead of 82 ms).
* A convolution with many channels on few pixels (the U-Net's lowest levels) is 2-8x faster
  as im2col + oneDNN matmul than as oneDNN's direct convolution (3x3, 1280 -> 1280 channels,
  4x4 pixels, batch 2: 7.8 ms instead of 38 ms; 8x8: 22 ms instead of 50 ms), and slower on
  many pixels (32x32: 770 ms instead of 430 ms). :func:`conv2d` takes im2col when the output
  has ``M = batch * out_h * out_w`` pixels with ``M * 4096 <= out_channels**2`` (e.g. at most
  400 pixels for 1280 channels, 100 for 640, 25 for 320), a rule read off those measurements
  with a margin (the break-even was near ``M * 3200 = out_channels**2``).
* Nearest 2x upsampling followed by a 3x3 convolution (the decoders' ``Upsample``) is four
  2x2 convolutions of the input, interleaved (:func:`upsample_conv2d`): 16 instead of 36
  multiply-adds per output pixel, 1.6-1.8x faster for the SD VAE's upsampling convolutions.

``docs/performance.md`` has the resulting U-Net / VAE / text encoder times against diffusers
(``bench/sd_speed.py``).

Each fast path computes the same sums as the reference op in another order (float32 rounding,
differences of ~1e-6 relative; ``tests/test_nn.py`` checks them against ``F.linear`` /
``F.conv2d``). They are taken only where they are exact replacements: CPU float32 tensors, no
autograd graph being recorded (the oneDNN ops have no backward, so training always takes the
reference ops), not under ``torch.autocast`` (autocast does not cast these oneDNN ops: they
would silently run in float32), not while ``torch.compile`` traces (it has its own fusions),
oneDNN available and enabled (``torch.backends.mkldnn``), and :func:`set_fast_kernels` not
switched off. Everything else (CUDA, float16, training, autocast) runs the reference op
unchanged.

bfloat16 tensors (a U-Net stored bf16, ``noisecraft.load(dtype="bf16")``) take the reference
ops: the oneDNN paths accept bf16 (where oneDNN has bf16 kernels,
``torch.ops.mkldnn._is_mkldnn_bf16_supported``) and were faster one by one (a 2048 x 320 x
2560 matmul 9.5 ms instead of 14.4 ms; a 3x3 1280-channel conv on 4x4 pixels as im2col 6.2 ms
instead of 9.7 ms; one thread), but a whole SD 1.5 U-Net pass at 256x256 was faster without
them in three runs of four (two threads, the least loaded run: 1.71x fp32's speed without,
1.53x with; on a quiet box 1.56x against 1.49x at 256x256 and 1.47x against 1.42x at
512x512; ``bench/bf16_speed.py``, docs/performance.md "bf16 on the CPU"). ``_FAST_DTYPES``
lets them in for bf16 (the bench's comparison row; the sub-pixel upsampling then sums its
kernel taps in float32 before rounding them to bf16).

:class:`Linear` and :class:`Conv2d` are ``nn.Linear`` / ``nn.Conv2d`` with these forwards:
same parameters, same names, same state dicts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ENABLED = True
_OPS: tuple | None = None
#: The dtypes the fast paths take: float32 (bf16 measured slower with them: module
#: docstring); ``bench/bf16_speed.py`` adds bf16 for its comparison row (then only where
#: oneDNN has bf16 kernels: :func:`_fast`).
_FAST_DTYPES: tuple[torch.dtype, ...] = (torch.float32,)
_BF16: bool | None = None


def _bf16_ok() -> bool:
    """Whether this torch's oneDNN has bfloat16 kernels for this CPU (cached)."""
    global _BF16
    if _BF16 is None:
        try:
            _BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _BF16 = False
    return _BF16


def _ops() -> tuple | None:
    """(linear_pointwise, convolution_pointwise), or None when this torch has no oneDNN ops."""
    global _OPS
    if _OPS is None:
        try:
            ops = (torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._convolution_pointwise)
        except (AttributeError, RuntimeError):
            ops = ()
        _OPS = ops
    return _OPS or None


def set_fast_kernels(enabled: bool) -> bool:
    """Switch the CPU fast paths of this module on or off process-wide; returns the previous
    setting. On by default; off gives exactly the reference ``F.linear`` / ``F.conv2d``."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


@contextlib.contextmanager
def fast_kernels(enabled: bool) -> Iterator[None]:
    """:func:`set_fast_kernels` for the body of a ``with`` block."""
    previous = set_fast_kernels(enabled)
    try:
        yield
    finally:
        set_fast_kernels(previous)


def _fast(x: Tensor, *params: Tensor | None) -> bool:
    """Whether the oneDNN fast path may replace the reference op for these tensors."""
    dtype = x.dtype
    if not _ENABLED or x.device.type != "cpu" or dtype not in _FAST_DTYPES:
        return False
    if any(p is not None and (p.device.type != "cpu" or p.dtype != dtype) for p in params):
        return False
    if dtype == torch.bfloat16 and not _bf16_ok():
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p is not None and p.requires_grad for p in params)
    ):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if torch.compiler.is_compiling() or not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.backends.mkldnn.enabled) and _ops() is not None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: ``x @ weight.T + bias`` (oneDNN matmul on the CPU fast
    path, see the module docstring)."""
    if not _fast(x, weight, bias):
        return F.linear(x, weight, bias)
    linear_pointwise = _ops()[0]  # type: ignore[index]
    return linear_pointwise(x, weight, bias, "none", [], "")


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_path(x_shape: tuple[int, ...], weight_shape: tuple[int, ...], stride, padding) -> str:
    """Which kernel :func:`conv2d` uses on its fast path for these shapes: ``"im2col"``
    (``M * 4096 <= out_channels**2`` output pixels, kernel larger than 1x1), ``"pointwise"``
    (1x1 kernels) or ``"reference"`` (``F.conv2d``)."""
    stride, padding = _pair(stride), _pair(padding)
    cout, _, kh, kw = weight_shape
    b, _, h, w = x_shape
    out_h = (h + 2 * padding[0] - kh) // stride[0] + 1
    out_w = (w + 2 * padding[1] - kw) // stride[1] + 1
    if (kh, kw) == (1, 1):
        return "pointwise"
    if b * out_h * out_w * 4096 <= cout * cout:
        return "im2col"
    return "reference"


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (dilation 1, one group) for (B, C, H, W)
    ``x``; on the CPU fast path a 1x1 convolution runs through oneDNN's pointwise op, and a
    convolution on few output pixels as im2col + oneDNN matmul (:func:`conv_path`)."""
    if x.ndim != 4 or isinstance(padding, str) or not _fast(x, weight, bias):
        return F.conv2d(x, weight, bias, stride, padding)
    linear_pointwise, conv_pointwise = _ops()  # type: ignore[misc]
    stride, padding = _pair(stride), _pair(padding)
    path = conv_path(tuple(x.shape), tuple(weight.shape), stride, padding)
    if path == "pointwise":
        return conv_pointwise(
            x, weight, bias, list(padding), list(stride), [1, 1], 1, "none", [], ""
        )
    if path == "im2col":
        cout, _, kh, kw = weight.shape
        b, _, h, w = x.shape
        out_h = (h + 2 * padding[0] - kh) // stride[0] + 1
        out_w = (w + 2 * padding[1] - kw) // stride[1] + 1
        # (B, C*kh*kw, L) patches, in the channel-major order of weight.reshape(cout, -1)
        cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)
        out = linear_pointwise(cols.transpose(1, 2), weight.reshape(cout, -1), bias, "none", [], "")
        out = out.transpose(1, 2).reshape(b, cout, out_h, out_w)  # channels-last strides
        # an NCHW input gets an NCHW output, as F.conv2d gives (a small copy: few pixels)
        return out.contiguous() if x.is_contiguous() else out
    return F.conv2d(x, weight, bias, stride, padding)


def _phase_taps(w: Tensor, dim: int) -> Tensor:
    """Along kernel axis ``dim`` (size 3) of ``w``, the two 2-tap kernels of the two output
    phases of "nearest 2x upsampling, then the 3-tap kernel": phase 0 reads input rows
    ``(i-1, i)`` with taps ``(w0, w1 + w2)``, phase 1 rows ``(i, i+1)`` with ``(w0 + w1, w2)``.
    Returns the phases stacked in a new leading axis (size 2), the taps in ``dim`` (size 2)."""
    w0, w1, w2 = w.unbind(dim)
    phase0 = torch.stack([w0, w1 + w2], dim)
    phase1 = torch.stack([w0 + w1, w2], dim)
    return torch.stack([phase0, phase1])


def upsample_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, size: tuple[int, int] | None = None
) -> Tensor:
    """``F.conv2d(F.interpolate(x, size, mode="nearest"), weight, bias, padding=1)`` for a 3x3
    ``weight``, computed without the upsampled input (the decoders' and U-Nets' upsampling).

    ``size`` (height, width) is twice the input's (None), or one less along an axis: the
    U-Net upsampling to an odd skip connection (:func:`upsampled_size`).

    Output pixel ``(2i + a, 2j + b)`` sees only input pixels ``i - 1 + a .. i + a`` and
    ``j - 1 + b .. j + b``: nearest upsampling repeats each input pixel twice, so of the 3x3
    kernel's taps, those that land on the same input pixel add up (:func:`_phase_taps`). The
    four output phases ``(a, b)`` are thus 2x2 convolutions of the input itself, computed as
    one convolution with ``4 * out_channels`` outputs and interleaved: 16 multiply-adds per
    output pixel and input channel instead of 36 (measured on the CPU, one thread, the SD
    VAE's upsampling convolutions: 1.6-1.8x faster, e.g. 512 channels 64 -> 128 px 478 ms
    instead of 784 ms). The same sums, grouped differently: equal up to float rounding.

    An odd ``size`` is the 2x upsampling without its last row (column), and nearest
    interpolation to ``2h - 1`` picks exactly those rows (source row ``floor(k h / (2h - 1))
    = floor(k / 2)`` for ``k < 2h - 1``). The 2x result is then right except in the last
    kept row, whose bottom kernel taps saw the dropped row (a copy of input row ``h - 1``)
    where the cropped input has zero padding: that row's contribution, a 1-row convolution,
    is subtracted before cropping (likewise for the last column, on the cropped rows).
    """
    b, _, h, w = x.shape
    out_h, out_w = upsampled_size(h, w, size)
    cout = weight.shape[0]
    rows = _phase_taps(weight.float(), 2)  # (2 [a], cout, cin, 2, 3), summed in float32
    taps = _phase_taps(rows, 4).transpose(0, 1).to(weight.dtype)  # (2, 2, cout, cin, 2, 2)
    phases = conv2d(
        F.pad(x, (1, 1, 1, 1)),
        taps.reshape(4 * cout, weight.shape[1], 2, 2),
        None if bias is None else bias.repeat(4),
    )  # (B, 4 * cout, h + 1, w + 1), phase (a, b) in channels (2a + b) * cout ...
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((b, cout, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=fmt)
    for a in (0, 1):
        for c in (0, 1):
            p = 2 * a + c
            out[:, :, a::2, c::2] = phases[:, p * cout : (p + 1) * cout, a : a + h, c : c + w]
    if (out_h, out_w) == (2 * h, 2 * w):
        return out
    if out_h < 2 * h:  # the dropped row 2h - 1 (= input row h - 1) seen by the last kept one
        dropped = x[:, :, h - 1 :, :].repeat_interleave(2, dim=3)  # (B, C, 1, 2w)
        out[:, :, out_h - 1 : out_h, :] -= F.conv2d(dropped, weight[:, :, 2:, :], padding=(0, 1))
    if out_w < 2 * w:  # the dropped column, on the kept rows (zero below them)
        dropped = x[:, :, :, w - 1 :].repeat_interleave(2, dim=2)[:, :, :out_h]  # (B, C, H, 1)
        col = out[:, :, :out_h, out_w - 1 :]
        col -= F.conv2d(dropped, weight[:, :, :, 2:], padding=(1, 0))
    return out[:, :, :out_h, :out_w].contiguous(memory_format=fmt)


def upsampled_size(h: int, w: int, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """``size`` as (height, width), checked to be what a 2x upsampling of an ``h`` x ``w``
    map may be cropped to: ``2h`` or ``2h - 1`` rows, ``2w`` or ``2w - 1`` columns (None =
    ``(2h, 2w)``). The U-Net upsamples a level to its skip connection, whose odd side ``n``
    was downsampled to ``ceil(n / 2)``; anything else is a ``ValueError`` (a wiring bug)."""
    if size is None:
        return 2 * h, 2 * w
    out_h, out_w = int(size[0]), int(size[1])
    if out_h not in (2 * h, 2 * h - 1) or out_w not in (2 * w, 2 * w - 1):
        raise ValueError(f"cannot upsample {h}x{w} by 2 to {out_h}x{out_w}")
    return out_h, out_w


def upsample_path(x_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> str:
    """How :class:`~noisecraft.nn.resnet.Upsample`'s conv runs on the CPU fast path:
    ``"subpixel"`` (:func:`upsample_conv2d`) where the conv at the upsampled size would be
    a direct convolution (:func:`conv_path` ``"reference"``), else ``"upsample"`` (upsample,
    then :func:`conv2d`: the im2col path already handles few pixels well)."""
    b, c, h, w = x_shape
    up = (b, c, 2 * h, 2 * w)
    if tuple(weight_shape[2:]) == (3, 3) and conv_path(up, weight_shape, 1, 1) == "reference":
        return "subpixel"
    return "upsample"


def fast_upsample_conv(
    x: Tensor, conv: nn.Conv2d, size: tuple[int, int] | None = None
) -> Tensor | None:
    """:func:`upsample_conv2d` with ``conv``'s weights (to ``size``, None = 2x) where the fast
    path applies (see :func:`upsample_path`), else None (the caller upsamples and convolves)."""
    if (
        x.ndim != 4
        or conv.kernel_size != (3, 3)
        or conv.stride != (1, 1)
        or conv.padding != (1, 1)
        or conv.dilation != (1, 1)
        or conv.groups != 1
        or conv.padding_mode != "zeros"
        or not _fast(x, conv.weight, conv.bias)
        or upsample_path(tuple(x.shape), tuple(conv.weight.shape)) != "subpixel"
    ):
        return None
    return upsample_conv2d(x, conv.weight, conv.bias, size)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters and names)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward is :func:`conv2d` where that applies (dilation 1, one
    group, zero padding); otherwise ``nn.Conv2d``'s own forward."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.groups != 1
            or self.dilation != (1, 1)
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
        ):
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding)
