"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models").

A ControlNet is a trainable copy of a U-Net's encoder (input blocks and middle block) that
also reads a condition image ``c`` (edges, depth, pose, ...). Eq. 1-2 of the paper: with the
locked block ``F(x; Θ)``, its trainable copy ``Θc`` and two zero convolutions ``Z`` (1x1
convs whose weight and bias start at zero),

    y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2),

so a fresh ControlNet adds exactly nothing and training starts from the base model's output.
For Stable Diffusion the condition goes through a small conv encoder first (the paper's
``E``, section 3.3: "four convolution layers" of 16, 32, 64, 128 channels from 512x512
pixels to the 64x64 latent size; the released code, which we follow, has eight 3x3 convs of
16, 16, 32, 32, 96, 96, 256 and ``model_channels`` channels, three of stride 2, with SiLU
between them), whose last conv is zero too. Its output is added after the copy's first
conv; every input block's output goes through its own zero conv (``zero_convs.N``) and
becomes a residual added to the base U-Net's skip connection ``N``, and the middle block's
output through ``middle_block_out`` is added to the base's middle output
(:meth:`noisecraft.models.unet.UNet.forward`'s ``down_residuals`` / ``mid_residual``).

Module names are those of lllyasviel's ``cldm.cldm.ControlNet`` (the ``control_model.*`` of
original files without the prefix): ``time_embed``, ``input_hint_block.{0,2,...,14}``,
``input_blocks.N.M``, ``zero_convs.N.0``, ``middle_block``, ``middle_block_out.0``; the
encoder is built by :class:`~noisecraft.models.unet.UNetEncoder`, the U-Net's own.

Guess mode ("soft injection" in the original code): the residuals are scaled from 0.1 at the
shallowest to 1 at the middle block, geometrically; the original uses ``0.825 ** (12 - i)``
for SD's 13 residuals, diffusers ``torch.logspace(-1, 0, n + 1)``, which we follow
(``0.825 ** 12`` = 0.099; the two differ by at most 0.6 %). In a pipeline guess mode also drops
the ControlNet from the unconditional pass of classifier-free guidance (the caller's part).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from noisecraft.errors import ConfigError
from noisecraft.models.unet import UNet, UNetConfig, UNetEncoder
from noisecraft.nn.kernels import Conv2d

__all__ = ["HINT_CHANNELS", "ControlNet", "ControlNetConfig", "guess_mode_scales"]

#: The hint encoder's widths in cldm and diffusers (``conditioning_embedding_out_channels``).
HINT_CHANNELS = (16, 32, 96, 256)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ControlNetConfig:
    """Size of a :class:`ControlNet`: the base U-Net's config (its encoder is copied; the
    decoder-only fields ``out_channels`` / ``learn_sigma`` are unused) and the hint encoder.

    * ``hint_channels``: widths of the hint encoder's levels; each level but the first
      halves the size (3 stride-2 convs for the 4 standard levels, i.e. 8x: pixels -> SD
      latents);
    * ``hint_in_channels``: channels of the hint image (3, RGB).
    """

    unet: UNetConfig
    hint_channels: tuple[int, ...] = HINT_CHANNELS
    hint_in_channels: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.unet, UNetConfig):
            raise ConfigError("ControlNetConfig.unet must be a U-Net config")
        h = self.hint_channels
        if not isinstance(h, (list, tuple)) or not h or not all(_is_int(v) and v > 0 for v in h):
            raise ConfigError(
                f"ControlNetConfig.hint_channels must be a non-empty list of positive "
                f"integers, got {h!r}"
            )
        object.__setattr__(self, "hint_channels", tuple(h))
        if not _is_int(self.hint_in_channels) or self.hint_in_channels < 1:
            raise ConfigError(
                f"ControlNetConfig.hint_in_channels must be a positive integer, "
                f"got {self.hint_in_channels!r}"
            )

    @property
    def hint_factor(self) -> int:
        """How many hint pixels per latent pixel along each side (8 for the standard encoder)."""
        return 2 ** (len(self.hint_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the U-Net's config nested under ``unet``)."""
        return {
            "unet": self.unet.to_dict(),
            "hint_channels": list(self.hint_channels),
            "hint_in_channels": self.hint_in_channels,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControlNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown ControlNet config key(s) {unknown}; known keys: {sorted(known)}"
            )
        if "unet" not in d:
            raise ConfigError("a ControlNet config needs the U-Net's config under 'unet'")
        return cls(**{**d, "unet": UNetConfig.from_dict(d["unet"])})


def guess_mode_scales(n: int, *, device: torch.device | str | None = None) -> Tensor:
    """Guess mode's ``n`` residual scales (down residuals, then the middle one): 10 ** (-1 +
    i / (n - 1)), from 0.1 to 1 (diffusers' ``logspace(-1, 0, n)``; module docstring)."""
    return torch.logspace(-1, 0, n, device=device)


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(UNetEncoder):
    """A ControlNet for a U-Net of ``config.unet`` (module docstring): the U-Net's encoder,
    ``input_hint_block``, ``zero_convs`` and ``middle_block_out``.

    ``forward(x, t, context, hint)`` gives the ``(down_residuals, mid_residual)`` that
    :meth:`UNet.forward` adds to its skips and middle output. The zero convolutions (and the
    hint encoder's last conv) start at zero, so an untrained ControlNet changes nothing.

    ``controlnet_config`` is the whole :class:`ControlNetConfig`; ``config`` (as on
    :class:`UNetEncoder`) its U-Net part, ``skip_channels`` the residuals' channels.
    """

    what = "ControlNet"

    def __init__(self, config: ControlNetConfig):
        if not isinstance(config, ControlNetConfig):
            raise ConfigError("ControlNet takes a ControlNetConfig (ControlNetConfig(unet=...))")
        super().__init__(config.unet)
        self.controlnet_config = config
        hint = config.hint_channels
        layers: list[nn.Module] = [Conv2d(config.hint_in_channels, hint[0], 3, padding=1)]
        for ch_in, ch_out in zip(hint, hint[1:], strict=False):
            layers += [nn.SiLU(), Conv2d(ch_in, ch_in, 3, padding=1)]
            layers += [nn.SiLU(), Conv2d(ch_in, ch_out, 3, padding=1, stride=2)]
        layers += [nn.SiLU(), _zero(Conv2d(hint[-1], self.config.model_channels, 3, padding=1))]
        self.input_hint_block = nn.Sequential(*layers)
        self.zero_convs = nn.ModuleList(
            nn.Sequential(_zero(Conv2d(ch, ch, 1))) for ch in self.skip_channels
        )
        mid = self.config.model_channels * self.config.channel_mult[-1]
        self.middle_block_out = nn.Sequential(_zero(Conv2d(mid, mid, 1)))

    @classmethod
    def from_unet(
        cls,
        unet: UNet,
        *,
        hint_channels: Sequence[int] = HINT_CHANNELS,
        hint_in_channels: int = 3,
    ) -> ControlNet:
        """A new ControlNet for ``unet``: its encoder's weights copied (the paper's trainable
        copy, for training), the hint encoder random with a zero last conv, the zero convs
        zero; on ``unet``'s device and dtype."""
        config = ControlNetConfig(unet.config, tuple(hint_channels), hint_in_channels)
        param = next(unet.parameters())
        model = cls(config).to(device=param.device, dtype=param.dtype)
        encoder = {
            k: v
            for k, v in unet.state_dict().items()
            if not k.startswith(("output_blocks.", "out."))
        }
        model.load_state_dict(encoder, strict=False)  # the ControlNet's own layers stay
        return model

    def residual_scales(
        self, scale: float | Sequence[float] | Tensor, guess_mode: bool, device: torch.device
    ) -> Tensor:
        """One scale per residual (down residuals, then the middle one)."""
        n = len(self.zero_convs) + 1
        s = torch.as_tensor(scale, dtype=torch.float32, device=device)
        if s.ndim == 1 and s.numel() != n:
            raise ConfigError(f"give one ControlNet scale or {n} (one per residual), got {len(s)}")
        if s.ndim > 1:
            raise ConfigError("the ControlNet scale must be a number or a list of numbers")
        s = s.expand(n)
        return s * guess_mode_scales(n, device=device) if guess_mode else s

    def _check_hint(self, x: Tensor, hint: Tensor) -> None:
        c = self.controlnet_config
        f = c.hint_factor
        want = (c.hint_in_channels, x.shape[-2] * f, x.shape[-1] * f)
        if hint.ndim != 4 or tuple(hint.shape[1:]) != want or hint.shape[0] not in (1, len(x)):
            raise ConfigError(
                f"the control image must be (1 or {len(x)}, {want[0]}, {want[1]}, {want[2]}) "
                f"({f}x the latent size), got {tuple(hint.shape)}"
            )

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None,
        hint: Tensor,
        *,
        scale: float | Sequence[float] | Tensor = 1.0,
        guess_mode: bool = False,
    ) -> tuple[list[Tensor], Tensor]:
        """The residuals for the base U-Net's skips and middle output.

        ``x`` (B, C, H, W): the base U-Net's input (noisy latents, already scaled as the
        U-Net gets them); ``t``: timesteps as for the U-Net; ``context`` (B, L, context_dim);
        ``hint`` (B or 1, 3, H * 8, W * 8): the control image, RGB in [0, 1] (what
        diffusers' control-image processor gives; batch 1 is shared by the whole batch).
        ``scale``: a number, or one per residual (down residuals, then the middle one),
        multiplying the residuals (diffusers' ``conditioning_scale``); ``guess_mode``: the
        residuals scaled further by :func:`guess_mode_scales`.

        Returns ``(down_residuals, mid_residual)``: one (B, ``skip_channels[i]``, h_i, w_i)
        tensor per input block, and the middle block's (B, C_mid, h, w).
        """
        self._check(x, None, context)
        self._check_hint(x, hint)
        scales = self.residual_scales(scale, guess_mode, x.device)
        emb = self.embedding(x, t)
        guided = self.input_hint_block(hint.to(self.input_hint_block[0].weight.dtype))
        downs = []
        h = x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            downs.append(zero(h) * scales[i].to(h.dtype))
        h = self.middle_block(h, emb, context)
        mid = self.middle_block_out(h) * scales[-1].to(h.dtype)
        return downs, mid
