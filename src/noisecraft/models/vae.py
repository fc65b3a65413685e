"""Stable Diffusion's KL-regularised autoencoder (Rombach et al. 2022 sec. 3 and appendix G).

Latent diffusion trains the diffusion model in the latent space of a perceptual-compression
autoencoder: an encoder ``E`` maps an image ``x`` (H x W x 3) to ``z = E(x)`` (H/f x W/f x c,
f = 8 and c = 4 for SD), a decoder ``D`` maps it back, ``x~ = D(z)`` (sec. 3.1). The "KL-reg"
variant puts a slight KL penalty towards a standard normal on the latent (appendix G), so the
encoder outputs a diagonal Gaussian posterior ``q(z|x) = N(mean, diag(exp(logvar)))``
(:class:`DiagonalGaussian`); sampling uses the reparameterisation trick (Kingma & Welling 2014
sec. 2.4), ``z = mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)``.

Module and parameter names are those of LDM's ``ldm.models.autoencoder.AutoencoderKL``, i.e.
the keys Stable Diffusion single-file checkpoints store under ``first_stage_model.``:
``encoder.conv_in``, ``encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}``,
``encoder.down.{i}.downsample.conv``, ``encoder.mid.{block_1,attn_1,block_2}``,
``encoder.{norm_out,conv_out}``, ``quant_conv``, ``post_quant_conv``, ``decoder.conv_in``,
``decoder.mid.*``, ``decoder.up.{i}.block.{j}``, ``decoder.up.{i}.upsample.conv``,
``decoder.{norm_out,conv_out}``. LDM indexes the decoder's ``up`` list by resolution level
(``up.0`` is full resolution, ``up.{n-1}`` the lowest), although it runs them lowest first.

This module holds the config, the posterior and the autoencoder; the blocks are in
:mod:`.vae_blocks`, and :func:`from_diffusers_state_dict` / :func:`to_diffusers_state_dict`
(diffusers' ``AutoencoderKL`` names, a key-rule table) in :mod:`.vae_keys`; all are
importable from here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from noisecraft.config_dict import config_from_dict, config_to_dict
from noisecraft.errors import ConfigError
from noisecraft.models.vae_blocks import (
    Decoder,
    Encoder,
    VAEAttnBlock,
    VAEDownsample,
    VAEResnetBlock,
)
from noisecraft.models.vae_keys import from_diffusers_state_dict, to_diffusers_state_dict
from noisecraft.nn.kernels import Conv2d

__all__ = [
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussian",
    "Encoder",
    "VAEAttnBlock",
    "VAEConfig",
    "VAEDownsample",
    "VAEResnetBlock",
    "from_diffusers_state_dict",
    "to_diffusers_state_dict",
]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class VAEConfig:
    """Size of an :class:`AutoencoderKL`; JSON-able through ``to_dict`` / ``from_dict``.

    * ``base_channels * channel_mult[i]`` channels at level ``i``; every level but the last
      halves the size, so the downsampling factor is ``f = 2**(len(channel_mult) - 1)`` (8 for
      SD) and images must be multiples of ``f``.
    * ``num_res_blocks`` residual blocks per encoder level (the decoder has one more).
    * ``z_channels``: latent channels (4 for SD). ``double_z``: the encoder outputs mean and
      log-variance (``2 * z_channels``), the KL autoencoder; ``False`` gives a deterministic
      autoencoder whose posterior has zero variance.
    * ``mid_attention``: single-head self-attention between the two middle ResBlocks (LDM,
      diffusers' ``mid_block_add_attention``).
    * ``scaling_factor`` / ``shift_factor``: latents handed to the diffusion model are
      ``(z - shift) * scale`` (:meth:`AutoencoderKL.encode_latents`); SD 1.x / 2.x use
      ``0.18215`` and no shift, 1 / std of the latents (LDM's ``scale_by_std``).
    """

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    double_z: bool = True
    norm_groups: int = 32
    mid_attention: bool = True
    dropout: float = 0.0
    scaling_factor: float = 0.18215
    shift_factor: float | None = None

    def __post_init__(self) -> None:
        value = self.channel_mult
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
            raise ConfigError(f"VAEConfig.channel_mult must be a list of integers, got {value!r}")
        object.__setattr__(self, "channel_mult", tuple(value))
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError("VAEConfig.channel_mult must be a non-empty list of positive ints")
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"VAEConfig.{name} must be a positive integer, got {value!r}")
        for name in ("z_channels", "norm_groups"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"VAEConfig.{name} must be a positive integer, got {value!r}")
        for name in ("double_z", "mid_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"VAEConfig.{name} must be true or false")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"VAEConfig.dropout must be in [0, 1), got {self.dropout!r}")
        s = self.scaling_factor
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < math.inf:
            raise ConfigError(f"VAEConfig.scaling_factor must be a positive number, got {s!r}")
        s = self.shift_factor
        if s is not None and (
            isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)
        ):
            raise ConfigError(f"VAEConfig.shift_factor must be a number or null, got {s!r}")

    @classmethod
    def sd(cls) -> VAEConfig:
        """Stable Diffusion 1.x / 2.x (LDM ``kl-f8``): 128 channels x (1, 2, 4, 4), f = 8, c = 4.

        83,653,863 parameters, as diffusers' ``AutoencoderKL`` with SD's config.
        """
        return cls(
            in_channels=3,
            out_channels=3,
            base_channels=128,
            channel_mult=(1, 2, 4, 4),
            num_res_blocks=2,
            z_channels=4,
            double_z=True,
            norm_groups=32,
            mid_attention=True,
            dropout=0.0,
            scaling_factor=0.18215,
            shift_factor=None,
        )

    @classmethod
    def sdxl(cls) -> VAEConfig:
        """SDXL: the SD architecture with its own latent scale, ``0.13025``."""
        return dataclasses.replace(cls.sd(), scaling_factor=0.13025)

    @property
    def downsample_factor(self) -> int:
        """``f``: latents are ``1 / f`` of the image size; images must be multiples of it."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` naming them."""
        return config_from_dict(cls, d, "VAE")


# ---------------------------------------------------------------- posterior


class DiagonalGaussian:
    """``N(mean, diag(exp(logvar)))`` from encoder moments ``(B, 2C, h, w)`` = [mean, logvar].

    ``logvar`` is clamped to [-30, 20] as in LDM. ``deterministic`` (an autoencoder without
    ``double_z``) gives zero variance: ``sample() == mode() == mean`` and ``kl() == 0``.
    """

    def __init__(self, moments: Tensor, deterministic: bool = False):
        self.moments = moments
        self.deterministic = deterministic
        if deterministic:
            self.mean = moments
            self.logvar = torch.full_like(moments, -30.0)
            self.std = self.var = torch.zeros_like(moments)
        else:
            if moments.shape[1] % 2:
                raise ConfigError(
                    f"posterior moments need an even channel count (mean and logvar), "
                    f"got {tuple(moments.shape)}"
                )
            mean, logvar = moments.chunk(2, dim=1)
            self.mean = mean
            self.logvar = logvar.clamp(-30.0, 20.0)
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample ``mean + std * eps`` (Kingma & Welling 2014 eq. 10).

        ``eps`` is drawn on the generator's device and moved, so a CPU generator gives the same
        latents wherever the model runs (as diffusers' ``randn_tensor``).
        """
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(
            self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        """The mean (the most likely latent)."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """``KL(self || other)`` per batch element, summed over latent dimensions; shape (B,).

        Between diagonal Gaussians (Kingma & Welling 2014 appendix B, one dimension at a time):
        ``1/2 [(mu1 - mu2)^2 / var2 + var1 / var2 - 1 - logvar1 + logvar2]``; with ``other``
        None it is ``N(0, I)``: ``1/2 [mu^2 + var - 1 - logvar]``.
        """
        dims = list(range(1, self.mean.ndim))
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        if other is None:
            return 0.5 * torch.sum(self.mean.square() + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).square() / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: Tensor) -> Tensor:
        """``-log q(sample | x)`` per batch element, summed over latent dimensions."""
        dims = list(range(1, self.mean.ndim))
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        log2pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(
            log2pi + self.logvar + (sample - self.mean).square() / self.var, dim=dims
        )


# ---------------------------------------------------------------- the autoencoder


class AutoencoderKL(nn.Module):
    """Encoder, ``quant_conv``, posterior, ``post_quant_conv``, decoder (LDM appendix G).

    ``encode`` / ``decode`` work with raw latents; ``encode_latents`` / ``decode_latents``
    with the scaled latents a latent diffusion model is trained on.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        moments = 2 * c.z_channels if c.double_z else c.z_channels
        self.quant_conv = Conv2d(moments, moments, 1)
        self.post_quant_conv = Conv2d(c.z_channels, c.z_channels, 1)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the decoder's last conv (LDM's ``get_last_layer``, for the adaptive weight)."""
        return self.decoder.conv_out.weight

    def check_image(self, x: Tensor) -> None:
        """Raise :class:`ConfigError` unless ``x`` is (B, in, H, W) with H, W multiples of f."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ConfigError(
                f"VAE input must be (batch, {c.in_channels}, height, width), got {tuple(x.shape)}"
            )
        f = c.downsample_factor
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise ConfigError(
                f"image size {h}x{w} is not a multiple of {f} (the VAE's downsampling factor); "
                f"resize or crop the image"
            )

    def moments(self, x: Tensor) -> Tensor:
        """``quant_conv(encoder(x))``: the posterior's [mean, logvar] before clamping."""
        self.check_image(x)
        return self.quant_conv(self.encoder(x))

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Posterior ``q(z | x)`` of images ``x`` in [-1, 1], (B, in, H, W) -> (B, z, H/f, W/f)."""
        return DiagonalGaussian(self.moments(x), deterministic=not self.config.double_z)

    def decode(self, z: Tensor) -> Tensor:
        """Raw (unscaled) latents (B, z, h, w) -> images (B, out, f*h, f*w), roughly in [-1, 1].

        On the CPU the decoder runs in the channels-last memory format: oneDNN's NCHW
        convolutions copy input and output to a blocked layout, at full resolution 2 x 256
        MiB more for a 512x512 image (measured peak of the SD decoder above its input at
        512x512: 976 MiB in NCHW, 743 MiB channels-last with the in-place SiLUs of
        :class:`VAEResnetBlock`; the image differs by float rounding only).
        """
        c = self.config
        if z.ndim != 4 or z.shape[1] != c.z_channels:
            raise ConfigError(
                f"VAE latents must be (batch, {c.z_channels}, height, width), got {tuple(z.shape)}"
            )
        if z.device.type != "cpu":
            return self.decoder(self.post_quant_conv(z))
        z = z.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(z)).contiguous()

    def forward(
        self, x: Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction ``D(z)`` with ``z ~ q(z|x)`` (or its mode) and the posterior."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw latents -> diffusion latents: ``(z - shift_factor) * scaling_factor``."""
        if self.config.shift_factor is not None:
            z = z - self.config.shift_factor
        return z * self.config.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`scale_latents`: ``z / scaling_factor + shift_factor``."""
        z = z / self.config.scaling_factor
        if self.config.shift_factor is not None:
            z = z + self.config.shift_factor
        return z

    def encode_latents(
        self, x: Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> Tensor:
        """Images -> the scaled latents a latent diffusion model sees (a sample, or the mode)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.scale_latents(z)

    def decode_latents(self, z: Tensor) -> Tensor:
        """Scaled diffusion latents -> images (undoes the scaling, then :meth:`decode`)."""
        return self.decode(self.unscale_latents(z))

    def to_diffusers_state_dict(self) -> dict[str, Tensor]:
        """This model's weights under diffusers' ``AutoencoderKL`` names."""
        return to_diffusers_state_dict(self.state_dict())

    def load_diffusers_state_dict(
        self, state_dict: Mapping[str, Tensor], strict: bool = True
    ) -> Any:
        """Load weights saved under diffusers' names (see :func:`from_diffusers_state_dict`)."""
        return self.load_state_dict(from_diffusers_state_dict(state_dict), strict=strict)
