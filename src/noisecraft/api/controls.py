"""ControlNet units of a pipeline call: ``pipe(prompt, control=[Control(...)])``.

A :class:`Control` says which ControlNet, which control image and how (AUTOMATIC1111's
ControlNet extension's unit): ``weight`` (its residuals' scale), ``start`` / ``end`` (the
fraction of the steps it acts in, diffusers' ``control_guidance_start`` / ``_end``),
``preprocess`` (``none`` / ``canny`` / ``scribble`` / ``threshold``,
:mod:`noisecraft.pipelines.control_preprocess`), ``resize`` (``crop`` / ``resize`` /
``fill``: the extension's "Crop and Resize" / "Just Resize" / "Resize and Fill" of the
control image against the output size) and ``guess_mode`` (the extension's "ControlNet is
more important": the ControlNet acts on the conditional half of guidance only).

``model`` is a loaded :class:`~noisecraft.models.controlnet.ControlNet`, a ControlNet file or
diffusers folder, or the name of one in the pipeline's ``controlnet_dir`` (a file's stem or a
folder's name, as A1111's model list names them). :class:`PipelineControlNets` loads each
file once per pipeline.

Each unit is written into the image's infotext as the extension writes it
(:func:`format_unit`), e.g. ``ControlNet 0: "Module: canny, Model: control_sd15_canny
[fef5e48e], Weight: 1.0, Resize Mode: Crop and Resize, Low Vram: False, Guidance Start: 0.0,
Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"``; the hash is A1111's
legacy model hash (:func:`noisecraft.io.file_hash.legacy_model_hash`). :func:`units_of` reads
such fields back for :meth:`Pipeline.replay`, which needs the control images again.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from noisecraft.api.images import ImageLike, image_tensor, to_pil
from noisecraft.errors import ConfigError, unknown_name
from noisecraft.io.file_hash import legacy_model_hash
from noisecraft.io.shipped import SHIPPED_CONTROLNET_DIR
from noisecraft.pipelines.control import ControlInput
from noisecraft.pipelines.control_preprocess import (
    PREPROCESSORS,
    RESIZE_MODES,
    check_preprocess,
    check_resize,
    make_hint,
)

#: File suffixes of ControlNet files in a ``controlnet_dir`` (A1111's list).
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".bin", ".pt")
#: Infotext label of unit ``i`` (the extension's ``Infotext.unit_prefix``).
UNIT_PREFIX = "ControlNet "
#: The extension's ``Control Mode`` names: guess mode off / on.
BALANCED, CONTROL_FIRST = "Balanced", "ControlNet is more important"
PROMPT_FIRST = "My prompt is more important"
#: Older ``Resize Mode`` spellings the extension still reads.
_RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Envelope (Outer Fit)": "Resize and Fill",
}
_RE_MODEL = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]+)\]$")


@dataclass(frozen=True)
class Control:
    """One ControlNet unit of a call (module docstring). ``image``: a PIL image, an image
    file, an (H, W[, C]) 8-bit array or a (C, H, W) / (1, C, H, W) tensor in [-1, 1]."""

    model: Any
    image: ImageLike
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str = "none"
    resize: str = "crop"
    guess_mode: bool = False

    def __post_init__(self) -> None:
        check_preprocess(self.preprocess)
        check_resize(self.resize)
        for name in ("weight", "start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(
                    f"control {name} must be a number, got {value!r}", settings=["control"]
                )
            if not math.isfinite(value):
                raise ConfigError(f"control {name} must be finite, got {value}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ConfigError(
                "control start and end are fractions of the steps with 0 <= start < end <= 1, "
                f"got start {self.start}, end {self.end}",
                settings=["control"],
            )
        if not isinstance(self.guess_mode, bool):
            raise ConfigError(f"guess_mode must be True or False, got {self.guess_mode!r}")


@dataclass(frozen=True)
class UsedControl:
    """A unit as it ran: what the infotext records and the hint it used (8-bit RGB)."""

    preprocess: str
    model: str  # "NAME [HASH]" (no hash for a ControlNet given as a loaded model)
    weight: float
    resize: str
    start: float
    end: float
    guess_mode: bool
    hint: Image.Image = field(repr=False, compare=False)


def as_controls(control: Control | Sequence[Control] | None) -> list[Control]:
    """``control`` as a list of :class:`Control` (one-line error for anything else)."""
    if control is None:
        return []
    units = [control] if isinstance(control, Control) else control
    if isinstance(units, (str, bytes)) or not isinstance(units, Sequence):
        raise ConfigError(
            f"@control must be a Control or a list of them, got {type(control).__name__}",
            settings=["control"],
        )
    for unit in units:
        if not isinstance(unit, Control):
            raise ConfigError(
                f"@control must be Control units (noisecraft.Control), got {type(unit).__name__}",
                settings=["control"],
            )
    return list(units)


def _clean(name: str) -> str:
    """A name the infotext can hold (the extension refuses ``,`` and ``:``)."""
    return name.replace(",", "").replace(":", "").strip() or "controlnet"


class PipelineControlNets:
    """The ControlNets of one pipeline: files loaded once (by path, size and time), names
    found in ``controlnet_dir``, and the names of loaded ones seen in earlier calls."""

    def __init__(self, controlnet_dir: str | os.PathLike | None = None, model: Any = None):
        self.controlnet_dir = None if controlnet_dir is None else Path(controlnet_dir)
        self.model = model  # the LatentDiffusion the ControlNets drive (device, dtype, base)
        self._files: dict[tuple[str, int, int], tuple[Any, str]] = {}
        self._given: dict[str, Any] = {}  # name -> a loaded ControlNet passed in a call

    def available(self) -> dict[str, Path]:
        """ControlNet files and diffusers folders by name: the shipped ones
        (:data:`SHIPPED_CONTROLNET_DIR`, e.g. ``mnist_canny``), then ``controlnet_dir``'s,
        which win."""
        return {**_scan(SHIPPED_CONTROLNET_DIR), **_scan(self.controlnet_dir)}

    def find(self, name: str) -> Any:
        """A path or loaded ControlNet for a name (a file / folder, or one of the folder's)."""
        if name in self._given:
            return self._given[name]
        path = Path(name)
        if path.exists():
            return path
        files = self.available()
        if name in files:
            return files[name]
        if self.controlnet_dir is None:
            raise ConfigError(
                f"ControlNet {name} is not a file or folder; give its path, or set "
                "@controlnet_dir to the folder that holds it",
                settings=["controlnet_dir"],
            )
        raise unknown_name("ControlNet", name, files or ["(none in the folder)"])

    def resolve(self, model: Any) -> tuple[Any, str]:
        """(loaded ControlNet, infotext ``Model`` value) of a unit's ``model``, loaded on the
        pipeline model's device (one for another base is refused)."""
        if isinstance(model, (str, os.PathLike)):
            model = self.find(os.fspath(model))
        if not isinstance(model, (str, os.PathLike)):
            if not callable(model) or not hasattr(model, "skip_channels"):
                raise ConfigError(
                    f"control model must be a ControlNet, a file, a folder or a name, got "
                    f"{type(model).__name__}",
                    settings=["control"],
                )
            name = _clean(str(getattr(model, "name", None) or "controlnet"))
            self._given[name] = model
            return model, name
        path = Path(model)
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key not in self._files:
            from noisecraft.io.controlnet_files import load_controlnet

            unet, device = self.model.unet, torch.device(self.model.device)
            # the U-Net's dtype on a GPU; fp32 on the CPU (low-memory weights are stored
            # fp16 / int8 there but run in fp32)
            dtype = next(unet.parameters()).dtype if device.type != "cpu" else torch.float32
            net = load_controlnet(path, unet.config, device=device, dtype=dtype)
            name = _clean(path.stem if path.is_file() else path.name)
            digest = legacy_model_hash(_weights_file(path))
            self._files[key] = (net, f"{name} [{digest}]" if digest else name)
        return self._files[key]


def _scan(folder: Path | None) -> dict[str, Path]:
    """ControlNet files and diffusers folders under ``folder`` by name (first found wins)."""
    found: dict[str, Path] = {}
    if folder is None or not folder.is_dir():
        return found
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in CONTROLNET_SUFFIXES:
            if p.name.startswith("diffusion_pytorch_model"):
                continue  # inside a diffusers folder, found as the folder
            found.setdefault(p.stem, p)
        elif p.is_dir() and (p / "config.json").is_file():
            found.setdefault(p.name, p)
    return found


def _weights_file(path: Path) -> Path | None:
    """The file whose hash names a ControlNet (a diffusers folder's weights file)."""
    if path.is_file():
        return path
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    return None


def prepare_controls(
    units: Sequence[Control],
    nets: PipelineControlNets,
    height: int,
    width: int,
) -> tuple[tuple[ControlInput, ...], list[UsedControl]]:
    """The request's :class:`ControlInput` units and what each records, for images of
    ``height`` x ``width``: models loaded, images preprocessed and fitted."""
    inputs, used = [], []
    for i, unit in enumerate(units):
        net, name = nets.resolve(unit.model)
        image = image_tensor(unit.image, 3, setting="control")
        if image.shape[0] != 1:
            raise ConfigError(
                f"control {i}: give one control image per unit, got a batch of {image.shape[0]}",
                settings=["control"],
            )
        image = ((image + 1.0) / 2.0).clamp(0, 1)
        hint = make_hint(image, height, width, preprocess_name=unit.preprocess, resize=unit.resize)
        inputs.append(
            ControlInput(
                net, hint, float(unit.weight), float(unit.start), float(unit.end), unit.guess_mode
            )
        )
        used.append(
            UsedControl(
                unit.preprocess,
                name,
                float(unit.weight),
                unit.resize,
                float(unit.start),
                float(unit.end),
                unit.guess_mode,
                to_pil(hint[0] * 2.0 - 1.0),
            )
        )
    return tuple(inputs), used


# ---------------------------------------------------------------------------- infotext
def format_unit(unit: UsedControl) -> str:
    """One unit's infotext value in the extension's layout (module docstring)."""
    fields = {
        "Module": unit.preprocess,
        "Model": unit.model,
        "Weight": unit.weight,
        "Resize Mode": RESIZE_MODES[unit.resize],
        "Low Vram": False,
        "Guidance Start": unit.start,
        "Guidance End": unit.end,
        "Pixel Perfect": False,
        "Control Mode": CONTROL_FIRST if unit.guess_mode else BALANCED,
    }
    return ", ".join(f"{k}: {v}" for k, v in fields.items())


def control_fields(used: Sequence[UsedControl]) -> dict[str, str]:
    """``{"ControlNet 0": ..., ...}`` for the infotext."""
    return {f"{UNIT_PREFIX}{i}": format_unit(u) for i, u in enumerate(used)}


def parse_unit(label: str, text: str) -> dict[str, Any]:
    """The settings of one infotext unit: ``model`` (the name), ``hash`` (or None),
    ``preprocess``, ``weight``, ``resize``, ``start``, ``end``, ``guess_mode``."""
    raw: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition(": ")
        if sep:
            raw[key.strip()] = value.strip()
    bad = f"PNG parameters: {label} '{text}'"
    module = raw.get("Module", "none")
    if module not in PREPROCESSORS:
        known = ", ".join(PREPROCESSORS)
        raise ConfigError(f"{bad} uses the preprocessor {module}; noisecraft has {known}")
    model = raw.get("Model", "")
    if not model or model == "None":
        raise ConfigError(f"{bad} names no model")
    m = _RE_MODEL.match(model)
    name, digest = (m[1], m[2].lower()) if m else (model, None)
    resize_label = _RESIZE_ALIASES.get(raw.get("Resize Mode", ""), raw.get("Resize Mode"))
    modes = {v: k for k, v in RESIZE_MODES.items()}
    if resize_label is not None and resize_label not in modes:
        raise ConfigError(f"{bad}: unknown Resize Mode {resize_label}")
    mode = raw.get("Control Mode", BALANCED)
    if mode not in (BALANCED, CONTROL_FIRST):
        raise ConfigError(
            f"{bad}: Control Mode {mode} is not supported; noisecraft has {BALANCED} and "
            f"{CONTROL_FIRST} (guess mode)"
        )
    try:
        numbers = {
            k: float(raw.get(label_, default))
            for k, label_, default in (
                ("weight", "Weight", "1.0"),
                ("start", "Guidance Start", "0.0"),
                ("end", "Guidance End", "1.0"),
            )
        }
    except ValueError:
        raise ConfigError(
            f"{bad}: Weight / Guidance Start / Guidance End must be numbers"
        ) from None
    return {
        "model": name,
        "hash": digest,
        "preprocess": module,
        "resize": "crop" if resize_label is None else modes[resize_label],
        "guess_mode": mode == CONTROL_FIRST,
        **numbers,
    }


def units_of(extra: Mapping[str, str]) -> list[dict[str, Any]]:
    """The ControlNet units of an infotext's extra fields, in unit order."""
    found = {}
    for key, value in extra.items():
        if key.startswith(UNIT_PREFIX) and key[len(UNIT_PREFIX) :].isdigit():
            found[int(key[len(UNIT_PREFIX) :])] = parse_unit(key, value)
    return [found[i] for i in sorted(found)]


def replay_controls(
    units: Sequence[Mapping[str, Any]],
    images: ImageLike | Sequence[ImageLike] | None,
    nets: PipelineControlNets,
) -> list[Control]:
    """The :class:`Control` units that make a recorded image again: each recorded model
    found (by name; its hash checked), with the control ``images`` given again (one for
    every unit, or one per unit)."""
    if images is None:
        first = units[0]
        raise ConfigError(
            f"this image was made with ControlNet 0 ({first['preprocess']}, {first['model']}); "
            "give its control image again (@control_images)",
            settings=["control_images"],
        )
    if isinstance(images, (str, os.PathLike, Image.Image, Tensor)) or not isinstance(
        images, Sequence
    ):
        images = [images]
    images = list(images)
    if len(images) == 1:
        images = images * len(units)
    if len(images) != len(units):
        raise ConfigError(
            f"this image was made with {len(units)} ControlNet units; give one control image "
            f"for all, or one per unit, got {len(images)}",
            settings=["control_images"],
        )
    out = []
    for i, (unit, image) in enumerate(zip(units, images, strict=True)):
        _, recorded = nets.resolve(unit["model"])
        m = _RE_MODEL.match(recorded)
        if unit["hash"] and m and m[2].lower() != unit["hash"]:
            raise ConfigError(
                f"ControlNet {i}: {unit['model']} has hash {m[2]}, the image was made with "
                f"{unit['hash']}; give the same file",
                settings=["controlnet_dir"],
            )
        out.append(
            Control(
                unit["model"],
                image,
                weight=unit["weight"],
                start=unit["start"],
                end=unit["end"],
                preprocess=unit["preprocess"],
                resize=unit["resize"],
                guess_mode=unit["guess_mode"],
            )
        )
    return out


__all__ = [
    "Control",
    "PipelineControlNets",
    "UsedControl",
    "as_controls",
    "control_fields",
    "format_unit",
    "parse_unit",
    "prepare_controls",
    "replay_controls",
    "units_of",
]
