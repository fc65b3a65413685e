"""What ``pipe(..., observe=Observer(...))`` returns besides the images (``result.observed``).

>>> from noisecraft.api import Observer
>>> result = pipe("a handwritten 7", observe=Observer(attention=True))   # doctest: +SKIP
>>> maps = result.observed.attention[0]                                  # doctest: +SKIP
>>> maps.tokens, maps.maps.shape        # ['a', 'handwritten', '7'], (3, h, w)  # doctest: +SKIP
>>> maps.overlays[2].save("7.png"); maps.grid.save("grid.png")          # doctest: +SKIP

The recording itself is :mod:`noisecraft.pipelines.observe` (DAAM, Tang et al. 2023); the
pictures, :mod:`noisecraft.viz.attention_maps`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from noisecraft.api.observed_latents import LatentSteps, latent_steps
from noisecraft.errors import ConfigError
from noisecraft.io.atomic import atomic_path, check_writable
from noisecraft.io.write_errors import writing
from noisecraft.models.prompt_tokens import PromptWord
from noisecraft.pipelines.observe import Observation, Observer, word_maps
from noisecraft.viz.attention_maps import overlay, token_grid

__all__ = ["AttentionMaps", "Observed", "attention_maps", "observed_of", "start_observation"]


@dataclass(frozen=True)
class AttentionMaps:
    """One image's cross-attention map per prompt word.

    * ``tokens``: the prompt's words (BPE pieces joined; start, end, padding left out);
    * ``weights``: each word's emphasis weight (``(word:1.2)`` -> 1.2);
    * ``maps``: float32 (n_tokens, h, w) at the latents' size, each in [0, 1];
    * ``overlays``: one RGB heat-map overlay per token at the image's size;
    * ``grid``: the image and the overlays with each token written below.
    """

    tokens: list[str]
    weights: list[float]
    maps: np.ndarray
    overlays: list[Image.Image] = field(repr=False)
    grid: Image.Image = field(repr=False)

    def file_names(self) -> list[str]:
        """``00_a.png``, ``01_red.png``, ... (index and token; characters other than
        letters, digits, ``-`` and ``_`` become ``_``), then ``grid.png``."""
        safe = [re.sub(r"[^\w-]+", "_", t) or "_" for t in self.tokens]
        names = [f"{k:02d}_{t}.png" for k, t in enumerate(safe)]
        return [*names, "grid.png"]

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
        """Write one overlay PNG per token and the grid into ``folder`` (created); every
        path is checked before the first is written."""
        paths = [Path(folder) / name for name in self.file_names()]
        for path in paths:
            check_writable(path, overwrite=overwrite)
        for image, path in zip([*self.overlays, self.grid], paths, strict=True):
            with writing(path), atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
        return paths


@dataclass(frozen=True)
class Observed:
    """Everything observed in one call; ``attention``: per image, :class:`AttentionMaps`
    (None where no step was observed, e.g. a step range past the last step); ``latents``:
    per image, :class:`~noisecraft.api.observed_latents.LatentSteps` (``Observer(every=K)``)."""

    attention: Sequence[AttentionMaps | None] | None = None
    latents: Sequence[LatentSteps] | None = None


def attention_maps(
    sums: object, words: Sequence[PromptWord], image: Image.Image
) -> AttentionMaps | None:
    """:class:`AttentionMaps` of one image from its summed per-position maps (L, h, w)."""
    if sums is None:
        return None
    maps = word_maps(sums, [w.positions for w in words]).numpy().astype(np.float32)
    tokens = [w.text for w in words]
    overlays = [overlay(image, m) for m in maps]
    return AttentionMaps(
        tokens=tokens,
        weights=[w.weight for w in words],
        maps=maps,
        overlays=overlays,
        grid=token_grid(image, overlays, tokens),
    )


def start_observation(observe: Observer | None, kind: str, compiled: bool) -> Observation | None:
    """The :class:`Observation` a call with ``observe`` records into (None: nothing), or a
    one-line refusal of what this pipeline (``kind`` "latent" / "pixel") cannot record."""
    if observe is None:
        return None
    if not isinstance(observe, Observer):
        raise ConfigError(
            f"@observe must be an Observer, got {type(observe).__name__}", settings=["observe"]
        )
    if observe.every and kind != "latent":
        raise ConfigError(
            "recording latents needs a latent (text-to-image) model; for a pixel model read "
            "x and denoised from @callback",
            settings=["observe"],
        )
    if observe.attention and kind != "latent":
        raise ConfigError(
            "attention maps need a text-to-image model (this one has no cross-attention); "
            "leave out @observe",
            settings=["observe"],
        )
    if observe.attention and compiled:
        raise ConfigError(
            "attention maps cannot be recorded from a compiled U-Net; load without compile",
            settings=["observe", "compile"],
        )
    return Observation(observe)


def observed_of(
    model: Any, req: Any, observation: Observation, images: list[Image.Image]
) -> Observed:
    """What ``observation`` recorded in a call of ``req`` on ``model`` (a LatentDiffusion),
    as arrays and pictures next to the call's ``images``."""
    attention = latents = None
    if observation.observer.attention:
        prompts = req.image_prompts()
        attention = [
            attention_maps(sums, model.prompt_words(prompts[i]), images[i])
            for i, sums in enumerate(observation.attention)
        ]
    if observation.observer.every:
        latents = [
            latent_steps(trace, model, images[i]) for i, trace in enumerate(observation.latents)
        ]
    return Observed(attention=attention, latents=latents)
