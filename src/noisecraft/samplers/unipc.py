"""UniPC: unified predictor-corrector (Zhao et al. 2023), multistep, data prediction.

VE view: lambda = -log(sigma), h = lambda_t - lambda_s0. Both the predictor UniP-p and the
corrector UniC-p start from the first-order (DDIM) step
x_t = (sigma_t / sigma_s0) x - (e^{-h} - 1) m0 and add B(h) times a combination of divided
differences of earlier data predictions m (Zhao et al. 2023 Alg. 1-2 / eq. 8, the "bh"
variants: B(h) = e^{-h} - 1 for bh2, -h for bh1).
"""

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
)


def _lam(sigma: float) -> float:
    """Half log-SNR lambda = -log(sigma) (VE view)."""
    return -math.log(sigma)


def _coefficients(
    rks: Sequence[float], h: float, order: int, variant: str
) -> tuple[list[list[float]], list[float], float, float]:
    """R (powers of r_k), b (phi_k scaled by k! / B(h)), h phi_1 and B(h) of Zhao et al. 2023
    Alg. 1-2 for data prediction (hh = -h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh) if variant == "bh2" else hh
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    R: list[list[float]] = []
    b: list[float] = []
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return R, b, h_phi_1, b_h


def _solve(R: list[list[float]], b: list[float]) -> list[float]:
    """Solve the small linear system R rho = b in float64."""
    a = torch.tensor(R, dtype=torch.float64)
    return torch.linalg.solve(a, torch.tensor(b, dtype=torch.float64)).tolist()


def _history(
    sig: Sequence[float], outputs: Sequence[torch.Tensor], s0_index: int, h: float, order: int
) -> tuple[list[float], list[torch.Tensor]]:
    """r_k = (lambda_{s_k} - lambda_{s0}) / h and D1_k = (m_{s_k} - m0) / r_k, k = 1..order-1,
    where s_k = s0_index - k and outputs[-1] is m0 = the data prediction at sig[s0_index]."""
    m0 = outputs[-1]
    rks: list[float] = []
    d1s: list[torch.Tensor] = []
    for k in range(1, order):
        rk = (_lam(sig[s0_index - k]) - _lam(sig[s0_index])) / h
        rks.append(rk)
        d1s.append((outputs[-(k + 1)] - m0) / rk)
    return [*rks, 1.0], d1s


def _predict(
    x: torch.Tensor,
    sig: Sequence[float],
    outputs: Sequence[torch.Tensor],
    i: int,
    order: int,
    variant: str,
) -> torch.Tensor:
    """UniP-p step sig[i] -> sig[i+1] from x at sig[i] (Zhao et al. 2023 Alg. 2, predictor)."""
    s0, t = sig[i], sig[i + 1]
    m0 = outputs[-1]
    if t == 0.0:
        return m0  # first-order step with h = inf (order is 1 here: lower_order_final)
    h = math.log(s0 / t)
    rks, d1s = _history(sig, outputs, i, h, order)
    R, b, h_phi_1, b_h = _coefficients(rks, h, order, variant)
    x_t = (t / s0) * x - h_phi_1 * m0
    if d1s:
        rhos = [0.5] if order == 2 else _solve([r[:-1] for r in R[:-1]], b[:-1])
        x_t = x_t - b_h * sum(rho * d for rho, d in zip(rhos, d1s, strict=True))
    return x_t


def _correct(
    x_t: torch.Tensor,
    x: torch.Tensor,
    model_t: torch.Tensor,
    sig: Sequence[float],
    outputs: Sequence[torch.Tensor],
    i: int,
    order: int,
    variant: str,
) -> torch.Tensor:
    """UniC-p: redo the step sig[i-1] -> sig[i] from x, now also using model_t = D(x_t, sig[i])
    (Zhao et al. 2023 Alg. 2, corrector); order of accuracy order + 1, no extra call."""
    s0, t = sig[i - 1], sig[i]
    m0 = outputs[-1]
    h = math.log(s0 / t)
    rks, d1s = _history(sig, outputs, i - 1, h, order)
    R, b, h_phi_1, b_h = _coefficients(rks, h, order, variant)
    rhos = [0.5] if order == 1 else _solve(R, b)
    res = rhos[-1] * (model_t - m0)
    for rho, d in zip(rhos[:-1], d1s, strict=True):
        res = res + rho * d
    return (t / s0) * x - h_phi_1 * m0 - b_h * res


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], Any] | None = None,
    extra_args: dict | None = None,
    order: int = 2,
    variant: str = "bh2",
    **options: Any,
) -> torch.Tensor:
    """UniPC multistep sampler (Zhao et al. 2023, Alg. 2; diffusers' UniPCMultistepScheduler).

    Each step: evaluate D at the predicted x_i, correct x_i with UniC (from the second step on),
    then predict x_{i+1} with UniP. ``order`` (default 2, diffusers' default and the paper's
    advice for guided sampling; 3 for unconditional) is the predictor order; the corrector adds
    one, so the method is of order ``order + 1``. Warm-up with lower orders, and the last steps
    use lower orders (lower_order_final); the final x is not corrected (that would need one more
    call). One denoiser call per step.
    """
    reject_options("unipc", options)
    check_order("unipc", order, 1, 3)
    if variant not in ("bh1", "bh2"):
        raise ConfigError(f"sampler 'unipc': variant must be 'bh1' or 'bh2', got {variant!r}")
    sig = check_sigmas(sigmas)
    n = len(sig) - 1
    model = bind(denoiser, x, extra_args)
    outputs: list[torch.Tensor] = []
    last_x: torch.Tensor | None = None
    last_order = 1
    for i in range(n):
        denoised = model(x, sig[i])
        if last_x is not None:
            x = _correct(x, last_x, denoised, sig, outputs, i, last_order, variant)
        emit(callback, i, x, sigmas, denoised)
        outputs = [*outputs[-(order - 1) :], denoised] if order > 1 else [denoised]
        this_order = min(order, n - i, i + 1)
        last_x = x
        x = _predict(x, sig, outputs, i, this_order, variant)
        last_order = this_order
    return x
