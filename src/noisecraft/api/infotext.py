"""An image's A1111 ``parameters`` text, as the API writes it and reads it back.

The format itself (field order, quoting, typed parsing) is
:mod:`noisecraft.pipelines.png_params`; this module maps it to and from the API's settings.
Besides A1111's fields, noisecraft records what changes the pixels but is a loading option:
``Fast mode`` (int8 weights and DeepCache, :func:`noisecraft.load` ``fast=True``),
``Low memory`` (weights stored fp16 / int8) and ``Tiny decoder`` (decoded with a TAESD-like
decoder). :func:`load_options_of` turns them into the loading options that make the image
again, and :func:`check_modes` refuses a replay on a pipeline loaded otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from noisecraft.api.images import open_image
from noisecraft.api.options import LoadOptions
from noisecraft.errors import ConfigError
from noisecraft.pipelines.png_params import parse_parameters, sampler_from_display

#: Infotext fields -> call settings (A1111's names on the left).
SETTINGS = {
    "steps": "steps",
    "cfg_scale": "cfg",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "denoising_strength": "strength",
    "clip_skip": "clip_skip",
    "guidance_rescale": "guidance_rescale",
    "eta": "eta",
}
FAST, LOW_MEMORY, TINY_DECODER = "Fast mode", "Low memory", "Tiny decoder"
LCM_UNET = "LCM U-Net"


def read_infotext(source: str | os.PathLike | Image.Image) -> str:
    """The ``parameters`` text of an infotext string, a PNG file or a PIL image."""
    if isinstance(source, str) and "\n" not in source and Path(source).suffix.lower() == ".png":
        source = Path(source)
    if isinstance(source, str):
        return source
    im = source if isinstance(source, Image.Image) else open_image(source, "source")
    text = getattr(im, "text", {}).get("parameters") or im.info.get("parameters")
    if not text:
        raise ConfigError(
            "the image has no 'parameters' text chunk; give a PNG written by noisecraft "
            "(or AUTOMATIC1111)"
        )
    return text


def read_parameters(source: str | os.PathLike | Image.Image) -> dict[str, Any]:
    """The parsed ``parameters`` of ``source`` (:func:`read_infotext`)."""
    return parse_parameters(read_infotext(source))


def settings_of(params: Mapping[str, Any], latent: bool) -> dict[str, Any]:
    """Call settings from a parsed infotext (prompts only for a text-to-image model)."""
    out: dict[str, Any] = {}
    if latent:
        out["prompt"] = params.get("prompt", "")
        out["negative_prompt"] = params.get("negative_prompt", "")
    if "sampler" in params:
        out["sampler"] = sampler_from_display(
            params["sampler"],
            params.get("schedule_type"),
            version=params.get("version"),
            discard=params.get("discard_penultimate_sigma"),
        )
    out.update({ours: params[theirs] for theirs, ours in SETTINGS.items() if theirs in params})
    extra = params.get("extra", {})
    klass = extra.get("Class")
    if klass is not None:
        try:
            out["class_label"] = int(klass)
        except ValueError:
            raise ConfigError(f"PNG parameters: Class '{klass}' is not an integer") from None
    if TINY_DECODER in extra:
        out["fast_decode"] = True
    return out


def mode_fields(options: LoadOptions, fast_decode: bool, decoder: str | None) -> dict[str, str]:
    """The loading modes an image was made with, as infotext fields."""
    fields = {}
    if options.fast:
        fields[FAST] = "True"
    if options.low_memory is not None:
        fields[LOW_MEMORY] = options.low_memory
    if fast_decode:
        fields[TINY_DECODER] = decoder or "True"
    if options.lcm_unet is not None:
        fields[LCM_UNET] = Path(options.lcm_unet).stem
    return fields


def load_options_of(params: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`noisecraft.load` options that an infotext's modes need (``tiny_decoder``:
    True, the shipped one, when the recorded decoder is a shipped model's)."""
    from noisecraft.api.shipped import SHIPPED_TINY_DECODERS
    from noisecraft.io.shipped import SHIPPED_LCM_UNETS

    extra = params.get("extra", {})
    out: dict[str, Any] = {}
    if extra.get(FAST) == "True":
        out["fast"] = True
    if LOW_MEMORY in extra:
        out["low_memory"] = extra[LOW_MEMORY]
    students = {p.stem: p for p in SHIPPED_LCM_UNETS.values()}
    if extra.get(LCM_UNET) in students:
        out["lcm_unet"] = students[extra[LCM_UNET]]
    shipped = {p.stem for p in SHIPPED_TINY_DECODERS.values()}
    if extra.get(TINY_DECODER) in shipped:
        out["tiny_decoder"] = True
    return out


def check_modes(params: Mapping[str, Any], options: LoadOptions, has_tiny_decoder: bool) -> None:
    """Refuse to replay an image whose loading modes this pipeline does not have (its pixels
    would differ), naming the option to load with."""
    extra = params.get("extra", {})
    if extra.get(FAST) == "True" and not options.fast:
        raise ConfigError(
            "this image was made in fast mode; load the model with @fast to make it again",
            settings=["fast"],
        )
    if LOW_MEMORY in extra and options.low_memory != extra[LOW_MEMORY]:
        raise ConfigError(
            f"this image was made with @low_memory {extra[LOW_MEMORY]}; load the model so "
            "to make it again",
            settings=["low_memory"],
        )
    made_with = extra.get(LCM_UNET)
    has = None if options.lcm_unet is None else Path(options.lcm_unet).stem
    if made_with != has:
        raise ConfigError(
            f"this image was made with the LCM student U-Net {made_with}; load the model with "
            "@lcm_unet to make it again"
            if made_with
            else f"this image was made without the LCM student U-Net {has}; load the model "
            "without @lcm_unet to make it again",
            settings=["lcm_unet"],
        )
    if TINY_DECODER in extra and not has_tiny_decoder:
        raise ConfigError(
            f"this image was decoded by the tiny decoder {extra[TINY_DECODER]}; give "
            "@tiny_decoder FILE to make it again",
            settings=["tiny_decoder"],
        )


__all__ = [
    "check_modes",
    "load_options_of",
    "mode_fields",
    "read_infotext",
    "read_parameters",
    "settings_of",
]
