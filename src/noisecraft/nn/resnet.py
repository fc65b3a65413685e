"""Residual block with a timestep embedding, and 2x down / up sampling.

Any size goes through: downsampling gives ``ceil(n / 2)`` of an odd side ``n`` (a stride-2
conv with padding 1, or average pooling whose last window holds one row), and upsampling takes
the size to return to (``size``, the skip connection's in a U-Net) and then drops the extra
row / column of the 2x map, as diffusers' ``Upsample2D(output_size=...)`` does.

Module and parameter names follow the openaimodel layout of improved-diffusion, guided-diffusion
and Stable Diffusion's LDM code (``in_layers``, ``emb_layers``, ``out_layers``,
``skip_connection``, ``op``, ``conv``), so their checkpoints load without renaming.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from noisecraft.errors import ConfigError
from noisecraft.nn.kernels import Conv2d, Linear, fast_upsample_conv, upsampled_size


def norm_groups_for(channels: int, groups: int) -> int:
    """Number of GroupNorm groups for ``channels``.

    ``groups`` when it divides ``channels`` (the usual case: 32 groups, as every published
    openaimodel / SD U-Net). Only when it does not divide them, ``min(groups, channels)`` is
    tried, so a tiny model (e.g. 8 channels, 32 groups) gets one channel per group; if that
    does not divide either, :class:`ConfigError` asks for another ``norm_groups``.
    """
    if channels % groups == 0:
        return groups
    fallback = min(groups, channels)
    if channels % fallback == 0:
        return fallback
    raise ConfigError(
        f"norm_groups={groups} does not divide a layer with {channels} channels; "
        f"choose norm_groups that divides every level's channels (e.g. a power of two)"
    )


def group_norm(channels: int, groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with the group count of :func:`norm_groups_for`."""
    return nn.GroupNorm(norm_groups_for(channels, groups), channels, eps=eps)


class Downsample(nn.Module):
    """Halve height and width: 3x3 conv with stride 2 (``op``), or 2x2 average pooling; an
    odd side ``n`` becomes ``ceil(n / 2)`` either way (the pooling's last window averages the
    one row / column it covers)."""

    def __init__(self, channels: int, out_channels: int | None = None, use_conv: bool = True):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ConfigError("Downsample without a conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double height and width: nearest-neighbour upsampling, then a 3x3 conv (``conv``).

    On the CPU fast path of :mod:`noisecraft.nn.kernels` (inference, float32) large
    feature maps skip the upsampled copy: the conv runs as four 2x2 convs of the input
    (:func:`~noisecraft.nn.kernels.upsample_conv2d`, the same sums grouped differently).

    ``size`` (height, width): the output size, ``2n`` or ``2n - 1`` per side (None = 2x):
    nearest interpolation to it is the 2x map without its last row / column.
    """

    def __init__(self, channels: int, out_channels: int | None = None, use_conv: bool = True):
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = Conv2d(channels, out_channels, 3, padding=1)
        elif out_channels != channels:
            raise ConfigError("Upsample without a conv cannot change the channel count")

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        h, w = x.shape[-2:]
        if size is not None and tuple(size) == (2 * h, 2 * w):
            size = None  # the plain 2x path, bit for bit
        if size is not None:
            size = upsampled_size(h, w, size)
        if self.use_conv:
            out = fast_upsample_conv(x, self.conv, size)
            if out is not None:
                return out
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """Pre-activation residual block conditioned on an embedding (DDPM appendix B, as LDM).

    ``h = conv(SiLU(GN(x)))``; ``h = h + W emb`` (or, with ``use_scale_shift_norm``,
    ``GN(h) * (1 + scale) + shift``, improved DDPM sec. 3 / guided-diffusion's adaptive GN);
    ``h = conv(dropout(SiLU(GN(h))))``; output ``skip(x) + h``. The last conv starts at zero
    (``zero_init``) so that every block begins as the identity, as improved-diffusion does.
    ``up`` / ``down`` resample inside the block (BigGAN style, ``resblock_updown``); an ``up``
    block takes the output ``size`` as :class:`Upsample` does (ignored by the others).

    The SiLUs overwrite the GroupNorm outputs and the skip is added into the last conv's
    output (in place; autograd allows both: GroupNorm's and a conv's backward need their
    inputs, not their outputs), so no block allocates a full-size tensor it does not need.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        *,
        dropout: float = 0.0,
        norm_groups: int = 32,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        zero_init: bool = True,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            group_norm(channels, norm_groups),
            nn.SiLU(inplace=True),
            Conv2d(channels, out_channels, 3, padding=1),
        )
        self.updown, self.up = up or down, up
        if up:
            self.h_upd: nn.Module = Upsample(channels, use_conv=False)
            self.x_upd: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.h_upd = Downsample(channels, use_conv=False)
            self.x_upd = Downsample(channels, use_conv=False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        out_conv = Conv2d(out_channels, out_channels, 3, padding=1)
        if zero_init:
            nn.init.zeros_(out_conv.weight)
            nn.init.zeros_(out_conv.bias)
        self.out_layers = nn.Sequential(
            group_norm(out_channels, norm_groups),
            nn.SiLU(inplace=True),
            nn.Dropout(dropout),
            out_conv,
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if self.updown:
            kw = {"size": size} if self.up and size is not None else {}
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h, **kw))
            x = self.x_upd(x, **kw)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return h.add_(self.skip_connection(x))  # h: the last conv's own output
