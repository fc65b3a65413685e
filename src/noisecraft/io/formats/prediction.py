"""Which parametrisation an SD file's U-Net predicts, ``eps`` or ``v``.

SD 1.x models predict ``eps``. SD 2.x's 768-v models predict ``v`` and its 512-base models
``eps``, with no flag in the file: the file's own note is used when it has one
(:func:`prediction_hint`: a ``modelspec.prediction_type`` metadata key, a ``v_pred`` marker
tensor), else the U-Net is probed once (:func:`probe_prediction`), as AUTOMATIC1111's
``is_using_v_parameterization_for_sd2`` does, with its own rule (see there).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from noisecraft.models.unet import UNet

__all__ = ["PROBE_THRESHOLD", "prediction_hint", "probe_prediction"]

PROBE_THRESHOLD = 0.5


@torch.no_grad()
def probe_prediction(unet: UNet, context: Tensor, *, num_steps: int = 1000) -> tuple[str, float]:
    """Tell an ``eps`` from a ``v`` U-Net by one call at the last timestep; (prediction, slope).

    At ``t = T - 1`` the signal is a tiny part of ``x_t = a x0 + b eps`` (SD: ``a^2 =
    abar = 0.0047``). The best eps-prediction is then ~``x_t`` itself, while the best
    v-prediction ``a eps - b x0`` is nearly uncorrelated with ``x_t``: for any data, the
    least-squares slope of ``E[v | x_t]`` on ``x_t`` equals that of ``v``,
    ``a b (1 - s^2) / (a^2 s^2 + b^2)`` (``s^2`` the data variance), about ``0.07 (1 - s^2)``,
    against ``b / (a^2 s^2 + b^2)`` ~ 1 for eps. So the slope ``<out, x> / <x, x>`` on a
    fixed N(0, I) input is compared with 0.5. (AUTOMATIC1111 runs SD 2.x's U-Net on a
    constant 0.5 input and calls it v when ``mean(out - x) < -1``, a threshold found
    empirically on the released models; this rule is derived, so it also holds for small
    models trained here.) Inpainting U-Nets get a full mask and empty masked-image latents.
    """
    c = unet.config
    size = max(8, 2 ** len(c.channel_mult))  # the deepest level 2x2 (SD: 16x16 latents)
    param = next(unet.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, c.out_channels, size, size), generator=g)
    inputs = x
    if c.in_channels == 2 * c.out_channels + 1:
        mask = torch.ones((1, 1, size, size))
        inputs = torch.cat([x, mask, torch.zeros_like(x)], dim=1)
    t = torch.tensor([float(num_steps - 1)], device=param.device)
    out = unet(inputs.to(param), t, context=context[:1].to(param)).float().cpu()
    slope = float((out * x).sum() / (x * x).sum())
    return ("eps" if slope > PROBE_THRESHOLD else "v"), slope


def prediction_hint(
    metadata: Mapping[str, str], sd: Mapping[str, Tensor]
) -> tuple[str, str] | None:
    """(prediction, where it was found) from the file's metadata or marker tensors, or None."""
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("epsilon", "eps"):
        return "eps", "modelspec.prediction_type metadata"
    if spec in ("v", "v_prediction"):
        return "v", "modelspec.prediction_type metadata"
    if "v_pred" in sd:
        return "v", "the file's v_pred marker"
    return None
