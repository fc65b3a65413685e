"""Linear multistep samplers: LMS (variable-step Adams-Bashforth) and PLMS (PNDM)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from noisecraft.errors import ConfigError
from noisecraft.samplers._util import (
    Denoiser,
    bind,
    check_order,
    check_sigmas,
    emit,
    reject_options,
    to_d,
)

# Adams-Bashforth weights for equal steps, newest derivative first (PNDM eq. 12 for order 4).
_AB = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def lms_coefficient(sigmas: Sequence[float], i: int, j: int, order: int) -> float:
    """Weight of the derivative at sigmas[i - j] in the step sigmas[i] -> sigmas[i + 1].

    Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node
    sigma_{i-j} on the nodes sigma_i, ..., sigma_{i-order+1} (Adams-Bashforth with variable
    steps, as in k-diffusion's ``linear_multistep_coeff``). The polynomial is integrated
    exactly, in the variable u = tau - sigma_i so that large sigmas do not cancel.
    """
    if not 0 <= j < order <= i + 1:
        raise ValueError(f"need 0 <= j < order <= i + 1, got i={i}, j={j}, order={order}")
    poly = [1.0]  # coefficients in u, lowest degree first
    for k in range(order):
        if k == j:
            continue
        # factor (u + sigma_i - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k})
        shift = sigmas[i] - sigmas[i - k]
        scale = 1.0 / (sigmas[i - j] - sigmas[i - k])
        new = [0.0] * (len(poly) + 1)
        for m, c in enumerate(poly):
            new[m] += c * shift * scale
            new[m + 1] += c * scale
        poly = new
    h = sigmas[i + 1] - sigmas[i]
    return sum(c * h ** (m + 1) / (m + 1) for m, c in enumerate(poly))


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    order: int = 4,
    history_sigmas: Sequence[float] | torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """Linear multistep method on dx/dsigma = (x - D) / sigma (k-diffusion ``sample_lms``).

    x_{i+1} = x_i + sum_j c_ij d_{i-j}, c_ij = integral of the Lagrange basis over the step
    (``lms_coefficient``): Adams-Bashforth with variable steps (Karras et al. 2022 sec. 3 uses
    the same ODE). ``order`` (default 4) previous derivatives; the first steps use as many as
    exist. One denoiser call per step.

    ``history_sigmas``: the sigmas before ``sigmas[0]`` of a longer grid whose steps were
    skipped (img2img). Then, as diffusers' ``LMSDiscreteScheduler`` after ``set_begin_index``
    (``order = min(step_index + 1, order)`` with the global step index,
    scheduling_lms_discrete.py ``step``), the weights of step i are those of order
    min(global index + 1, ``order``) on the full grid, and only the weights of derivatives
    seen so far are used. Those weights are not consistent (they do not sum to the step
    size until ``order`` derivatives exist); the option reproduces diffusers' img2img and is
    off by default.
    """
    reject_options("lms", options)
    check_order("lms", order, 1, 8)
    sig = check_sigmas(sigmas)
    history: list[float] = []
    if history_sigmas is not None:
        history = [float(v) for v in torch.as_tensor(history_sigmas).double().reshape(-1)]
        full = [*history, sig[0]]
        if not all(math.isfinite(v) for v in history) or any(
            b >= a for a, b in zip(full, full[1:], strict=False)
        ):
            raise ConfigError(
                "sampler 'lms': history_sigmas must be finite, strictly decreasing and above "
                "sigmas[0]; pass the skipped head of the full sigma grid"
            )
    grid = [*history, *sig]
    offset = len(history)
    model = bind(denoiser, x, extra_args)
    ds: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i])
        emit(callback, i, x, sigmas, denoised)
        ds.append(to_d(x, sig[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        g = offset + i
        cur = min(g + 1, order)  # == len(ds) without history
        step = sum(lms_coefficient(grid, g, j, cur) * d for j, d in enumerate(reversed(ds)))
        x = x + step
    return x


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    order: int = 4,
    warmup: str = "lower_order",
    **options: Any,
) -> torch.Tensor:
    """Pseudo linear multistep (Liu et al. 2022, PNDM eq. 12, F-PLMS).

    eps' = (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24 (fixed, equal-step
    Adams-Bashforth weights), then the DDIM transfer phi(x, eps', sigma -> sigma_next), which in
    the VE view is x_next = x + (sigma_next - sigma) eps'. Because the weights assume equal
    steps, the global order on a non-uniform sigma grid is 2, not ``order``.

    ``warmup="lower_order"`` (default): the first steps use orders 1, 2, 3 (one call per step).
    ``warmup="heun"``: the first step is a Heun step, eps' = (e(x, sigma_0) + e(x', sigma_1)) / 2
    with x' the DDIM prediction (one extra call), as diffusers' ``PNDMScheduler`` with
    ``skip_prk_steps=True`` does; instead of PNDM's 4-stage Runge-Kutta warm-up.
    """
    reject_options("plms", options)
    check_order("plms", order, 1, 4)
    if warmup not in ("lower_order", "heun"):
        raise ConfigError(f"sampler 'plms': warmup must be 'lower_order' or 'heun', got {warmup!r}")
    sig = check_sigmas(sigmas)
    model = bind(denoiser, x, extra_args)
    eps: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = model(x, s)
        emit(callback, i, x, sigmas, denoised)
        eps.append((x - denoised) / s)
        if len(eps) > order:
            eps.pop(0)
        if i == 0 and warmup == "heun" and sn > 0.0:
            x_pred = x + eps[0] * (sn - s)
            e = 0.5 * (eps[0] + (x_pred - model(x_pred, sn)) / sn)
        else:
            weights = _AB[len(eps)]
            e = sum(w * e_k for w, e_k in zip(weights, reversed(eps), strict=True))
        x = x + e * (sn - s)
    return x
