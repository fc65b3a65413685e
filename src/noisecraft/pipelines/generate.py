"""The generate() core: noise -> sigmas -> (guided) denoiser -> sampler -> images.

Every surface (CLI ``sample``, training-time sample grids, the demo, the
evaluation scripts) calls :func:`generate`. Conditioning is passed through
to the denoiser as keyword arguments (``class_labels`` here; ``context`` for
text models later), and classifier-free guidance is a denoiser wrapper
(DESIGN.md contract 2), so no sampler knows about either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from noisecraft.diffusion import CFGDenoiser, ClippedDenoiser, make_sigmas
from noisecraft.errors import ConfigError
from noisecraft.pipelines.pixel import PixelDiffusion
from noisecraft.samplers import get_sampler, parse_sampler_name


@dataclass(frozen=True)
class GenerateRequest:
    """What to generate. ``classes``: one label per image (None = unconditional / null class)."""

    n: int = 16
    sampler: str = "dpmpp_2m"
    steps: int = 20
    spacing: str | None = None  # None: the sampler name's choice (e.g. "... Karras") or linspace
    cfg: float = 1.0
    classes: Sequence[int] | None = None
    seed: int = 0
    batch_size: int = 256
    eta: float | None = None  # ddim / ancestral noise amount (sampler default when None)

    def validate(self, model: PixelDiffusion) -> None:
        """Raise a one-line :class:`ConfigError` / unknown-name error before any work starts."""
        get_sampler(parse_sampler_name(self.sampler)[0])
        if self.n < 1:
            raise ConfigError(f"--n must be at least 1, got {self.n}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if self.classes is not None:
            if model.num_classes is None:
                raise ConfigError("this model is unconditional; leave out --class")
            if len(self.classes) != self.n:
                raise ConfigError(f"got {len(self.classes)} class labels for {self.n} images")
            bad = [c for c in self.classes if not 0 <= c < model.num_classes]
            if bad:
                raise ConfigError(
                    f"class {bad[0]} out of range; "
                    f"this model has classes 0..{model.num_classes - 1}"
                )


def initial_noise(shape: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    """Unit Gaussian noise drawn on the CPU from ``seed`` (the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g).to(device)


@torch.no_grad()
def generate(
    model: PixelDiffusion,
    request: GenerateRequest,
    *,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Sample ``request.n`` images; returns a float tensor (n, C, H, W) in [-1, 1] on the CPU.

    Images are produced in batches of ``request.batch_size``; ``callback`` gets
    the sampler's per-step dict plus ``batch`` (the batch index).
    """
    request.validate(model)
    device = next(model.unet.parameters()).device
    name, sampler_spacing = parse_sampler_name(request.sampler)
    sampler = get_sampler(name)
    spacing = request.spacing or sampler_spacing or "linspace"
    sigmas = make_sigmas(model.schedule, request.steps, spacing).to(device)
    denoiser = model.denoiser()
    options = {} if request.eta is None else {"eta": request.eta}

    c, h, w = model.image_shape
    g = torch.Generator().manual_seed(request.seed)
    noise = torch.randn((request.n, c, h, w), generator=g)
    labels = None
    if model.num_classes is not None:
        null = model.unet.null_class
        labels = torch.tensor(
            list(request.classes) if request.classes is not None else [null] * request.n
        )
    out = []
    for b, start in enumerate(range(0, request.n, request.batch_size)):
        stop = min(start + request.batch_size, request.n)
        x = noise[start:stop].to(device) * sigmas[0]
        extra: dict = {}
        fn = denoiser
        if labels is not None:
            extra["class_labels"] = labels[start:stop].to(device)
            if request.cfg != 1.0:
                uncond = {"class_labels": torch.full_like(extra["class_labels"], null)}
                fn = CFGDenoiser(denoiser, request.cfg, uncond)
        if model.x0_range is not None:
            fn = ClippedDenoiser(fn, *model.x0_range)
        cb = None
        if callback is not None:

            def cb(d, b=b):
                callback({**d, "batch": b})

        x = sampler(fn, x, sigmas, generator=g, callback=cb, extra_args=extra, **options)
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)
