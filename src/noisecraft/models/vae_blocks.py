"""The blocks of Stable Diffusion's KL autoencoder (LDM's ``ldm.modules.diffusionmodules.model``).

:class:`Encoder` and :class:`Decoder` and what they are built of: LDM's ``ResnetBlock`` without
a timestep embedding, its single-head ``AttnBlock``, the asymmetric-padding downsampler and the
middle block. Module names are LDM's (see :mod:`noisecraft.models.vae`); the autoencoder that
joins them with the latent posterior is :class:`~noisecraft.models.vae.AutoencoderKL`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from noisecraft.nn.attention import attention
from noisecraft.nn.kernels import Conv2d
from noisecraft.nn.resnet import Upsample, group_norm

if TYPE_CHECKING:
    from noisecraft.models.vae import VAEConfig

__all__ = ["Decoder", "Encoder", "VAEAttnBlock", "VAEDownsample", "VAEResnetBlock"]

#: LDM's ``Normalize``: GroupNorm with eps 1e-6 (the U-Net's ResBlocks use 1e-5).
_EPS = 1e-6


class VAEResnetBlock(nn.Module):
    """LDM's ``ResnetBlock`` without a timestep embedding (``temb_channels=0``).

    ``h = conv1(SiLU(norm1(x)))``; ``h = conv2(dropout(SiLU(norm2(h))))``; output
    ``nin_shortcut(x) + h`` (a 1x1 conv when the channel count changes, else the identity).
    The SiLUs overwrite the GroupNorm outputs (autograd allows it: GroupNorm's backward needs
    its input, not its output), one full-size tensor less at the decoder's peak.
    """

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups, eps=_EPS)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups, eps=_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut: nn.Module = (
            Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return self.nin_shortcut(x) + h


class VAEAttnBlock(nn.Module):
    """LDM's ``AttnBlock``: single-head self-attention over the h*w positions, plus the input.

    ``q``, ``k``, ``v``, ``proj_out`` are 1x1 convs (diffusers stores them as Linear weights);
    ``softmax(q k^T / sqrt(C)) v`` is one ``scaled_dot_product_attention`` call (in query
    slices when :func:`~noisecraft.nn.attention.set_attention_slicing` asks for it).
    """

    def __init__(self, channels: int, *, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups, eps=_EPS)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        out = attention(q, k, v)  # (B, 1, h*w, C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class VAEDownsample(nn.Module):
    """Halve the size: pad right and bottom by one (``(0, 1, 0, 1)``), 3x3 conv with stride 2.

    The asymmetric padding is LDM's (and diffusers' ``padding=0`` Downsample2D), unlike the
    U-Net's symmetric ``padding=1``; the weights are not interchangeable between the two.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class _Mid(nn.Module):
    """``block_1``, ``attn_1`` (optional), ``block_2`` at the lowest resolution."""

    def __init__(self, channels: int, *, groups: int, dropout: float, attention: bool):
        super().__init__()
        self.block_1 = VAEResnetBlock(channels, channels, groups=groups, dropout=dropout)
        self.attn_1: nn.Module = (
            VAEAttnBlock(channels, groups=groups) if attention else nn.Identity()
        )
        self.block_2 = VAEResnetBlock(channels, channels, groups=groups, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block`` (a list of ResnetBlocks) and an optional resampler."""

    def __init__(self, blocks: list[VAEResnetBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class Encoder(nn.Module):
    """``x`` (B, in, H, W) -> moments (B, 2z or z, H/f, W/f), before ``quant_conv``."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        g, ch = c.norm_groups, c.base_channels
        self.conv_in = Conv2d(c.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(c.channel_mult):
            block_out = ch * mult
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(VAEResnetBlock(block_in, block_out, groups=g, dropout=c.dropout))
                block_in = block_out
            level = _Level(blocks)
            if i != len(c.channel_mult) - 1:
                level.downsample = VAEDownsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, groups=g, dropout=c.dropout, attention=c.mid_attention)
        self.norm_out = group_norm(block_in, g, eps=_EPS)
        out = 2 * c.z_channels if c.double_z else c.z_channels
        self.conv_out = Conv2d(block_in, out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    """``z`` (B, z, h, w) after ``post_quant_conv`` -> image (B, out, f*h, f*w)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        g, ch = c.norm_groups, c.base_channels
        block_in = ch * c.channel_mult[-1]
        self.conv_in = Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, groups=g, dropout=c.dropout, attention=c.mid_attention)
        levels: list[_Level] = []
        for i in reversed(range(len(c.channel_mult))):
            block_out = ch * c.channel_mult[i]
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(VAEResnetBlock(block_in, block_out, groups=g, dropout=c.dropout))
                block_in = block_out
            level = _Level(blocks)
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)  # LDM: up[i] is level i, built lowest resolution first
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, g, eps=_EPS)
        self.conv_out = Conv2d(block_in, c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))
