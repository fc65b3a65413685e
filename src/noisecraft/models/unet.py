"""The diffusion U-Net (Ho et al. 2020 appendix B; Nichol & Dhariwal 2021; Rombach et al. 2022).

Layout and parameter names are those of the openaimodel ``UNetModel`` shared by
improved-diffusion, guided-diffusion and Stable Diffusion's single-file checkpoints
(``model.diffusion_model.*`` without the prefix): ``time_embed.{0,2}``, ``label_emb``,
``input_blocks.N.M``, ``middle_block.{0,1,2}``, ``output_blocks.N.M``, ``out.{0,2}``.

With ``context_dim`` set, every attention layer is a :class:`SpatialTransformer` attending to
``context`` (SD 1.x: conv projections, 8 heads; SD 2.x: ``use_linear_projection``, 64 channels
per head); otherwise it is a pixel :class:`AttentionBlock`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from noisecraft.config_dict import config_from_dict, config_to_dict
from noisecraft.errors import ConfigError
from noisecraft.nn.attention import AttentionBlock, SpatialTransformer, resolve_heads
from noisecraft.nn.embeddings import timestep_embedding
from noisecraft.nn.kernels import Conv2d, Linear
from noisecraft.nn.resnet import Downsample, ResBlock, Upsample, group_norm


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class UNetConfig:
    """Size and conditioning of a :class:`UNet`; JSON-able through ``to_dict`` / ``from_dict``.

    * ``channel_mult[i] * model_channels`` channels at level ``i``; level ``i`` works at
      ``1 / 2**i`` of the input size, rounded up: any input size goes (an odd side ``n``
      halves to ``ceil(n / 2)``, and the up path returns to each skip connection's size).
    * ``attention_levels``: indices into ``channel_mult`` of the levels with attention
      (0 = full resolution). The middle block always has attention.
    * Heads: ``head_channels != -1`` takes precedence and gives ``channels // head_channels``
      heads of ``head_channels`` each; otherwise ``num_heads`` heads of
      ``channels // num_heads`` (SD 1.x: ``num_heads=8``; SD 2.x: ``head_channels=64``).
    * ``num_classes``: class-conditional; the label table has ``num_classes + 1`` rows, the
      last (index ``num_classes``) is the null class for classifier-free guidance.
    * ``learn_sigma``: improved DDPM learned variance; the output has ``2 * out_channels``
      channels (prediction first, then the variance interpolation ``v``).
    * ``norm_groups``: GroupNorm groups; used as is when it divides a layer's channels, else
      ``min(norm_groups, channels)`` if that divides them, else :class:`ConfigError`.
    * ``context_dim``: cross-attention width (768 for SD 1.x, 1024 for SD 2.x);
      ``transformer_depth`` blocks per SpatialTransformer; ``use_linear_projection`` for
      SD 2.x's linear ``proj_in`` / ``proj_out`` (SD 1.x: 1x1 convs).
    * ``resblock_updown``: resample inside ResBlocks (BigGAN style) instead of conv layers.
    * ``use_scale_shift_norm``: the embedding scales and shifts the second GroupNorm
      (guided-diffusion's adaptive GN) instead of being added (SD, improved-diffusion default).
    """

    in_channels: int = 1
    out_channels: int = 1
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (2,)
    num_heads: int = 4
    head_channels: int = -1
    dropout: float = 0.0
    num_classes: int | None = None
    learn_sigma: bool = False
    norm_groups: int = 32
    context_dim: int | None = None
    transformer_depth: int = 1
    use_linear_projection: bool = False
    resblock_updown: bool = False
    use_scale_shift_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("channel_mult", "attention_levels"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
                raise ConfigError(f"UNetConfig.{name} must be a list of integers, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        positive = ("in_channels", "out_channels", "model_channels", "num_res_blocks")
        for name in (*positive, "norm_groups", "transformer_depth"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        for name in ("num_classes", "context_dim"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(
                    f"UNetConfig.{name} must be a positive integer or null, got {value!r}"
                )
        for name in ("num_heads", "head_channels"):
            value = getattr(self, name)
            if not _is_int(value) or (value < 1 and value != -1):
                raise ConfigError(f"UNetConfig.{name} must be a positive integer or -1")
        if self.num_heads == -1 and self.head_channels == -1:
            raise ConfigError("UNetConfig: set num_heads or head_channels (both are -1)")
        flags = ("learn_sigma", "use_linear_projection", "resblock_updown", "use_scale_shift_norm")
        for name in flags:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"UNetConfig.{name} must be true or false")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError("UNetConfig.channel_mult must be a non-empty list of positive ints")
        levels = len(self.channel_mult)
        bad = [i for i in self.attention_levels if not 0 <= i < levels]
        if bad or len(set(self.attention_levels)) != len(self.attention_levels):
            raise ConfigError(
                f"UNetConfig.attention_levels {list(self.attention_levels)} must be distinct "
                f"level indices in 0..{levels - 1} (one per channel_mult entry)"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def output_channels(self) -> int:
        """Channels of the network output: ``out_channels``, doubled with ``learn_sigma``."""
        return self.out_channels * (2 if self.learn_sigma else 1)

    @classmethod
    def sd15(cls, **overrides: Any) -> UNetConfig:
        """Stable Diffusion 1.x's U-Net (859.5 M parameters): 320 channels x (1, 2, 4, 4), two
        ResBlocks per level, cross-attention to 768-wide CLIP-L features at the first three
        levels, 8 heads per layer. ``in_channels=9`` for the inpainting model."""
        base = cls(
            in_channels=4,
            out_channels=4,
            model_channels=320,
            channel_mult=(1, 2, 4, 4),
            num_res_blocks=2,
            attention_levels=(0, 1, 2),
            num_heads=8,
            norm_groups=32,
            context_dim=768,
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def sd2(cls, **overrides: Any) -> UNetConfig:
        """Stable Diffusion 2.x's U-Net (865.9 M): SD 1.x's layout with 1024-wide OpenCLIP-H
        context, 64-channel heads and linear ``proj_in`` / ``proj_out``."""
        base = cls.sd15(
            num_heads=-1, head_channels=64, context_dim=1024, use_linear_projection=True
        )
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` naming them."""
        return config_from_dict(cls, d, "U-Net")


class EmbedSequential(nn.Sequential):
    """``nn.Sequential`` that hands the embedding to ResBlocks, ``context`` to transformers
    and the output ``size`` (height, width) to upsampling layers (None = 2x)."""

    def forward(
        self,
        x: Tensor,
        emb: Tensor,
        context: Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, size)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class FeatureCache(Protocol):
    """A hook into :meth:`UNet.forward`'s block loop that reuses a deep feature across calls
    (DeepCache, Ma et al. 2023; :mod:`noisecraft.pipelines.deepcache` implements it).

    With ``branch`` = b and ``K`` input blocks, a *shallow* call runs only input blocks
    ``0..b-1`` (their outputs are the skips it needs), then output blocks ``K-b..K-1`` on the
    cached feature and the output head; a *full* call runs everything and hands the cache the
    feature entering output block ``K-b``.
    """

    @property
    def branch(self) -> int: ...

    def reuse(self, x: Tensor) -> Tensor | None:
        """Called once per forward, before any block runs, with its input: the feature to
        reuse (a shallow call) or None (a full call, which then calls :meth:`store`)."""
        ...

    def store(self, feature: Tensor) -> None:
        """On a full call: the feature entering output block ``K - branch``."""
        ...


def make_resblock(c: UNetConfig, ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
    """A ResBlock of a U-Net of config ``c`` (embedding width ``4 * model_channels``)."""
    return ResBlock(
        ch_in,
        4 * c.model_channels,
        ch_out,
        dropout=c.dropout,
        norm_groups=c.norm_groups,
        use_scale_shift_norm=c.use_scale_shift_norm,
        **kw,
    )


def make_attention(c: UNetConfig, ch: int) -> nn.Module:
    """The attention layer of a U-Net of config ``c`` at ``ch`` channels: a
    :class:`SpatialTransformer` with ``context_dim``, else a pixel :class:`AttentionBlock`."""
    heads, dim_head = resolve_heads(ch, c.num_heads, c.head_channels)
    if c.context_dim is None:
        return AttentionBlock(ch, heads, dim_head, norm_groups=c.norm_groups)
    return SpatialTransformer(
        ch,
        heads,
        dim_head,
        depth=c.transformer_depth,
        context_dim=c.context_dim,
        use_linear=c.use_linear_projection,
        norm_groups=c.norm_groups,
        dropout=c.dropout,
    )


class UNetEncoder(nn.Module):
    """The down half of a U-Net: ``time_embed``, ``label_emb``, ``input_blocks`` and
    ``middle_block``, in the names of :class:`UNet`. :class:`UNet` adds the up half;
    :class:`~noisecraft.models.controlnet.ControlNet` is a trainable copy of this half.

    ``skip_channels`` lists the channels of each input block's output (one skip connection
    each), the shapes ControlNet-style ``down_residuals`` must have.
    """

    #: How messages name the network.
    what = "U-Net"

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        self.null_class: int | None = c.num_classes
        emb_dim = 4 * c.model_channels

        self.time_embed = nn.Sequential(
            Linear(c.model_channels, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim)
        )
        self.label_emb = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes else None

        ch = c.model_channels
        self.input_blocks = nn.ModuleList(
            [EmbedSequential(Conv2d(c.in_channels, ch, 3, padding=1))]
        )
        skip = [ch]
        last = len(c.channel_mult) - 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [make_resblock(c, ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if level in c.attention_levels:
                    layers.append(make_attention(c, ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip.append(ch)
            if level != last:
                down = make_resblock(c, ch, ch, down=True) if c.resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbedSequential(down))
                skip.append(ch)
        self.skip_channels: tuple[int, ...] = tuple(skip)

        self.middle_block = EmbedSequential(
            make_resblock(c, ch, ch), make_attention(c, ch), make_resblock(c, ch, ch)
        )

    def _check(self, x: Tensor, class_labels: Tensor | None, context: Tensor | None) -> None:
        c, what = self.config, self.what
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ConfigError(
                f"{what} input must be (batch, {c.in_channels}, height, width), "
                f"got {tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < 1:
            raise ConfigError(f"{what} input {tuple(x.shape)} is empty: give height and width")
        if class_labels is not None and c.num_classes is None:
            raise ConfigError(f"this {what} is unconditional: pass no class labels")
        if c.context_dim is not None and context is None:
            raise ConfigError(
                f"this {what} has cross-attention: pass context of shape (batch, tokens, "
                f"{c.context_dim})"
            )
        if c.context_dim is None and context is not None:
            raise ConfigError(f"this {what} has no cross-attention (context_dim is null)")
        if context is not None and (context.ndim != 3 or context.shape[-1] != c.context_dim):
            raise ConfigError(
                f"context must be (batch, tokens, {c.context_dim}), got {tuple(context.shape)}"
            )

    def embedding(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The time (+ class) embedding every block receives (DDPM's sinusoidal timestep
        embedding through ``time_embed``, plus ``label_emb``; no labels = the null class)."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        elif t.shape != (b,):
            raise ConfigError(
                f"timesteps must be a scalar or of shape ({b},), got {tuple(t.shape)}"
            )
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))
        if self.label_emb is not None:
            if class_labels is None:
                class_labels = torch.full((b,), self.config.num_classes, device=x.device)
            class_labels = torch.as_tensor(class_labels, device=x.device).long()
            if class_labels.ndim == 0:
                class_labels = class_labels.expand(b)
            elif class_labels.shape != (b,):
                raise ConfigError(
                    f"class labels must be a scalar or of shape ({b},), "
                    f"got {tuple(class_labels.shape)}"
                )
            emb = emb + self.label_emb(class_labels)
        return emb


class UNet(UNetEncoder):
    """Noise / v / x0 prediction network ``f(x, t, class_labels, context)``: the encoder of
    :class:`UNetEncoder`, then ``output_blocks`` and the ``out`` head.

    ``skip_channels`` lists the channels of each skip connection (one per input block), the
    shapes ControlNet-style ``down_residuals`` must have.
    """

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        c = config
        skip = list(self.skip_channels)
        ch = c.model_channels * c.channel_mult[-1]
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers: list[nn.Module] = [
                    make_resblock(c, ch + skip.pop(), mult * c.model_channels)
                ]
                ch = mult * c.model_channels
                if level in c.attention_levels:
                    layers.append(make_attention(c, ch))
                if level and i == c.num_res_blocks:
                    layers.append(
                        make_resblock(c, ch, ch, up=True) if c.resblock_updown else Upsample(ch)
                    )
                self.output_blocks.append(EmbedSequential(*layers))

        out_conv = Conv2d(ch, c.output_channels, 3, padding=1)
        nn.init.zeros_(out_conv.weight)
        nn.init.zeros_(out_conv.bias)
        self.out = nn.Sequential(group_norm(ch, c.norm_groups), nn.SiLU(inplace=True), out_conv)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        context: Tensor | None = None,
        *,
        down_residuals: Sequence[Tensor] | None = None,
        mid_residual: Tensor | None = None,
        cache: FeatureCache | None = None,
    ) -> Tensor:
        """Predict from noisy ``x`` (B, C, H, W) at timesteps ``t`` (B,) or 0-d, maybe fractional.

        ``class_labels`` (B,) long, ``num_classes`` = null class; missing labels on a
        class-conditional model mean the null class. ``context`` (B, L, context_dim) for
        cross-attention. ``down_residuals`` (one per skip, shapes from ``skip_channels``) and
        ``mid_residual`` are added to the skips and the middle output (ControlNet).

        Any height and width: each upsampling returns to the size of the skip connection it
        is concatenated with (diffusers' ``forward_upsample_size``).

        ``cache``: a :class:`FeatureCache` that may turn this call into a shallow one; then
        only the residuals of the skips that the shallow branch uses are added (the deep ones
        and ``mid_residual`` act through the cached feature).
        """
        self._check(x, class_labels, context)
        k = len(self.input_blocks)
        if down_residuals is not None and len(down_residuals) != k:
            raise ConfigError(f"expected {k} down residuals, got {len(down_residuals)}")
        branch = k if cache is None else cache.branch
        if cache is not None and not 1 <= branch < k:
            raise ConfigError(f"feature cache branch {branch} does not fit: choose 1..{k - 1}")
        emb = self.embedding(x, t, class_labels)
        feature = None if cache is None else cache.reuse(x)

        hs = []
        h = x
        for block in self.input_blocks if feature is None else self.input_blocks[:branch]:
            h = block(h, emb, context)
            hs.append(h)
        if down_residuals is not None:  # on a shallow call, the first ``branch`` only
            hs = [a + r for a, r in zip(hs, down_residuals, strict=False)]
        if feature is None:
            h = self.middle_block(h, emb, context)
            if mid_residual is not None:
                h = h + mid_residual
            first = 0
        else:
            h, first = feature, k - branch
        for j in range(first, k):
            if cache is not None and feature is None and j == k - branch:
                cache.store(h)
            skip = hs.pop()
            size = hs[-1].shape[-2:] if hs else None  # where a level ends: the next skip's
            h = self.output_blocks[j](torch.cat([h, skip], dim=1), emb, context, size)
        return self.out(h)
