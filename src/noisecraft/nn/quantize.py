"""Dynamic int8 quantisation of a module's Linear (and Conv2d) layers for CPU inference.

Weights are stored as int8 with one scale per output channel, activations quantised per call
from their observed range (Jacob et al. 2018), as ``torch.ao.quantization.quantize_dynamic``
implements it on the CPU backends (fbgemm / x86 / onednn). Fast mode's ``int8`` option
(``LatentDiffusion.int8()``); its speed and quality cost are in docs/performance.md.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from noisecraft.errors import ConfigError
from noisecraft.nn.resnet import Upsample


def _to_plain(module: nn.Module, skip: tuple[str, ...], convs: bool) -> nn.Module:
    """Turn noisecraft's kernel Linear / Conv2d subclasses (in a copy) into the plain torch
    classes that ``quantize_dynamic`` recognises, except in the children named ``skip``."""
    for name, child in list(module.named_children()):
        if name in skip or isinstance(child, Upsample):  # its conv runs a fused kernel
            continue
        for cls in (nn.Linear, nn.Conv2d) if convs else (nn.Linear,):
            if type(child) is not cls and isinstance(child, cls):
                child.__class__ = cls  # a subclass that only overrides forward
                break
        else:
            _to_plain(child, (), convs)
    return module


def quantize_int8(
    module: nn.Module,
    *,
    convs: bool = False,
    skip: tuple[str, ...] = ("time_embed",),
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``module`` (float32, CPU) with dynamically quantised int8 Linear layers and,
    with ``convs``, Conv2d layers; the top-level children named in ``skip`` stay float (the
    U-Net's time embedding: tiny, and its first weight's dtype is read by the forward), as do
    the convs of :class:`~noisecraft.nn.resnet.Upsample` (fused upsample + conv kernel).

    Only for CPU inference (no autograd through quantised layers). The original is unchanged
    unless ``inplace``: then ``module`` itself is quantised, without the float32 copy (a
    whole SD U-Net copy, 3.4 GB) that keeping the original costs.
    """
    params = list(module.parameters())
    if params and (params[0].device.type != "cpu" or params[0].dtype != torch.float32):
        raise ConfigError(
            "int8 quantisation runs on a float32 CPU model; load it without --device / --dtype"
        )
    from torch.ao.nn.quantized import dynamic as nnqd
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    plain = _to_plain(module if inplace else copy.deepcopy(module), skip, convs)
    spec: dict[type, Any] = {nn.Linear: per_channel_dynamic_qconfig}
    mapping: dict[type, type] = {nn.Linear: nnqd.Linear}
    if convs:
        spec[nn.Conv2d] = default_dynamic_qconfig
        mapping[nn.Conv2d] = nnqd.Conv2d
    for name in skip:  # keep these float: qconfig None stops the propagation
        child = getattr(plain, name, None)
        if child is not None:
            for m in child.modules():
                m.qconfig = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao -> torchao notice
        warnings.simplefilter("ignore", UserWarning)  # quantize_per_tensor deprecation
        # inplace: ``plain`` is already the copy (or the module the caller gave up)
        return quantize_dynamic(
            plain.eval(), spec, dtype=torch.qint8, mapping=mapping, inplace=True
        )


__all__ = ["quantize_int8"]
