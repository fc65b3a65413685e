"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from noisecraft.diffusion.denoisers import sigma_batch
from noisecraft.errors import ConfigError


def rescale_guidance(
    guided: Tensor,
    cond: Tensor,
    rescale: float,
    *,
    x: Tensor | None = None,
    c_skip: Tensor | None = None,
) -> Tensor:
    """Guidance rescale (Lin et al. 2023 eq. 15-16) in the network's output space.

    diffusers' ``rescale_noise_cfg`` rescales the *network output* ``o`` (eps for eps-models,
    v for v-models): ``o_final = phi * o_cfg * std(o_c) / std(o_cfg) + (1 - phi) * o_cfg``,
    std per sample over all other dims. A denoiser works on x0, with ``x0 = a x + b o`` per
    sample (``a = c_skip``, see :func:`~noisecraft.diffusion.parametrization.c_skip_for`).
    CFG commutes with that affine map (its weights sum to 1) but the std ratio does not:
    ``std(o) = std(x0 - a x) / |b|``, so

        x0_final = a x + (x0_cfg - a x) * (phi * std(x0_c - a x) / std(x0_cfg - a x) + 1 - phi)

    equals diffusers' result exactly. Without ``x`` / ``c_skip`` (a = 0) x0 itself is
    rescaled, which is the same only for x0-prediction. Where ``std(x0_cfg - a x)`` is 0
    (sigma = 0) the guided value is returned unchanged.
    """
    if rescale == 0:
        return guided
    if x is None or c_skip is None:
        g0, c0, base = guided, cond, 0.0
    else:
        a = c_skip.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        base = a * x
        g0, c0 = guided - base, cond - base
    dims = tuple(range(1, guided.ndim))
    std_c, std_g = c0.std(dim=dims, keepdim=True), g0.std(dim=dims, keepdim=True)
    ratio = torch.where(std_g > 0, std_c / std_g.clamp(min=torch.finfo(std_g.dtype).tiny), 1.0)
    return base + g0 * (rescale * ratio + (1.0 - rescale))


class CFGDenoiser:
    """``u + scale * (c - u)`` of a denoiser's conditional and unconditional estimates
    (Ho & Salimans 2022 eq. 6, written on x0, which is affine in eps and v).

    Both passes run as ONE batch: inputs are concatenated along dim 0, conditional first.
    Keyword tensors in ``cond`` are concatenated with the same key of ``uncond``; a key
    missing from ``uncond`` (e.g. a ControlNet image or mask) is repeated for both halves,
    and non-tensor values are passed through. ``scale == 1`` calls the denoiser on the
    conditional inputs only (diffusers guides only for ``scale > 1``; here any
    ``scale != 1`` guides, as in AUTOMATIC1111). ``rescale`` (phi) applies
    :func:`rescale_guidance` in the network's output space; ``c_skip(sigma)`` gives its
    ``a`` (None: x0 space).
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        scale: float,
        uncond: Mapping[str, Any],
        rescale: float = 0.0,
        c_skip: Callable[[Tensor], Tensor] | None = None,
    ):
        if not 0.0 <= rescale <= 1.0:
            raise ConfigError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.uncond = dict(uncond)
        self.rescale = float(rescale)
        self.c_skip = c_skip

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
        if self.rescale == 0:
            return guided
        a = None if self.c_skip is None else self.c_skip(sigma_batch(sigma, x))
        return rescale_guidance(guided, c, self.rescale, x=x, c_skip=a)
