"""Sinusoidal timestep embedding (Transformer positional encoding applied to t).

Vaswani et al. 2017 sec. 3.5 as used by DDPM (Ho et al. 2020, appendix B) and LDM:
for ``half = dim // 2`` and ``k = 0..half-1``

    freq_k = exp(-log(max_period) * k / (half - freq_shift))
    emb(t) = [cos(t * freq_0..half-1), sin(t * freq_0..half-1)]

``t`` may be fractional: the embedding is a smooth function of t, which is what samplers
that interpolate between the discrete training timesteps rely on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_embedding(
    t: Tensor,
    dim: int,
    max_period: float = 10000.0,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
) -> Tensor:
    """Embed timesteps ``t`` of shape (B,) (or 0-d) as a (B, dim) float32 tensor.

    ``flip_sin_to_cos=True`` (the default) puts the cosines first, as LDM / Stable Diffusion /
    improved-diffusion do and as diffusers does with ``flip_sin_to_cos=True`` (its U-Nets'
    default). ``False`` gives ``[sin, cos]``, the order of diffusers' bare
    ``get_timestep_embedding`` default and of tensor2tensor. ``freq_shift`` is diffusers'
    ``downscale_freq_shift`` (0 for LDM; 1 for the original DDPM TF code). An odd ``dim`` is
    padded with one zero column.
    """
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t[None]
    half = dim // 2
    # (-log(P) * k) / (half - shift), in this order, as LDM and diffusers round it in float32.
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / (half - freq_shift))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    first, second = (torch.cos(args), torch.sin(args))
    emb = torch.cat([first, second] if flip_sin_to_cos else [second, first], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
