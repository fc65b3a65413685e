"""Command-line options shared by several commands (one definition, one help text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

VaeOption = Annotated[
    Path | None, typer.Option("--vae", help="a separate VAE file replacing the model's")
]
PredictionOption = Annotated[
    str | None, typer.Option(help="override the detected prediction type: eps | v")
]
ArchOption = Annotated[
    str | None, typer.Option(help="override the detected SD family of a single file: sd1 | sd2")
]
