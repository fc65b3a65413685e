"""The ControlNet extension's request format (``alwayson_scripts.controlnet.args``) as the
engine's :class:`~noisecraft.api.controls.Control` units.

A unit is the JSON of sd-webui-controlnet (and of ``webuiapi.ControlNetUnit.to_dict()``):
``image`` (or ``input_image``: base64), ``module``, ``model`` (``"name [hash]"``),
``weight``, ``resize_mode``, ``guidance_start`` / ``guidance_end``, ``control_mode``,
``enabled``. Models come by NAME only, from the shipped ControlNets and the server's
``controlnet_dir`` (a path is refused); ``processor_res``, ``threshold_a`` / ``_b``,
``pixel_perfect``, ``low_vram`` and ``hr_option`` are ignored (the engine's canny uses its
fixed thresholds); a unit ``mask`` and "My prompt is more important" are refused.
"""

from __future__ import annotations

import math
import re
from typing import Any

from noisecraft.api.controls import Control, PipelineControlNets
from noisecraft.errors import ConfigError
from noisecraft.server.config import ServerConfig
from noisecraft.server.images import decode_image

__all__ = ["MODULES", "RESIZE_MODES", "controls_of"]

#: the extension's module names -> the engine's preprocessors
MODULES = {"none": "none", "canny": "canny", "threshold": "threshold", "scribble": "scribble"}
#: the extension's resize modes (names or their indices) -> the engine's
RESIZE_MODES = {
    "just resize": "resize",
    "crop and resize": "crop",
    "resize and fill": "fill",
    0: "resize",
    1: "crop",
    2: "fill",
}
#: control_mode -> guess mode (None: refused)
CONTROL_MODES = {
    "balanced": False,
    0: False,
    "controlnet is more important": True,
    2: True,
    "my prompt is more important": None,
    1: None,
}


def _refuse(i: int, message: str) -> ConfigError:
    return ConfigError(f"alwayson_scripts.controlnet.args[{i}]: {message}")


def _number(i: int, unit: dict, name: str, default: float) -> float:
    value = unit.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _refuse(i, f"{name} must be a number, got {value!r}")
    return float(value)


def _key(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _model(i: int, value: Any, available: dict[str, Any]) -> Any:
    if not isinstance(value, str) or not value.strip() or value.strip() == "None":
        raise _refuse(i, f"model must name a ControlNet ({', '.join(available) or 'none here'})")
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", value.strip())  # "name [hash]" -> name
    if name not in available:
        raise _refuse(
            i,
            f"no ControlNet named {name!r} (names, not paths; available: "
            f"{', '.join(sorted(available)) or 'none'})",
        )
    return available[name]


def controls_of(units: list[Any], config: ServerConfig) -> list[Control]:
    """The engine's units of the extension's ``units`` (enabled ones), or a one-line 422."""
    available = PipelineControlNets(config.controlnet_dir).available()
    out = []
    for i, unit in enumerate(units):
        if not isinstance(unit, dict):
            raise _refuse(i, f"a unit is a JSON object, got {type(unit).__name__}")
        if unit.get("mask") not in (None, ""):
            raise _refuse(i, "a unit mask is not supported; send mask null")
        module = MODULES.get(_key(unit.get("module", "none")))
        if module is None:
            raise _refuse(
                i,
                f"module {unit.get('module')!r} is not available; use one of {', '.join(MODULES)}",
            )
        resize = RESIZE_MODES.get(_key(unit.get("resize_mode", "Crop and Resize")))
        if resize is None:
            raise _refuse(i, f"resize_mode {unit.get('resize_mode')!r} is not one of A1111's three")
        guess = CONTROL_MODES.get(_key(unit.get("control_mode", "Balanced")), "unknown")
        if guess is None or guess == "unknown":
            raise _refuse(
                i,
                f"control_mode {unit.get('control_mode')!r} is not supported; use Balanced or "
                "ControlNet is more important",
            )
        image = unit.get("image") or unit.get("input_image")
        if not isinstance(image, str) or not image:
            raise _refuse(i, "image is missing: send the control image as base64")
        picture = decode_image(
            image,
            f"alwayson_scripts.controlnet.args[{i}].image",
            max_bytes=config.max_image_bytes,
            max_pixels=config.max_pixels,
        )
        out.append(
            Control(
                model=_model(i, unit.get("model"), available),
                image=picture.convert("RGB"),
                weight=_number(i, unit, "weight", 1.0),
                start=_number(i, unit, "guidance_start", 0.0),
                end=_number(i, unit, "guidance_end", 1.0),
                preprocess=module,
                resize=resize,
                guess_mode=bool(guess),
            )
        )
    return out
