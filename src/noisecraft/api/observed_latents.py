"""The latents of a text-to-image call every K steps, raw and decoded
(``pipe(..., observe=Observer(every=K))`` -> ``result.observed.latents[i]``).

>>> result = pipe("a handwritten 7", observe=Observer(every=5))   # doctest: +SKIP
>>> steps = result.observed.latents[0]                          # doctest: +SKIP
>>> steps.steps, steps.xt.shape      # [0, 5, 10, 15, 20], (5, 4, 8, 8)  # doctest: +SKIP
>>> steps.x0_images["vae"][-1]       # the final image                   # doctest: +SKIP
>>> steps.channels("x0").save("channels.png")                          # doctest: +SKIP

The recording is :class:`~noisecraft.pipelines.observe.LatentRecorder` (the sampler's
callback; x_t in DDPM's view ``x / sqrt(1 + sigma^2)``); the pictures are
:mod:`noisecraft.viz.latents`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from noisecraft.api.images import to_pil
from noisecraft.io.atomic import atomic_path, check_writable
from noisecraft.io.write_errors import writing
from noisecraft.pipelines.observe import LatentTrace
from noisecraft.viz.images import save_gif
from noisecraft.viz.latents import channel_grid, picture_grid, side_by_side

__all__ = ["DECODERS", "LatentSteps", "latent_steps"]

#: How each recorded latent is turned into a picture: ``cheap`` (a linear map per latent
#: pixel, :mod:`noisecraft.models.latent_preview`, shown at the image's size) and ``vae``
#: (the full VAE decoder; for the final row, the call's own image).
DECODERS = ("cheap", "vae")


@dataclass(frozen=True)
class LatentSteps:
    """One image's latents after steps ``0, K, 2K, ...`` and at the end.

    * ``steps``: the step after which each row was taken; the last is the number of steps
      run (the final latents);
    * ``sigmas``: float32 (S,), the noise level of each row (0 for the final one);
    * ``xt``, ``x0``: float32 (S, C, h, w), the raw latents x_t (DDPM's view) and the
      predicted x0 (in the final row both are the result's latents);
    * ``xt_images``, ``x0_images``: for each of :data:`DECODERS`, one PIL image per row at
      the image's size; ``x0_images["vae"][-1]`` is the call's image.
    """

    steps: list[int]
    sigmas: np.ndarray
    xt: np.ndarray
    x0: np.ndarray
    xt_images: dict[str, list[Image.Image]] = field(repr=False)
    x0_images: dict[str, list[Image.Image]] = field(repr=False)

    def row_labels(self) -> list[str]:
        return [
            f"step {s} (final)" if k == len(self.steps) - 1 else f"step {s}, σ={sig:.2f}"
            for k, (s, sig) in enumerate(zip(self.steps, self.sigmas, strict=True))
        ]

    def channels(self, which: str = "xt") -> Image.Image:
        """The latent channels of every row (``which``: "xt" or "x0") on one colour scale."""
        latents = {"xt": self.xt, "x0": self.x0}[which]
        title = "x_t (noisy latents)" if which == "xt" else "predicted x0"
        return channel_grid(latents, self.row_labels(), title=title)

    def pictures(self) -> Image.Image:
        """Every row's pictures in one grid: x_t and x0, cheap preview and VAE, per step."""
        rows = {
            f"{name}, {dec}": images[dec]
            for name, images in (("x_t", self.xt_images), ("x0", self.x0_images))
            for dec in DECODERS
        }
        labels = [lab.replace(", ", "\n") for lab in self.row_labels()]
        return picture_grid(rows, labels)

    def frames(self, decoder: str = "vae") -> list[np.ndarray]:
        """Frames of a denoising GIF: x_t left, the predicted x0 right, one per row."""
        return [
            side_by_side(a, b)
            for a, b in zip(self.xt_images[decoder], self.x0_images[decoder], strict=True)
        ]

    def file_names(self) -> list[str]:
        """``step_NNN_{xt,x0}_{cheap,vae}.png`` per row, ``steps.png`` (:meth:`pictures`),
        ``channels_xt.png``, ``channels_x0.png`` and ``latents.safetensors`` (the raw
        arrays)."""
        names = [
            f"step_{s:03d}_{which}_{dec}.png"
            for s in self.steps
            for which in ("xt", "x0")
            for dec in DECODERS
        ]
        return [*names, "steps.png", "channels_xt.png", "channels_x0.png", "latents.safetensors"]

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
        """Write :meth:`file_names` into ``folder`` (created); every path is checked before
        the first is written."""
        paths = [Path(folder) / name for name in self.file_names()]
        for path in paths:
            check_writable(path, overwrite=overwrite)
        images = [
            {"xt": self.xt_images, "x0": self.x0_images}[which][dec][k]
            for k in range(len(self.steps))
            for which in ("xt", "x0")
            for dec in DECODERS
        ]
        images += [self.pictures(), self.channels("xt"), self.channels("x0")]
        for image, path in zip(images, paths, strict=False):
            with writing(path), atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
        self._save_arrays(paths[-1])
        return paths

    def _save_arrays(self, path: Path) -> None:
        import torch
        from safetensors.torch import save_file

        tensors = {
            "xt": torch.from_numpy(self.xt),
            "x0": torch.from_numpy(self.x0),
            "sigmas": torch.from_numpy(self.sigmas),
            "steps": torch.tensor(self.steps, dtype=torch.int64),
        }
        with writing(path), atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"x_t": "x / sqrt(1 + sigma^2)"})

    def save_gif(
        self, path: str | os.PathLike, *, decoder: str = "vae", overwrite: bool = False
    ) -> Path:
        """The denoising GIF (:meth:`frames`), the final frame held."""
        scale = max(1, 256 // max(1, self.xt_images[decoder][0].width))
        return save_gif(
            self.frames(decoder), path, scale=scale, overwrite=overwrite, duration_ms=150
        )


def latent_steps(trace: LatentTrace, model: Any, image: Image.Image) -> LatentSteps:
    """Decode one image's :class:`LatentTrace` with ``model`` (a LatentDiffusion): the cheap
    preview of every row, the VAE decode of every row but the last, which is ``image``."""
    size = image.size
    xt_images: dict[str, list[Image.Image]] = {d: [] for d in DECODERS}
    x0_images: dict[str, list[Image.Image]] = {d: [] for d in DECODERS}
    last = len(trace.steps) - 1
    for k in range(last + 1):
        for latents, out in ((trace.xt[k : k + 1], xt_images), (trace.x0[k : k + 1], x0_images)):
            z = latents.to(model.device)
            cheap = to_pil(model.preview(z, "cheap")[0].float().cpu())
            out["cheap"].append(cheap.resize(size, Image.Resampling.NEAREST))
            if k == last:
                out["vae"].append(image)
            else:
                out["vae"].append(to_pil(model.decode(z)[0].float().clamp(-1, 1).cpu()))
    return LatentSteps(
        steps=list(trace.steps),
        sigmas=trace.sigmas.numpy().astype(np.float32),
        xt=trace.xt.numpy().astype(np.float32),
        x0=trace.x0.numpy().astype(np.float32),
        xt_images=xt_images,
        x0_images=x0_images,
    )
