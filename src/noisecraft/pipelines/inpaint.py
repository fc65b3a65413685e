"""Inpainting of an ordinary model as a denoiser wrapper: no sampler knows about it."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from noisecraft.diffusion.denoisers import sigma_batch
from noisecraft.samplers._util import Denoiser


class InpaintDenoiser:
    """Inpainting of an ordinary model by blending known latents (RePaint-style).

    Lugmayr et al. 2022 (RePaint, eq. 8) replace the known region of x_t by a forward-noised
    copy of the known image at every step; diffusers' ``StableDiffusionInpaintPipeline`` does
    it after each step with the initial noise: ``x = (1 - m) (known + sigma_next * noise) +
    m x``. As a denoiser wrapper the same blend is made on the input of every call at
    ``sigma < sigma_start`` (the blend after step i is the input of step i + 1); the first
    call sees the sampler's own start. Samplers update every latent pixel from its own x and
    x0 estimate only, so the repainted region (``m = 1``) is exactly what the after-step blend
    gives; the known region is overwritten by the final blend in :func:`generate`.

    ``mask`` (B, 1, h, w): 1 = repaint, 0 = keep; ``known``: the clean known latents; ``noise``
    the unit noise the sampler started from.
    """

    def __init__(
        self,
        inner: Denoiser,
        known: Tensor,
        noise: Tensor,
        mask: Tensor,
        sigma_start: float,
    ):
        self.inner, self.known, self.noise, self.mask = inner, known, noise, mask
        self.sigma_start = float(sigma_start)

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        s = sigma_batch(sigma, x)
        if float(s.max()) < self.sigma_start:
            sig = s.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            noised = self.known + sig * self.noise
            x = (1.0 - self.mask) * noised + self.mask * x
        return self.inner(x, sigma, **cond)
