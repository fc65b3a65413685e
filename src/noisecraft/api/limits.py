"""What one call may ask for: a pixel cap, an image cap, and the machine's memory.

A legitimate but huge request is refused before it allocates, in one line that gives the
numbers; what fits in a smaller batch runs in a smaller batch (images are the same: each has
its own seed's generator). The same :class:`Limits` are what the HTTP server enforces.

Defaults: 2048 x 2048 pixels per image (AUTOMATIC1111's largest slider value), 1000 images per
call (A1111's largest batch count x size is 800), and at most ``memory_fraction`` of the
memory the machine has available for the estimate of :mod:`noisecraft.pipelines.memory`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from noisecraft.errors import ConfigError
from noisecraft.pipelines.memory import available_bytes, estimate
from noisecraft.pipelines.request import GenerateRequest, image_size

DEFAULT_MAX_PIXELS = 2048 * 2048
DEFAULT_MAX_IMAGES = 1000


@dataclass(frozen=True)
class Limits:
    """``max_pixels`` per image, ``max_images`` per call, and the share of the available
    memory (``memory_fraction``, 0 = do not check memory) a request's estimate may take."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES
    memory_fraction: float = 0.8

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"@{name} must be a positive integer, got {value!r}", settings=[name]
                )
        if not 0.0 <= self.memory_fraction <= 1.0:
            raise ConfigError(f"memory_fraction must be in [0, 1], got {self.memory_fraction}")

    def apply(self, model: Any, req: GenerateRequest, device: str = "cpu") -> GenerateRequest:
        """``req`` if it is within the limits, with its batch made smaller where only that
        fits in memory; else a one-line :class:`ConfigError` with the numbers."""
        height, width = image_size(model, req)
        pixels = height * width
        if pixels > self.max_pixels:
            raise ConfigError(
                f"@width x @height = {width}x{height} is {pixels:,} pixels, more than "
                f"@max_pixels ({self.max_pixels:,}); make it smaller or raise @max_pixels",
                settings=["width", "height", "max_pixels"],
            )
        if req.n > self.max_images:
            raise ConfigError(
                f"@n = {req.n:,} images in one call is more than @max_images "
                f"({self.max_images:,}); make fewer or raise @max_images",
                settings=["n", "max_images"],
            )
        available = available_bytes(device) if self.memory_fraction else None
        if available is None:
            return req
        budget = available * self.memory_fraction
        batch = min(req.batch_size, req.n)
        while True:
            need = estimate(model, height, width, req.n, batch, req.cfg, req.vae_tiling)
            if need.total <= budget or batch == 1:
                break
            batch = max(1, batch // 2)
        if need.total > budget:
            raise ConfigError(
                f"{req.n} image(s) of {width}x{height} need about {_gib(need.total)} "
                f"(estimate: the images {_gib(need.outputs)}; one at a time, sampling "
                f"{_gib(need.sampling)}, decoding {_gib(need.decoding)}), more than the "
                f"{_gib(budget)} this machine can give now; make fewer or smaller images "
                "(@n, @width x @height) or decode in tiles (@tiling)",
                settings=["n", "width", "height", "tiling"],
            )
        if batch == min(req.batch_size, req.n):
            return req
        return dataclasses.replace(req, batch_size=batch)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


__all__ = ["DEFAULT_MAX_IMAGES", "DEFAULT_MAX_PIXELS", "Limits"]
