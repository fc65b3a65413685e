"""ControlNet files: read any SD 1.x / 2.x ControlNet into a
:class:`~noisecraft.models.controlnet.ControlNet`, write one, convert between formats.

Two formats (the layouts and the config inference: :mod:`.formats.controlnet_layout`; the
names: :mod:`.formats.keys.controlnet`):

* ``single-file``: an original ``.safetensors`` / ``.pth`` / ``.ckpt`` (cldm names, full
  ``control_model.*`` or pruned), read through :mod:`.safe_read` (pickles with
  ``torch.load(weights_only=True)`` only); written as ``.safetensors`` in the full layout
  (``control_model.*``, what lllyasviel's ControlNet-v1-1 files hold and what both
  AUTOMATIC1111's ControlNet extension and diffusers' ``ControlNetModel.from_single_file``
  read), with our exact config in the metadata;
* ``diffusers``: a ``ControlNetModel`` folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``, or ``.bin``, or a variant); a pipeline folder with
  a ``controlnet/`` sub-folder is read from there.

Renaming never touches a tensor: ours -> diffusers -> ours is bit-exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from noisecraft.errors import CheckpointError, ConfigError, unknown_name
from noisecraft.io.atomic import atomic_folder, atomic_path, check_writable
from noisecraft.io.build import build_module
from noisecraft.io.formats.controlnet_layout import (
    META_KEY,
    check_fits,
    config_from_meta,
    infer_controlnet_config,
    is_controlnet_keys,
    split_controlnet,
)
from noisecraft.io.formats.diffusers_configs.controlnet import (
    CLASS_NAME,
    controlnet_config_from_diffusers,
    controlnet_config_to_diffusers,
)
from noisecraft.io.formats.diffusers_files import (
    DIFFUSERS_VERSION,
    MODEL_STEMS,
    read_json,
    read_weights,
    write_json,
)
from noisecraft.io.formats.keys.controlnet import PREFIX, diffusers_table
from noisecraft.io.safe_read import check_safetensors_header, read_checkpoint, sniff_format
from noisecraft.io.write_errors import writing
from noisecraft.key_rules import to_ours, to_theirs
from noisecraft.models.controlnet import ControlNet, ControlNetConfig
from noisecraft.models.unet import UNetConfig

__all__ = [
    "CONTROLNET_FORMATS",
    "controlnet_folder",
    "convert_controlnet",
    "is_controlnet",
    "load_controlnet",
    "save_controlnet",
]

#: The formats a ControlNet is written in.
CONTROLNET_FORMATS = ("single-file", "diffusers")


def controlnet_folder(path: str | os.PathLike) -> Path | None:
    """The ``ControlNetModel`` folder at ``path`` (itself, or its ``controlnet/``), or None."""
    path = Path(path)
    for folder in (path, path / "controlnet"):
        config = folder / "config.json"
        if config.is_file():
            try:
                doc = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(doc, dict) and doc.get("_class_name") == CLASS_NAME:
                return folder
    return None


def is_controlnet(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ControlNet: a ``ControlNetModel`` folder, or a file whose
    tensor names are a ControlNet's (a ``.safetensors`` header is read, not its tensors)."""
    path = Path(path)
    if path.is_dir():
        return controlnet_folder(path) is not None
    if not path.is_file():
        return False
    if sniff_format(path) == "safetensors":
        keys = list(check_safetensors_header(path)[0])
    else:
        keys = list(read_checkpoint(path)[0])
    return is_controlnet_keys(keys)


def load_controlnet(
    path: str | os.PathLike,
    base_unet_config: UNetConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    variant: str | None = None,
) -> ControlNet:
    """Read a ControlNet (module docstring) from a single file or a diffusers folder.

    ``base_unet_config``: the config of the U-Net the ControlNet will drive; a ControlNet
    for another base (SD 2.x on SD 1.x, other channels) is refused in one line, and heads the
    shapes cannot show are taken from it. ``dtype``: floating weights are cast to it (None
    keeps the stored dtype); ``variant``: a diffusers weights variant (e.g. "fp16").
    The model is returned in eval mode without gradients.
    """
    path = Path(path)
    source = str(path)
    if path.is_dir():
        folder = controlnet_folder(path)
        if folder is None:
            raise CheckpointError(
                f"{path} is not a diffusers ControlNetModel folder (no config.json with "
                f"_class_name {CLASS_NAME}, here or in controlnet/)"
            )
        config = controlnet_config_from_diffusers(
            read_json(folder / "config.json"), source=folder / "config.json"
        )
        _, theirs = read_weights(folder, variant, MODEL_STEMS)
        mapped = to_ours(diffusers_table(config), theirs)
        if mapped.unmapped:
            raise CheckpointError(
                f"{folder}: unexpected ControlNet weight '{mapped.unmapped[0]}' for its config.json"
            )
        tensors = mapped.tensors
    else:
        raw, metadata = read_checkpoint(path)
        tensors = split_controlnet(raw, source).tensors
        config = config_from_meta(metadata, source) or infer_controlnet_config(
            tensors, base_unet_config, source
        )
    if base_unet_config is not None:
        check_fits(config, base_unet_config, source)
    try:
        return build_module(
            lambda: ControlNet(config),
            tensors,
            what="ControlNet",
            source=source,
            dtype=dtype,
            device=device,
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: cannot build the ControlNet ({e})") from None


def _cpu(tensors: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    return {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        .detach()
        .cpu()
        .contiguous()
        for k, v in tensors.items()
    }


def save_controlnet(
    controlnet: ControlNet,
    path: str | os.PathLike,
    *,
    format: str = "single-file",
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``controlnet`` atomically as an original single file (``.safetensors``, full
    ``control_model.*`` layout, our config in the metadata) or a diffusers ``ControlNetModel``
    folder (``format="diffusers"``). ``dtype`` casts floating tensors (None: as held). An
    existing output is replaced only with ``overwrite``."""
    if format not in CONTROLNET_FORMATS:
        raise unknown_name("format", format, CONTROLNET_FORMATS)
    path = Path(path)
    config: ControlNetConfig = controlnet.controlnet_config
    state = controlnet.state_dict()
    if format == "single-file":
        if path.suffix.lower() != ".safetensors":
            raise ConfigError(
                f"{path}: ControlNet single files are written as .safetensors (pickled .pth "
                "files can run code when loaded); use a .safetensors name"
            )
        check_writable(path, overwrite=overwrite)
        tensors = _cpu({PREFIX + k: v for k, v in state.items()}, dtype)
        meta = {META_KEY: json.dumps({"config": config.to_dict()}, sort_keys=True)}
        with writing(path), atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path
    check_writable(path, overwrite=overwrite, folder=True)
    mapped = to_theirs(diffusers_table(config), state)
    if mapped.unmapped:
        raise ConfigError(f"the ControlNet tensor {mapped.unmapped[0]} has no diffusers name")
    doc = {**controlnet_config_to_diffusers(config), "_diffusers_version": DIFFUSERS_VERSION}
    tensors = _cpu(mapped.tensors, dtype)
    with writing(path), atomic_folder(path) as tmp:
        write_json(tmp / "config.json", doc)
        save_file(
            tensors, str(tmp / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"}
        )
    return path


def convert_controlnet(
    src: str | os.PathLike, dst: str | os.PathLike, to: str, *, overwrite: bool = False
) -> Path:
    """Read the ControlNet at ``src`` (any format) and write it to ``dst`` in format ``to``
    (:data:`CONTROLNET_FORMATS`), tensors in their stored dtype: bit-exact both ways."""
    if to not in CONTROLNET_FORMATS:
        raise ConfigError(
            f"{src} is a ControlNet; convert it with @to single-file or diffusers (not {to!r})",
            settings=["to"],
        )
    check_writable(dst, overwrite=overwrite, folder=to == "diffusers")
    model = load_controlnet(src, dtype=None)
    return save_controlnet(model, dst, format=to, overwrite=overwrite)
