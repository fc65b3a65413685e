"""A tiny latent decoder in the design of TAESD (Ollin Boer Bohan, madebyollin/taesd, 2023).

TAESD's decoder is a plain convolutional stack -- no attention, no normalisation -- that maps
the latents a diffusion model samples to images at a small fraction of the KL VAE decoder's
cost (taesd.py, ``Decoder``)::

    Clamp (tanh(x / 3) * 3), conv(z -> width), ReLU,
    [Block] * blocks_per_level, Upsample(x2), conv(width -> width, no bias)   # per upsampling
    Block, conv(width -> out_channels)

with ``Block(x) = ReLU(conv(ReLU(conv(ReLU(conv(x))))) + skip(x))`` (3x3 convs; ``skip`` is
the identity, or a 1x1 conv when the channel counts differ). With ``width = 64``,
``blocks_per_level = 3``, three upsamplings and 4 latent channels this is TAESD's SD decoder;
the module is an ``nn.Sequential`` laid out in the same order, so its state-dict keys are
TAESD's decoder keys ("1.weight", "3.conv.0.weight", ...).

Unlike TAESD (its last conv outputs images in [0, 1]) :class:`TinyDecoder` is trained here to
give images in [-1, 1] (the project's convention). ``TinyDecoderConfig.output_range`` says
which the weights give: ``"signed"`` (ours, [-1, 1]) or ``"unit"`` (TAESD's files, [0, 1]),
and ``forward`` maps ``"unit"`` output by ``2 x - 1`` -- as diffusers' ``DecoderTiny.forward``
does -- so every :class:`TinyDecoder` returns [-1, 1] images. :meth:`TinyDecoder.decode` takes
the SCALED latents the diffusion model works with -- the same input as
:meth:`~noisecraft.models.latent_diffusion.LatentDiffusion.decode`, and TAESD's input too
(diffusers' ``AutoencoderTiny`` has ``scaling_factor = 1.0``, so its SD pipeline hands it the
U-Net's latents unchanged). It is trained by distilling a
VAE decoder (:mod:`noisecraft.training.tasks.tiny_decoder`) and saved as a native checkpoint
of kind ``"tiny_decoder"`` (:func:`noisecraft.io.native.save_tiny_decoder` /
:func:`~noisecraft.io.native.load_tiny_decoder`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from noisecraft.config_dict import config_from_dict, config_to_dict
from noisecraft.errors import ConfigError
from noisecraft.nn.kernels import Conv2d


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: ``TinyDecoderConfig.output_range`` values: [-1, 1] and [0, 1].
OUTPUT_RANGES = ("signed", "unit")


@dataclass(frozen=True)
class TinyDecoderConfig:
    """Size of a :class:`TinyDecoder`; JSON-able through ``to_dict`` / ``from_dict``.

    * ``latent_channels``: channels of the latents (4 for SD and the mini SD).
    * ``width``: channels of every hidden layer (TAESD: 64).
    * ``upsamplings``: number of x2 upsamplings = ``log2`` of the VAE's factor (3 for f=8).
    * ``blocks_per_level``: residual blocks before each upsampling (TAESD: 3).
    * ``out_channels``: image channels (3 RGB, 1 for MNIST).
    * ``output_range``: what the last conv gives: ``"signed"`` images in [-1, 1] (the
      decoders trained here), ``"unit"`` images in [0, 1] (TAESD's weights), mapped to
      [-1, 1] by ``forward``.
    """

    latent_channels: int = 4
    width: int = 64
    upsamplings: int = 3
    blocks_per_level: int = 3
    out_channels: int = 3
    output_range: str = "signed"

    def __post_init__(self) -> None:
        if self.output_range not in OUTPUT_RANGES:
            raise ConfigError(
                f"TinyDecoderConfig.output_range must be one of {', '.join(OUTPUT_RANGES)}, "
                f"got {self.output_range!r}"
            )
        for name in ("latent_channels", "width", "out_channels"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(f"TinyDecoderConfig.{name} must be a positive integer, got {v!r}")
        for name in ("upsamplings", "blocks_per_level"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ConfigError(f"TinyDecoderConfig.{name} must be an integer >= 0, got {v!r}")

    @classmethod
    def taesd(cls, output_range: str = "signed") -> TinyDecoderConfig:
        """TAESD's Stable Diffusion decoder: 4 latent channels, f=8, width 64, RGB (TAESD's
        own weights need ``output_range="unit"``)."""
        return cls(
            latent_channels=4,
            width=64,
            upsamplings=3,
            blocks_per_level=3,
            out_channels=3,
            output_range=output_range,
        )

    @classmethod
    def for_factor(cls, factor: int, **kwargs: Any) -> TinyDecoderConfig:
        """A config whose upsamplings match a VAE downsampling ``factor`` (a power of two)."""
        n = int(round(math.log2(factor))) if factor >= 1 else -1
        if n < 0 or 2**n != factor:
            raise ConfigError(f"a tiny decoder needs a power-of-two VAE factor, got {factor}")
        return cls(upsamplings=n, **kwargs)

    @property
    def upsample_factor(self) -> int:
        """``f``: images are ``f`` times the latent size."""
        return 2**self.upsamplings

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TinyDecoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` naming them."""
        return config_from_dict(cls, d, "tiny decoder")


def _conv(n_in: int, n_out: int, bias: bool = True) -> Conv2d:
    return Conv2d(n_in, n_out, 3, padding=1, bias=bias)


def _relu() -> nn.ReLU:
    # in place: every ReLU follows a conv or an add, whose backward does not need its output
    return nn.ReLU(inplace=True)


class Clamp(nn.Module):
    """TAESD's soft clamp of the input latents: ``tanh(x / 3) * 3``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """TAESD's residual block: ``ReLU(conv3(ReLU(conv3(ReLU(conv3(x))))) + skip(x))``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in, n_out), _relu(), _conv(n_out, n_out), _relu(), _conv(n_out, n_out)
        )
        self.skip = Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = _relu()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyDecoder(nn.Sequential):
    """TAESD-style decoder (see the module docstring); ``forward`` maps raw network input
    (scaled latents) to images in about [-1, 1] (``2 x - 1`` of the last conv's output for
    ``output_range="unit"``); :meth:`decode` also clamps."""

    def __init__(self, config: TinyDecoderConfig):
        c, w = config, config.width
        layers: list[nn.Module] = [Clamp(), _conv(c.latent_channels, w), _relu()]
        for _ in range(c.upsamplings):
            layers += [Block(w, w) for _ in range(c.blocks_per_level)]
            layers += [nn.Upsample(scale_factor=2), _conv(w, w, bias=False)]
        layers += [Block(w, w), _conv(w, c.out_channels)]
        super().__init__(*layers)
        self.config = config

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        return x.mul(2).sub(1) if self.config.output_range == "unit" else x

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, z, h, w) -> images (B, C, f*h, f*w) clamped to [-1, 1]."""
        c = self.config
        if latents.ndim != 4 or latents.shape[1] != c.latent_channels:
            raise ConfigError(
                f"the tiny decoder takes latents (batch, {c.latent_channels}, h, w), "
                f"got {tuple(latents.shape)}"
            )
        weight = self[1].weight
        x = latents.to(device=weight.device, dtype=weight.dtype)
        if x.device.type == "cpu":  # oneDNN convs and the ReLUs run ~1.5x faster channels-last
            x = x.contiguous(memory_format=torch.channels_last)
        return self(x).clamp(-1, 1)


__all__ = [
    "OUTPUT_RANGES",
    "Block",
    "Clamp",
    "TinyDecoder",
    "TinyDecoderConfig",
]
