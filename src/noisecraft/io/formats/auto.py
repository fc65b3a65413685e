"""Which format a path holds, loading any of them, and converting between them.

Three formats hold a Stable Diffusion-type model (U-Net + VAE + text encoder + tokenizer):

* ``noisecraft``: the native single ``.safetensors`` with a JSON config in its metadata
  (:mod:`noisecraft.io.native`; pixel models are native only);
* ``single-file``: the original CompVis / AUTOMATIC1111 layout, ``.safetensors`` or ``.ckpt``
  (:mod:`.single_file`);
* ``diffusers``: a diffusers pipeline folder (:mod:`.diffusers_folder`).

The format is read off the path itself (a folder, a ``noisecraft`` metadata key, or neither),
never off the name alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from noisecraft.errors import CheckpointError, ConfigError, unknown_name
from noisecraft.io.checkpoint import METADATA_KEY
from noisecraft.io.native import load_native, save_model
from noisecraft.io.safe_read import read_safetensors_metadata
from noisecraft.models.latent_diffusion import LatentDiffusion

FORMATS = ("noisecraft", "single-file", "diffusers")


def detect_format(path: str | os.PathLike) -> str:
    """ "diffusers" for a folder, "noisecraft" for a native file, else "single-file"."""
    path = Path(path)
    if path.is_dir():
        return "diffusers"
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found; give a .safetensors / .ckpt file or a diffusers folder"
        )
    if path.suffix.lower() == ".safetensors":
        meta = read_safetensors_metadata(path)
        if METADATA_KEY in meta:
            return "noisecraft"
    return "single-file"


def load_any(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    vae: str | os.PathLike | None = None,
    prediction: str | None = None,
    arch: str | None = None,
    unet_dtype: torch.dtype = torch.float32,
) -> Any:
    """Load a model from any format: a PixelDiffusion or LatentDiffusion.

    ``vae``: a separate VAE file (LDM or diffusers names) replacing the model's own;
    ``prediction``: override the detected parametrisation ("eps" or "v");
    ``arch``: override the detected SD family of a single file ("sd1" / "sd2"; native files
    and diffusers folders state their configs, so it is refused there).
    """
    fmt = detect_format(path)
    if arch is not None and fmt != "single-file":
        raise ConfigError(
            f"@arch applies to SD single files; {path} is a {fmt} model whose config is stored",
            settings=["arch"],
        )
    if fmt == "noisecraft":
        model: Any = load_native(path, device=device, unet_dtype=unet_dtype)
        if vae is not None:
            if not isinstance(model, LatentDiffusion):
                raise ConfigError(f"{path} is a pixel-space model; it has no VAE to replace")
            from noisecraft.io.formats.single_file import load_vae_file

            model = model.replace(vae=load_vae_file(vae, device=device))
        if prediction is not None:
            model = model.replace(prediction=prediction)
        return model
    if fmt == "diffusers":
        from noisecraft.io.controlnet_files import controlnet_folder
        from noisecraft.io.formats.diffusers_folder import load_diffusers_folder

        if Path(path, "config.json").is_file() and controlnet_folder(path) == Path(path):
            raise CheckpointError(f"{path} is a ControlNet, not a model; load it as a ControlNet")

        model = load_diffusers_folder(
            path, prediction=prediction, device=device, unet_dtype=unet_dtype
        )
        if vae is not None:
            from noisecraft.io.formats.single_file import load_vae_file

            model = model.replace(vae=load_vae_file(vae, device=device))
        return model
    from noisecraft.io.formats.single_file import load_single_file

    return load_single_file(
        path, prediction=prediction, vae=vae, device=device, family=arch, unet_dtype=unet_dtype
    )


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    overwrite: bool = False,
    vae: str | os.PathLike | None = None,
    prediction: str | None = None,
    arch: str | None = None,
) -> Path:
    """Read ``src`` in any format and write it to ``dst`` in format ``to`` (see FORMATS).

    A ControlNet (:func:`noisecraft.io.controlnet_files.is_controlnet`) converts between its
    own two formats, single-file and diffusers (:func:`.controlnet_files.convert_controlnet`).
    """
    if to not in FORMATS:
        raise unknown_name("format", to, FORMATS)
    from noisecraft.io.atomic import check_writable
    from noisecraft.io.controlnet_files import convert_controlnet, is_controlnet
    from noisecraft.io.write_errors import writing

    if is_controlnet(src):
        given = [
            name for name, v in (("vae", vae), ("prediction", prediction), ("arch", arch)) if v
        ]
        if given:
            raise ConfigError(
                f"@{given[0]} applies to Stable Diffusion models; {src} is a ControlNet",
                settings=given[:1],
            )
        return convert_controlnet(src, dst, to, overwrite=overwrite)

    dst = Path(dst)
    check_writable(dst, overwrite=overwrite, folder=to == "diffusers")  # before the slow load
    model = load_any(src, vae=vae, prediction=prediction, arch=arch)
    if not isinstance(model, LatentDiffusion):
        raise ConfigError(
            f"{src} is a pixel-space noisecraft model; only latent (Stable Diffusion-type) "
            "models convert to other formats"
        )
    if to == "noisecraft":
        # one OutputError line for a full or read-only disk (save_checkpoint itself leaves
        # the OS error to its callers: the trainer words its own, naming the kept checkpoint)
        with writing(dst):
            save_model(model, dst, overwrite=overwrite)
    elif to == "single-file":
        from noisecraft.io.formats.single_file import save_single_file

        save_single_file(model, dst, overwrite=overwrite)
    else:
        from noisecraft.io.formats.diffusers_folder import save_diffusers_folder

        save_diffusers_folder(model, dst, overwrite=overwrite)
    return dst


__all__ = ["FORMATS", "convert", "detect_format", "load_any"]
