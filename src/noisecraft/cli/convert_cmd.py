"""`noisecraft convert IN OUT --to single-file|diffusers|noisecraft` (ControlNets: single-file |
diffusers)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from noisecraft.cli.options import ArchOption, PredictionOption, VaeOption


def convert_command(
    src: Annotated[
        Path, typer.Argument(help="a .safetensors / .ckpt / .pth file or a diffusers folder")
    ],
    dst: Annotated[Path, typer.Argument(help="the file (or folder, for diffusers) to write")],
    to: Annotated[
        str, typer.Option("--to", help="single-file | diffusers | noisecraft")
    ] = "noisecraft",
    vae: VaeOption = None,
    prediction: PredictionOption = None,
    arch: ArchOption = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Convert a Stable Diffusion-type model (any direction) or a ControlNet (single-file <->
    diffusers) between formats."""
    from noisecraft.io.formats.auto import convert, detect_format

    fmt = detect_format(src)
    out = convert(src, dst, to, overwrite=overwrite, vae=vae, prediction=prediction, arch=arch)
    typer.echo(f"converted {src} ({fmt}) -> {out} ({to})")
