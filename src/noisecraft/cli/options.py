"""Command-line options shared by several commands (one definition, one help text)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer

#: Python API setting -> how the command line names it, where not ``--`` + the name with
#: dashes (errors name settings; :func:`flag_names` shows them as the user typed them).
FLAGS = {
    "prompt": "a prompt",
    "negative_prompt": "--negative",
    "init_image": "--init",
    "class_label": "--class",
    "width": "--size",
    "height": "--size",
}


def flag_names(settings: Iterable[str]) -> dict[str, str]:
    """The command-line name of each setting (for ``NoisecraftError.render``)."""
    return {s: FLAGS.get(s, "--" + s.replace("_", "-")) for s in settings}


VaeOption = Annotated[
    Path | None, typer.Option("--vae", help="a separate VAE file replacing the model's")
]
PredictionOption = Annotated[
    str | None, typer.Option(help="override the detected prediction type: eps | v")
]
ArchOption = Annotated[
    str | None, typer.Option(help="override the detected SD family of a single file: sd1 | sd2")
]
