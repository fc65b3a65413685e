"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from noisecraft.diffusion.denoisers import sigma_batch
from noisecraft.errors import ConfigError


def rescale_guidance(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Guidance rescale, Lin et al. 2023 eq. 15-16.

    x_rescaled = x_cfg * std(x_cond) / std(x_cfg) (per sample, over all other dims),
    x_final = phi * x_rescaled + (1 - phi) * x_cfg.
    """
    if rescale == 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return rescale * (guided * ratio) + (1.0 - rescale) * guided


class CFGDenoiser:
    """``u + scale * (c - u)`` of a denoiser's conditional and unconditional estimates.

    Both passes run as ONE batch: inputs are concatenated along dim 0, conditional first.
    Keyword tensors in ``cond`` are concatenated with the same key of ``uncond``; a key
    missing from ``uncond`` (e.g. a ControlNet image or mask) is repeated for both halves,
    and non-tensor values are passed through. ``scale == 1`` calls the denoiser on the
    conditional inputs only. ``rescale`` (phi) applies :func:`rescale_guidance` to the
    guided x0 estimate.
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        scale: float,
        uncond: Mapping[str, Any],
        rescale: float = 0.0,
    ):
        if not 0.0 <= rescale <= 1.0:
            raise ConfigError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.uncond = dict(uncond)
        self.rescale = float(rescale)

    def _batch_cond(self, cond: Mapping[str, Any]) -> dict[str, Any]:
        extra = set(self.uncond) - set(cond)
        if extra:
            raise ConfigError(
                f"unconditional inputs {sorted(extra)} have no conditional counterpart; "
                "pass the same keys to the guided call"
            )
        out: dict[str, Any] = {}
        for k, c in cond.items():
            if not isinstance(c, Tensor):
                out[k] = c
                continue
            u = self.uncond.get(k, c)
            if u.shape[0] == 1 and c.shape[0] != 1:
                u = u.expand(c.shape[0], *u.shape[1:])
            out[k] = torch.cat([c, u.to(c.device)])
        return out

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, **cond)
        dtype = sigma.dtype if isinstance(sigma, Tensor) and sigma.is_floating_point() else x.dtype
        s = sigma_batch(sigma, x).to(dtype)
        both = self.denoiser(torch.cat([x, x]), torch.cat([s, s]), **self._batch_cond(cond))
        c, u = both.chunk(2)
        guided = u + self.scale * (c - u)
        return rescale_guidance(guided, c, self.rescale)
