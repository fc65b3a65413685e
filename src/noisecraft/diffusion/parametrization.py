"""What a network predicts, in the VP view x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.

``abar`` is alpha-bar as a tensor (or float) broadcastable to ``x_t``; the square roots
are taken in its own dtype (float64 for schedule values) before casting to ``x_t``'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from noisecraft.errors import unknown_name

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> str:
    """Return ``prediction`` if known, else raise :class:`UnknownNameError`."""
    if prediction not in PREDICTIONS:
        raise unknown_name("prediction", prediction, PREDICTIONS)
    return prediction


def _roots(abar: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
    a = torch.as_tensor(abar, device=like.device)
    if not a.is_floating_point():
        a = a.to(torch.float64)
    return a.sqrt().to(like.dtype), (1.0 - a).sqrt().to(like.dtype)


def predicted_x0(x_t: Tensor, model_out: Tensor, abar: Tensor | float, prediction: str) -> Tensor:
    """x0 from a model output (DDPM eq. 15 for eps; Salimans & Ho 2022 sec. 4 for v).

    eps: (x_t - sqrt(1 - abar) eps) / sqrt(abar);  v: sqrt(abar) x_t - sqrt(1 - abar) v;  x0: as is.
    """
    check_prediction(prediction)
    if prediction == "x0":
        return model_out
    a, b = _roots(abar, x_t)
    if prediction == "eps":
        return (x_t - b * model_out) / a
    return a * x_t - b * model_out


def predicted_eps(x_t: Tensor, model_out: Tensor, abar: Tensor | float, prediction: str) -> Tensor:
    """eps from a model output: eps as is; v: sqrt(1 - abar) x_t + sqrt(abar) v;
    x0: (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    check_prediction(prediction)
    if prediction == "eps":
        return model_out
    a, b = _roots(abar, x_t)
    if prediction == "v":
        return b * x_t + a * model_out
    return (x_t - a * model_out) / b


def target_for(prediction: str, x0: Tensor, noise: Tensor, abar: Tensor | float) -> Tensor:
    """Regression target: eps, x0 or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    a, b = _roots(abar, x0)
    return a * noise - b * x0


def c_skip_for(prediction: str, sigma: Tensor) -> Tensor:
    """``a(sigma)`` in ``x0 = a x + b * output`` of a network predicting ``prediction``.

    eps: ``x0 = x - sigma eps`` (a = 1); v: ``x0 = x / (1 + sigma^2) - ...`` (a = 1/(1+sigma^2));
    x0: a = 0 (see :class:`~noisecraft.diffusion.DiscreteDenoiser`).
    """
    if prediction == "eps":
        return torch.ones_like(sigma)
    if prediction == "v":
        return 1.0 / (1.0 + sigma**2)
    return torch.zeros_like(sigma)
