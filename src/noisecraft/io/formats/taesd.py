"""TAESD decoder files (madebyollin/taesd, Ollin Boer Bohan 2023) read into a
:class:`~noisecraft.models.tiny_decoder.TinyDecoder`.

Two layouts reach users:

* **The original files** ``taesd_decoder.safetensors`` / ``taesd_decoder.pth`` (what
  AUTOMATIC1111 puts in ``models/VAE-approx``): the state dict of taesd.py's ``Decoder``
  ``nn.Sequential`` -- ``Clamp`` at index 0, the first conv at 1, so the keys are ``1.weight``,
  ``3.conv.0.weight``, ... -- which are :class:`TinyDecoder`'s own keys. ``.pth`` pickles are
  read only through :func:`noisecraft.io.safe_read.read_checkpoint` (``weights_only``).
* **diffusers' ``AutoencoderTiny``** (``madebyollin/taesd`` on the hub: ``config.json`` +
  ``diffusion_pytorch_model.safetensors``; the folder or that file): the decoder's keys are
  ``decoder.layers.N.<rest>``. ``DecoderTiny`` applies the clamp in ``forward`` instead of as
  a layer, so its layer ``N`` is the original's ``N + 1``: ``decoder.layers.N.<rest>`` ->
  ``<N+1>.<rest>`` (diffusers' scripts/convert_tiny_autoencoder_to_diffusers.py subtracts the
  same 1). An index shift is not a key-rule table's field copy (:mod:`noisecraft.key_rules`),
  hence the few lines of :func:`diffusers_to_original`. ``encoder.*`` keys are ignored.

Either way the weights give images in [0, 1]; the config read off the tensors has
``output_range="unit"``, so :class:`TinyDecoder` returns ``2 x - 1`` in [-1, 1] (as diffusers'
``DecoderTiny.forward`` does). TAESD decodes the SCALED latents the U-Net samples (diffusers'
``AutoencoderTiny`` config has ``scaling_factor = 1.0``; its SD pipeline divides by it), the
input :meth:`TinyDecoder.decode` takes.

Latent spaces: TAESDXL (SDXL) has TAESD's shapes, so nothing in the file tells them apart --
one used on the wrong model gives wrong images, not an error. TAESD3 / TAEF1 (SD3 / FLUX)
decode 16-channel latents: they load, and a 4-channel model refuses them
(:class:`~noisecraft.models.latent_diffusion.LatentDiffusion` checks the channels). A
diffusers folder whose config scales or shifts the latents (``scaling_factor`` != 1,
``shift_factor`` != 0) is refused here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from noisecraft.errors import CheckpointError
from noisecraft.io.formats.diffusers_files import MODEL_STEMS, read_json, read_weights
from noisecraft.io.safe_read import read_checkpoint
from noisecraft.models.tiny_decoder import TinyDecoderConfig

#: The prefix of the decoder's keys in a diffusers ``AutoencoderTiny``.
DIFFUSERS_PREFIX = "decoder.layers."
#: What a tiny decoder file may be, for the refusals.
EXPECTED = (
    "expected a noisecraft tiny_decoder checkpoint, TAESD's taesd_decoder.safetensors / .pth "
    "(keys '1.weight', '3.conv.0.weight', ...) or a diffusers AutoencoderTiny folder / its "
    "diffusion_pytorch_model.safetensors (keys 'decoder.layers.*')"
)
_ORIGINAL_KEY = re.compile(r"(\d+)\.(.+)")


def read_taesd_decoder(path: str | os.PathLike) -> tuple[dict[str, Tensor], TinyDecoderConfig]:
    """(state dict in :class:`TinyDecoder`'s keys, its config) of a TAESD decoder file or a
    diffusers ``AutoencoderTiny`` folder; every problem is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if path.is_dir():
        _check_diffusers_config(path)
        _, tensors = read_weights(path, None, MODEL_STEMS)
    else:
        tensors, _ = read_checkpoint(path)
    state = taesd_state_dict(tensors, path)
    return state, infer_config(state, path)


def taesd_state_dict(tensors: Mapping[str, Tensor], source: Path) -> dict[str, Tensor]:
    """The decoder's tensors in the original (= our) keys, from either layout."""
    if any(k.startswith(DIFFUSERS_PREFIX) for k in tensors):
        others = [k for k in tensors if not k.startswith((DIFFUSERS_PREFIX, "encoder."))]
        if others:
            raise CheckpointError(f"{source} is not a tiny decoder (key {others[0]}); {EXPECTED}")
        return diffusers_to_original(tensors)
    if tensors and all(_ORIGINAL_KEY.fullmatch(k) for k in tensors):
        if "1.weight" not in tensors and "0.weight" in tensors:
            raise CheckpointError(
                f"{source} holds TAESD's encoder (taesd_encoder), not its decoder; give the "
                "taesd_decoder file"
            )
        return dict(tensors)
    first = next(iter(tensors), "none")
    raise CheckpointError(f"{source} is not a tiny decoder (first key {first}); {EXPECTED}")


def diffusers_to_original(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``decoder.layers.N.<rest>`` -> ``<N+1>.<rest>`` (diffusers' ``DecoderTiny`` has no
    clamp layer at index 0); other keys (the encoder's) are dropped."""
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if key.startswith(DIFFUSERS_PREFIX):
            index, rest = key[len(DIFFUSERS_PREFIX) :].split(".", 1)
            out[f"{int(index) + 1}.{rest}"] = value
    return out


def infer_config(state: Mapping[str, Tensor], source: Path) -> TinyDecoderConfig:
    """The :class:`TinyDecoderConfig` (``output_range="unit"``) the tensors' shapes give.

    The layout (module docstring of :mod:`noisecraft.models.tiny_decoder`) is: conv at 1,
    then blocks (``i.conv.0.weight``) and convs (``i.weight``); the convs between the first
    and the last are the upsampling convs, and all blocks but the last one are spread evenly
    over them. Anything that does not fit is refused when the weights are loaded strictly.
    """
    first = state.get("1.weight")
    indices = sorted({int(k.split(".", 1)[0]) for k in state})
    convs = [i for i in indices if f"{i}.weight" in state]
    blocks = [i for i in indices if f"{i}.conv.0.weight" in state]
    if first is None or first.ndim != 4 or len(convs) < 2 or not blocks:
        raise CheckpointError(f"{source} is not a tiny decoder (no TAESD layout); {EXPECTED}")
    upsamplings = len(convs) - 2
    per_level = (len(blocks) - 1) // upsamplings if upsamplings else 0
    return TinyDecoderConfig(
        latent_channels=int(first.shape[1]),
        width=int(first.shape[0]),
        upsamplings=upsamplings,
        blocks_per_level=per_level,
        out_channels=int(state[f"{convs[-1]}.weight"].shape[0]),
        output_range="unit",
    )


def _check_diffusers_config(folder: Path) -> None:
    """Refuse a folder that is not an ``AutoencoderTiny`` of TAESD's design, or whose config
    scales / shifts the latents (a decoder for another latent space)."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is a folder without config.json; {EXPECTED}")
    config = read_json(folder / "config.json")
    name = config.get("_class_name", "AutoencoderTiny")
    if name != "AutoencoderTiny":
        raise CheckpointError(f"{folder} holds a diffusers {name}, not an AutoencoderTiny")
    design = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2}
    for key, want in design.items():
        if config.get(key, want) != want:
            raise CheckpointError(
                f"{folder}: this AutoencoderTiny has {key} = {config[key]!r}; only TAESD's "
                f"design ({key} = {want!r}) loads"
            )
    scale, shift = config.get("scaling_factor", 1.0), config.get("shift_factor", 0.0) or 0.0
    if scale != 1.0 or shift != 0.0:
        raise CheckpointError(
            f"{folder}: this AutoencoderTiny scales its latents (scaling_factor {scale}, "
            f"shift_factor {shift}), so it is for another latent space; TAESD for SD 1.x / 2.x "
            "has scaling_factor 1.0"
        )


__all__ = [
    "DIFFUSERS_PREFIX",
    "EXPECTED",
    "diffusers_to_original",
    "infer_config",
    "read_taesd_decoder",
    "taesd_state_dict",
]
