"""`noisecraft convert IN OUT --to single-file|diffusers|noisecraft`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def convert_command(
    src: Annotated[Path, typer.Argument(help="a .safetensors / .ckpt file or a diffusers folder")],
    dst: Annotated[Path, typer.Argument(help="the file (or folder, for diffusers) to write")],
    to: Annotated[
        str, typer.Option("--to", help="single-file | diffusers | noisecraft")
    ] = "noisecraft",
    vae: Annotated[
        Path | None, typer.Option("--vae", help="a separate VAE file to put in instead")
    ] = None,
    prediction: Annotated[
        str | None, typer.Option(help="override the detected prediction type: eps | v")
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="override the detected SD family of a single file: sd1 | sd2")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Convert a Stable Diffusion-type model between formats (any direction)."""
    from noisecraft.io.formats.auto import convert, detect_format

    fmt = detect_format(src)
    out = convert(src, dst, to, overwrite=overwrite, vae=vae, prediction=prediction, arch=arch)
    typer.echo(f"converted {src} ({fmt}) -> {out} ({to})")
