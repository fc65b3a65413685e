"""Tiled VAE encode / decode: large images in bounded memory, without visible seams.

The image (or latent) is cut into overlapping tiles, each tile goes through the VAE on its own,
and the outputs are blended: every tile's output is weighted by a separable linear ramp that
rises across its overlap with the previous tile and falls across its overlap with the next,
and the weighted outputs are summed and divided by the summed weights. Where two tiles
overlap, their weights add up to one (a linear cross-fade), so the hand-over from one tile to
the next is spread over the whole overlap instead of happening at one pixel column.

The result is close to, but **not equal to**, the untiled one: each tile's GroupNorm layers
normalise with that tile's statistics rather than the whole image's, the mid-block attention
only sees its own tile, and convolutions see zero padding at tile edges (the ramp gives those
edges little weight). Larger tiles and overlaps bring the result closer.

Tile positions are spread evenly: ``n = ceil((size - overlap) / (tile - overlap))`` tiles
laid out on the latent grid, so every overlap is at least the requested one.

:func:`decode_latents` (what :meth:`LatentDiffusion.decode
<noisecraft.models.latent_diffusion.LatentDiffusion.decode>` and so ``generate()`` use) tiles on its
own when an image has more than :data:`AUTO_TILE_PIXELS` pixels: the untiled SD decoder's
memory grows with the pixel count (its last level runs 128-256 channels at full resolution:
a measured 743 MiB of float32 activations at the peak for one 512x512 image on the CPU, so
about 3 GiB at 1024x1024 and 12 GiB at 2048x2048), while a tiled decode needs that of one
512x512 tile whatever the size.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable

import torch
from torch import Tensor

from noisecraft.errors import ConfigError
from noisecraft.models.vae import AutoencoderKL, DiagonalGaussian

#: Images with more pixels than this (per image) are decoded in tiles when tiling is not forced
#: on or off: 1024x1024 and smaller decode whole (exactly as before), larger ones in tiles.
AUTO_TILE_PIXELS = 1024 * 1024
#: Tile side and overlap of a tiled decode, in latent pixels (x 8 image pixels for SD).
TILE, TILE_OVERLAP = 64, 8


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread starts of tiles ``tile`` long covering ``[0, size)``, overlapping >= overlap.

    One tile at 0 when ``tile >= size``; otherwise the first starts at 0, the last ends at
    ``size``, and consecutive starts differ by at most ``tile - overlap``.
    """
    if tile >= size:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramps(starts: list[int], tile: int, scale: int) -> list[Tensor]:
    """1-D blend weights (length ``tile * scale``) of each tile, in output units.

    Across its overlap of width ``w`` with the previous (next) tile, a tile's weight rises
    (falls) linearly as ``(k + 1/2) / w``, so two overlapping weights sum to one.
    """
    length = tile * scale
    k = torch.arange(length, dtype=torch.float64) + 0.5
    out = []
    for i, s in enumerate(starts):
        w = torch.ones(length, dtype=torch.float64)
        if i > 0:
            left = (starts[i - 1] + tile - s) * scale
            if left > 0:
                w = w * (k / left).clamp(max=1.0)
        if i < len(starts) - 1:
            right = (s + tile - starts[i + 1]) * scale
            if right > 0:
                w = w * ((length - k) / right).clamp(max=1.0)
        out.append(w)
    return out


def _check_sizes(name: str, tile: int, overlap: int, f: int) -> None:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ConfigError(f"{name} tile size must be a positive integer, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ConfigError(f"{name} overlap must be an integer in [0, tile), got {overlap!r}")
    if tile % f or overlap % f:
        raise ConfigError(
            f"{name} tile ({tile}) and overlap ({overlap}) must be multiples of {f}, "
            f"the VAE's downsampling factor"
        )


def _blend(
    run: Callable[[Tensor], Tensor],
    source: Tensor,
    grid: tuple[int, int],
    tile: int,
    overlap: int,
    in_scale: int,
    out_scale: int,
) -> Tensor:
    """Run ``run`` on overlapping tiles of ``source`` and blend the outputs.

    Tiles are laid out on a ``grid`` (the latent grid) in its units (``tile``, ``overlap``); a
    grid cell is ``in_scale`` source pixels and ``out_scale`` output pixels.
    """
    gh, gw = grid
    th, tw = min(tile, gh), min(tile, gw)
    ys, xs = tile_starts(gh, th, overlap), tile_starts(gw, tw, overlap)
    wy, wx = _ramps(ys, th, out_scale), _ramps(xs, tw, out_scale)
    out: Tensor | None = None
    total = torch.zeros(gh * out_scale, gw * out_scale, dtype=torch.float64)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            part = run(
                source[..., y * in_scale : (y + th) * in_scale, x * in_scale : (x + tw) * in_scale]
            )
            weight = wy[i][:, None] * wx[j][None, :]
            if out is None:
                out = part.new_zeros(*part.shape[:2], gh * out_scale, gw * out_scale)
            oy, ox = y * out_scale, x * out_scale
            out[..., oy : oy + th * out_scale, ox : ox + tw * out_scale] += part * weight.to(part)
            total[oy : oy + th * out_scale, ox : ox + tw * out_scale] += weight
    assert out is not None
    return out / total.to(out)


def tiled_encode(
    vae: AutoencoderKL, x: Tensor, tile: int = 512, overlap: int = 64
) -> DiagonalGaussian:
    """Posterior of images ``x`` encoded in ``tile`` x ``tile`` pixel tiles.

    The tiles' posterior moments (mean and log-variance, after ``quant_conv``) are blended in
    latent space with ramps at least ``overlap / f`` latent pixels wide. ``tile`` and
    ``overlap`` must be multiples of the downsampling factor ``f``, and so must the image size
    (:class:`ConfigError` otherwise). Close to ``vae.encode(x)``, not equal (module docstring).
    """
    f = vae.config.downsample_factor
    vae.check_image(x)
    _check_sizes("encoder", tile, overlap, f)
    grid = (x.shape[-2] // f, x.shape[-1] // f)
    moments = _blend(vae.moments, x, grid, tile // f, overlap // f, in_scale=f, out_scale=1)
    return DiagonalGaussian(moments, deterministic=not vae.config.double_z)


def tiled_decode(
    vae: AutoencoderKL, z: Tensor, tile_latent: int = TILE, overlap_latent: int = TILE_OVERLAP
) -> Tensor:
    """Images decoded from raw latents ``z`` in ``tile_latent`` x ``tile_latent`` tiles.

    Outputs (``f * tile_latent`` pixels) are blended in pixel space with ramps at least
    ``f * overlap_latent`` pixels wide. Close to ``vae.decode(z)``, not equal (module
    docstring).
    """
    c = vae.config
    if z.ndim != 4 or z.shape[1] != c.z_channels:
        raise ConfigError(
            f"VAE latents must be (batch, {c.z_channels}, height, width), got {tuple(z.shape)}"
        )
    _check_sizes("decoder", tile_latent, overlap_latent, 1)
    grid = (z.shape[-2], z.shape[-1])
    f = c.downsample_factor
    return _blend(vae.decode, z, grid, tile_latent, overlap_latent, in_scale=1, out_scale=f)


def forced_tile(latent_shape: tuple[int, ...] | torch.Size) -> int:
    """The tile side (latent pixels) of a tiled decode: :data:`TILE` (512 image px), or, for a
    smaller image, half its longer side plus the overlap, so that tiling that is asked for
    (``--tiling``) still splits the image in two per side and saves memory (a 512x512 SD
    image: 4 tiles of 320 px). Images smaller than two overlaps decode as one tile."""
    half = math.ceil(max(latent_shape[-2:]) / 2)
    return min(TILE, half + TILE_OVERLAP)


def needs_tiling(vae: AutoencoderKL, latent_shape: tuple[int, ...] | torch.Size) -> bool:
    """Whether :func:`decode_latents` tiles latents of ``latent_shape`` (.., h, w) on its own:
    when the decoded image has more than :data:`AUTO_TILE_PIXELS` pixels."""
    f = vae.config.downsample_factor
    h, w = latent_shape[-2:]
    return h * f * w * f > AUTO_TILE_PIXELS


def decode_latents(vae: AutoencoderKL, z: Tensor, tiled: bool | None = None) -> Tensor:
    """Scaled diffusion latents -> images, as :meth:`AutoencoderKL.decode_latents`, in tiles
    (:func:`tiled_decode`, tiles of :func:`forced_tile` latent pixels, overlap 8 = 64 px) when
    ``tiled`` is True, or when it is None and :func:`needs_tiling` says so.
    """
    if tiled is None:
        tiled = needs_tiling(vae, z.shape)
    if tiled:
        return tiled_decode(vae, vae.unscale_latents(z), forced_tile(z.shape), TILE_OVERLAP)
    if z.device.type != "cpu":
        return vae.decode_latents(z)
    release_freed_heap()
    handles = [  # also before each decoder block: the lower levels' freed tensors
        m.register_forward_pre_hook(_trim_before)
        for level in vae.decoder.up
        for m in (*level.block, getattr(level, "upsample", None))
        if m is not None
    ]
    try:
        return vae.decode_latents(z)
    finally:
        for h in handles:
            h.remove()


def _trim_before(module: torch.nn.Module, args: tuple) -> None:
    release_freed_heap()


def release_freed_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``); False elsewhere.

    Why before a decode: tensors under 32 MiB come from the C heap (glibc raises its mmap
    threshold up to 32 MiB as big blocks are freed), and the U-Net's skip tensors, kept alive
    across the whole network, pin the heap, so the temporaries freed around them stay in the
    process (measured: 300 MiB after one SD 1.5 step at 512x512). The decoder's full-size
    tensors (128-256 MiB) are fresh mmaps that cannot reuse those pages, so without a trim
    they add on top. Peak RSS of one 512x512 SD 1.5 generation (``bench/memory.py``): 5.34
    GiB with no trim, 5.17 GiB with a trim before the decode, 5.06 GiB with one before each
    decoder block as well (:func:`decode_latents`); the weights are 3.97 GiB.
    Trimming takes a few milliseconds and changes no result.
    """
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


__all__ = [
    "AUTO_TILE_PIXELS",
    "TILE",
    "TILE_OVERLAP",
    "forced_tile",
    "decode_latents",
    "needs_tiling",
    "release_freed_heap",
    "tile_starts",
    "tiled_decode",
    "tiled_encode",
]
