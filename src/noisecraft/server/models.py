"""The models a server offers, by name, and the one it has loaded.

Names, never paths, come from requests: the shipped models
(:data:`~noisecraft.api.shipped.SHIPPED_MODELS`) and what the configured models folder holds
(checkpoint files ``*.safetensors`` / ``*.ckpt`` and diffusers folders with a
``model_index.json``, named by their path inside the folder without the suffix). A name that
is not in this list (``../x``, ``/etc/passwd``) is an unknown name; nothing else is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from noisecraft.api.shipped import SHIPPED_MODELS
from noisecraft.errors import unknown_name

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelEntry:
    """One model offered: ``name`` (what requests use), ``target`` (what
    :func:`noisecraft.load` is given: the shipped name or the file / folder), and ``filename``
    (the name shown to clients: shipped name or the path inside the models folder)."""

    name: str
    target: str | Path
    filename: str

    @property
    def title(self) -> str:
        """A1111's ``title`` (``sd_model_checkpoint``); ours carries no hash."""
        return self.name


def scan_models_dir(folder: Path | None) -> dict[str, ModelEntry]:
    """The checkpoint files and diffusers folders under ``folder``, by name."""
    found: dict[str, ModelEntry] = {}
    if folder is None or not folder.is_dir():
        return found
    root = folder.resolve()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
            if any((p / "model_index.json").is_file() for p in path.parents if p != root):
                continue  # a component of a diffusers folder
            name = rel.with_suffix("").as_posix()
        elif path.is_dir() and (path / "model_index.json").is_file():
            name = rel.as_posix()
        else:
            continue
        found.setdefault(name, ModelEntry(name, path, rel.as_posix()))
    return found


class ModelCatalog:
    """The models offered (module docstring); :meth:`refresh` re-reads the models folder."""

    def __init__(self, models_dir: Path | None = None):
        self.models_dir = models_dir
        self._entries: dict[str, ModelEntry] = {}
        self.refresh()

    def refresh(self) -> None:
        shipped = {
            name: ModelEntry(name, name, name)
            for name, path in SHIPPED_MODELS.items()
            if path.is_file()
        }
        found = scan_models_dir(self.models_dir)
        self._entries = {**shipped, **{k: v for k, v in found.items() if k not in shipped}}

    @property
    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get(self, name: str, setting: str = "model") -> ModelEntry:
        """The model called ``name`` (its name, A1111 title or file name), else a one-line
        unknown-name error naming ``setting``."""
        if name in self._entries:
            return self._entries[name]
        for entry in self._entries.values():
            if name in (entry.title, entry.filename):
                return entry
        raise unknown_name("model", name, self._entries, setting=setting)


__all__ = ["CHECKPOINT_SUFFIXES", "ModelCatalog", "ModelEntry", "scan_models_dir"]
