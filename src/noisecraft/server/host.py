"""The loaded model of a server: which one, loading it, switching it (on the worker only).

Every model is loaded by :func:`noisecraft.load` with the server's loading options (device,
LoRA and embedding folders, the pixel and image limits). Only the worker thread
(:mod:`noisecraft.server.jobs`) calls :meth:`ModelHost.use`, so a switch happens between
jobs, never during one.
"""

from __future__ import annotations

import gc
import threading

import noisecraft
from noisecraft.api import Pipeline
from noisecraft.server.config import ServerConfig
from noisecraft.server.models import ModelCatalog, ModelEntry


class ModelHost:
    """The current :class:`~noisecraft.api.Pipeline` and the options A1111 keeps with it
    (``CLIP_stop_at_last_layers``)."""

    def __init__(self, config: ServerConfig, catalog: ModelCatalog):
        self.config = config
        self.catalog = catalog
        self.wanted: ModelEntry = catalog.get(config.model)  # refused at start if unknown
        self.entry: ModelEntry | None = None
        self.pipe: Pipeline | None = None
        self.clip_skip: int | None = None  # None: the model's own
        self._lock = threading.Lock()

    @property
    def current_name(self) -> str:
        """The selected model: the one jobs run on (loaded by the next job if need be)."""
        return self.wanted.title

    def select(self, name: str) -> ModelEntry:
        """Check ``name`` and make it the model the next job uses (no load yet)."""
        entry = self.catalog.get(name, "sd_model_checkpoint")
        self.wanted = entry
        return entry

    def use(self, name: str | None = None) -> Pipeline:
        """The pipeline of ``name`` (default: the selected model), loaded if it is not the
        one in memory (the old one is released first). Worker thread only."""
        entry = self.wanted if name is None else self.catalog.get(name, "sd_model_checkpoint")
        with self._lock:
            if self.pipe is None or self.entry != entry:
                self.pipe, self.entry = None, None
                gc.collect()
                c = self.config
                self.pipe = noisecraft.load(
                    entry.target,
                    device=c.device,
                    lora_dir=c.lora_dir,
                    embedding_dir=c.embedding_dir,
                    controlnet_dir=c.controlnet_dir,
                    max_pixels=c.max_pixels,
                    max_images=c.max_images,
                )
                self.entry = entry
            return self.pipe


__all__ = ["ModelHost"]
