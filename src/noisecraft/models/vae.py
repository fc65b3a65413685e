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

:func:`from_diffusers_state_dict` / :func:`to_diffusers_state_dict` map these names to and
from diffusers' ``AutoencoderKL`` by rules, not a table.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisecraft.config_dict import config_from_dict, config_to_dict
from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.nn.attention import attention
from noisecraft.nn.kernels import Conv2d
from noisecraft.nn.resnet import Upsample, group_norm

#: LDM's ``Normalize``: GroupNorm with eps 1e-6 (the U-Net's ResBlocks use 1e-5).
_EPS = 1e-6


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
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
            raise ConfigError(f"VAEConfig.scaling_factor must be a positive number, got {s!r}")
        s = self.shift_factor
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
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


# ---------------------------------------------------------------- blocks


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


# ---------------------------------------------------------------- diffusers names

_Rules = list[tuple[str, Callable[[re.Match[str], int], str]]]

# LDM (ours) <-> diffusers block names, one pair per module kind, read in both directions.
# Fields: {i} {j} any index; {r} a decoder level, reversed between the two
# (``up.{r}`` <-> ``up_blocks.{n-1-r}``, which needs the level count n); {m} a mid-block
# resnet (``block_{m}`` <-> ``resnets.{m-1}``); {e} encoder | decoder; {rest} the leaf path.
_BLOCK_PAIRS = [
    ("encoder.down.{i}.block.{j}.{rest}", "encoder.down_blocks.{i}.resnets.{j}.{rest}"),
    ("encoder.down.{i}.downsample.{rest}", "encoder.down_blocks.{i}.downsamplers.0.{rest}"),
    ("decoder.up.{r}.block.{j}.{rest}", "decoder.up_blocks.{r}.resnets.{j}.{rest}"),
    ("decoder.up.{r}.upsample.{rest}", "decoder.up_blocks.{r}.upsamplers.0.{rest}"),
    ("{e}.mid.block_{m}.{rest}", "{e}.mid_block.resnets.{m}.{rest}"),
    ("{e}.mid.attn_1.{rest}", "{e}.mid_block.attentions.0.{rest}"),
    ("{e}.norm_out.{rest}", "{e}.conv_norm_out.{rest}"),
]
_FIELD_PATTERNS = {"e": "encoder|decoder", "rest": ".+"}


def _template_regex(template: str) -> str:
    out = re.escape(template)
    for field in re.findall(r"\{(\w+)\}", template):
        body = _FIELD_PATTERNS.get(field, r"\d+")
        out = out.replace(re.escape("{" + field + "}"), f"(?P<{field}>{body})", 1)
    return out


def _pair_rules(to_diffusers: bool) -> _Rules:
    m_shift = -1 if to_diffusers else 1

    def convert(groups: dict[str, str], n: int) -> dict[str, str | int]:
        out: dict[str, str | int] = dict(groups)
        if "r" in groups:
            out["r"] = n - 1 - int(groups["r"])
        if "m" in groups:
            out["m"] = int(groups["m"]) + m_shift
        return out

    rules: _Rules = []
    for ours, theirs in _BLOCK_PAIRS:
        src, dst = (ours, theirs) if to_diffusers else (theirs, ours)
        rules.append(
            (_template_regex(src), lambda m, n, dst=dst: dst.format(**convert(m.groupdict(), n)))
        )
    return rules


_TO_DIFFUSERS = _pair_rules(to_diffusers=True)
_FROM_DIFFUSERS = _pair_rules(to_diffusers=False)
# leaf names inside a block: ResnetBlock shortcut and attention projections
_LEAF_TO_DIFFUSERS = {
    "nin_shortcut": "conv_shortcut",
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
# older diffusers checkpoints name the attention projections query / key / value / proj_attn
_LEAF_FROM_DIFFUSERS = {
    "conv_shortcut": "nin_shortcut",
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_PASS_THROUGH = re.compile(r"(quant_conv|post_quant_conv|(encoder|decoder)\.(conv_in|conv_out))\.")
_ATTN_PROJ = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _levels(keys: list[str], pattern: str) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _rename(key: str, rules: _Rules, leaves: Mapping[str, str], n: int) -> str | None:
    if _PASS_THROUGH.match(key):
        return key
    for pattern, build in rules:
        m = re.fullmatch(pattern, key)
        if m is None:
            continue
        new = build(m, n)
        head, _, param = new.rpartition(".")  # "...<leaf>.weight"
        for old, rep in leaves.items():
            suffix = "." + old
            if head.endswith(suffix):
                head = head[: -len(suffix)] + "." + rep
                break
        return f"{head}.{param}"
    return None


def to_diffusers_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LDM-named VAE weights (ours, ``first_stage_model.`` stripped) -> diffusers' names.

    Rules: ``down.{i}.block.{j}`` -> ``down_blocks.{i}.resnets.{j}``, ``downsample`` ->
    ``downsamplers.0``, ``up.{i}`` -> ``up_blocks.{n-1-i}`` (reversed), ``mid.block_{k}`` ->
    ``mid_block.resnets.{k-1}``, ``mid.attn_1.{norm,q,k,v,proj_out}`` ->
    ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`` (1x1 conv weights become
    Linear weights), ``nin_shortcut`` -> ``conv_shortcut``, ``norm_out`` -> ``conv_norm_out``.
    Tensors are shared with the input, not copied.
    """
    keys = list(state_dict)
    n = _levels(keys, r"decoder\.up\.(\d+)\.")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = _rename(key, _TO_DIFFUSERS, _LEAF_TO_DIFFUSERS, n)
        if new is None:
            raise CheckpointError(f"'{key}' is not a key of an LDM AutoencoderKL state dict")
        if _ATTN_PROJ.search(key) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def from_diffusers_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers ``AutoencoderKL`` weights -> LDM names (ours); inverse of the above.

    Also reads the older diffusers attention names (``query``, ``key``, ``value``,
    ``proj_attn``). Linear attention weights become 1x1 conv weights. Tensors are shared
    with the input, not copied.
    """
    keys = list(state_dict)
    n = _levels(keys, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = _rename(key, _FROM_DIFFUSERS, _LEAF_FROM_DIFFUSERS, n)
        if new is None:
            raise CheckpointError(f"'{key}' is not a key of a diffusers AutoencoderKL state dict")
        if _ATTN_PROJ.search(new) and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out
