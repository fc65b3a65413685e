"""How much memory a request needs, estimated from the model's configs before anything runs.

The estimate counts the float tensors that are alive together at the peak of each phase of
:func:`~noisecraft.pipelines.generate.generate` (the weights are already loaded and are not
counted):

* **sampling** (per run of ``b`` images; the U-Net sees ``2 b`` with classifier-free
  guidance): every skip connection the U-Net keeps for its up path (one map per input block,
  ``channels x area`` of its level), plus the working set of its busiest level: a ResBlock's
  input, normalised copy, convolution output and the concatenated skip (``RES_WORK`` maps of
  the level's width), or, at a level with a transformer, its query / key / value / output and
  the GEGLU feed-forward's ``8 x channels`` hidden map (``ATTN_WORK``). Attention itself
  needs no ``tokens x tokens`` matrix: PyTorch's SDPA runs it blockwise on the CPU and on CUDA.
* **decoding** (per run): the VAE decoder's busiest level holds ``DECODER_WORK`` maps of the
  wider of its own and the level below's channels at that level's size (SD 1.5 at 512x512:
  3 x 256 channels at full resolution, 768 MiB; measured 743 MiB, see
  :mod:`noisecraft.models.vae_tiling`). A tiled decode holds one tile's worth plus the blended
  output and its weights.
* **outputs**: every image as float32 (the list of runs and their concatenation).

The counts are an estimate, not a bound; ``bench/memory_estimate.py`` prints them beside the
measured peak resident memory of real runs. :func:`available_bytes` says how much the machine
can give.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.unet import UNetConfig
from noisecraft.models.vae import VAEConfig
from noisecraft.models.vae_tiling import AUTO_TILE_PIXELS, TILE

#: Maps of a level's width alive at once in a ResBlock (input, GroupNorm copy, conv output,
#: the skip it is concatenated with on the way up).
RES_WORK = 4
#: ... in a transformer block: q, k, v, attention output, and GEGLU's 8x-wide hidden map.
ATTN_WORK = 4 + 8
#: ... in a VAE decoder level (input, GroupNorm copy, conv output).
DECODER_WORK = 3


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of one request: ``sampling`` and ``decoding`` (per run of
    ``batch`` images; they do not overlap), ``outputs`` (all images), and their sum at the
    worse of the two phases, :attr:`total`."""

    sampling: int
    decoding: int
    outputs: int
    batch: int

    @property
    def total(self) -> int:
        return max(self.sampling, self.decoding) + self.outputs


def _area(h: int, w: int, level: int) -> int:
    s = 2**level
    return math.ceil(h / s) * math.ceil(w / s)


def unet_floats(config: UNetConfig, h: int, w: int) -> int:
    """Floats alive at the peak of one U-Net pass on one (h, w) input (module docstring)."""
    c0 = config.model_channels
    skips = c0 * _area(h, w, 0)  # the input conv's output
    work = 0
    last = len(config.channel_mult) - 1
    for level, mult in enumerate(config.channel_mult):
        c, area = mult * c0, _area(h, w, level)
        skips += config.num_res_blocks * c * area
        if level != last:
            skips += c * _area(h, w, level + 1)  # the downsampled map is a skip too
        attention = level in config.attention_levels
        work = max(work, (ATTN_WORK if attention else RES_WORK) * 2 * c * area)
    return skips + work


def decoder_floats(config: VAEConfig, h: int, w: int) -> int:
    """Floats alive at the peak of decoding one image of (h, w) pixels."""
    mult = config.channel_mult
    peak = 0
    for level in range(len(mult)):
        c = config.base_channels * max(mult[level], mult[min(level + 1, len(mult) - 1)])
        peak = max(peak, DECODER_WORK * c * _area(h, w, level))
    return peak


def estimate(
    model: Any,
    height: int,
    width: int,
    n: int,
    batch: int,
    cfg: float,
    tiling: bool | None = None,
) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of ``n`` images of ``height x width`` made in runs of
    ``batch``, with guidance scale ``cfg`` (two U-Net inputs per image unless it is 1) and
    the decoder's ``tiling`` choice (None: tiled above
    :data:`~noisecraft.models.vae_tiling.AUTO_TILE_PIXELS`)."""
    b = min(batch, n)
    guided = 2 if cfg != 1.0 else 1
    itemsize = next(model.unet.parameters()).element_size()
    if isinstance(model, LatentDiffusion):
        f = model.downsample_factor
        lh, lw = math.ceil(height / f), math.ceil(width / f)
        channels = model.image_channels
        sampling = unet_floats(model.unet.config, lh, lw) * guided * b * itemsize
        tiled = height * width > AUTO_TILE_PIXELS if tiling is None else tiling
        if tiled:
            side = TILE * f
            decoding = decoder_floats(model.vae.config, side, side) + 2 * channels * height * width
        else:
            decoding = decoder_floats(model.vae.config, height, width)
        decoding *= b * 4  # the VAE runs in float32 (or wider than the U-Net's half precision)
    else:
        channels = model.unet.config.in_channels
        sampling = unet_floats(model.unet.config, height, width) * guided * b * itemsize
        decoding = 0
    outputs = 2 * n * channels * height * width * 4
    return MemoryEstimate(sampling, decoding, outputs, b)


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory a new allocation can get: CUDA's free memory on a CUDA device; on the CPU the
    kernel's ``MemAvailable`` (Linux), lowered to a cgroup's remaining limit where one is set.
    None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = _meminfo_available()
    limit = _cgroup_remaining()
    if free is None:
        return limit
    return free if limit is None else min(free, limit)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_remaining() -> int | None:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


__all__ = [
    "MemoryEstimate",
    "available_bytes",
    "decoder_floats",
    "estimate",
    "unet_floats",
]
