"""Low-memory mode: weights stored in float16 or int8, widened to float32 layer by layer.

What stable-diffusion.cpp does with f16 / q8_0 weights, on PyTorch's CPU kernels: the large
weights of the U-Net and the text encoder (and the VAE, in float16 by default) are *stored* in
a narrow format and each layer gets a float32 copy of its own weight only for its forward
(the hooks of :mod:`noisecraft.pipelines.offload` with ``device="cpu"``,
``dtype=torch.float32``), dropped right after it. All arithmetic stays float32, so:

* ``"fp16"``: each weight is rounded to float16 once (relative error <= 2^-11); activations
  are not rounded. SD 1.5's 3.97 GiB of float32 weights take 2.0 GiB.
* ``"int8"``: symmetric per-output-channel quantisation (as q8_0 / LLM.int8's vector-wise
  scales, here one scale per output channel): ``scale = max|w_row| / 127``,
  ``q = round(w / scale)``, widened as ``q * scale`` (:func:`~noisecraft.pipelines.offload.
  dequantize`). Weights take ~1.0 GiB; the rounding error is up to ``scale / 2`` per weight.

Biases, norms and weights with fewer than ``min_elements`` elements stay float32 parameters
(a few MB), and so do the U-Net's timestep-embedding layers and the VAE decoder's last conv,
whose ``weight.dtype`` the models read to cast their inputs. The stored weights become
*buffers* of the same name (``layer.weight`` still works; ``model.parameters()`` then yields
float32 tensors only, so the pipeline keeps float32 inputs); an int8 ``weight`` has a
``weight_scale`` buffer beside it.

Code that reads a stored layer's weight without calling the layer sees the narrow tensor:
the decoders' sub-pixel upsampling (``nn.kernels.fast_upsample_conv``) then declines its fast
path and upsamples, then convolves (same result, a slower VAE upsampling conv).

The conversion runs tensor by tensor. A weight that is a view of a memory-mapped file (a
``.safetensors`` loaded with no copy, :func:`~noisecraft.io.build.build_module`) has its
file pages dropped from the process (``madvise(MADV_DONTNEED)`` on the pages lying wholly
inside that tensor, in a private file mapping: :mod:`noisecraft.io.file_pages`) as soon as
it is converted, so loading an
fp32 file peaks near the stored size instead of the file's size. A float16 file loaded with
``dtype=None`` (:func:`load_low_memory`) is already the fp16 storage: no float32 copy is
ever made.

The allocator: :func:`low_memory` fixes glibc's mmap threshold at 1 MiB for the process
(:func:`fix_mmap_threshold`; ``mmap_threshold=None`` leaves glibc alone). By default glibc
raises that threshold up to 32 MiB as large blocks are freed, after which the U-Net's
activations come from the heap, which keeps the pages of freed ones pinned behind live
tensors; fixed, every such activation is its own mapping, returned to the system when freed.
Measured on a 512x512 ``noisecraft generate --low-memory int8`` run (4 Euler steps, tiled
decode): peak 2.14 GB RSS and 8.4 s per step with glibc's default, 1.89 GB and 10.7 s with
1 MiB, 1.98 GB and 9.7 s with 8 MiB (page faults on every fresh mapping). Low-memory mode is
for the memory, so 1 MiB is its default. (Running the CFG halves one after the other instead
of as one batch was tried too: 2.19 GB, no saving: the heap, not the activations, is what
grows.)

Cost: widening reads every stored weight once per U-Net call (SD 1.5: 860 M weights per
pass), into one reused 64 MiB float32 workspace (a fresh allocation per layer would add the
page faults of a new memory map each time); docs/performance.md gives the measured time and
peak memory.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from noisecraft.errors import ConfigError, unknown_name
from noisecraft.io.file_pages import FilePages
from noisecraft.models.vae_tiling import release_freed_heap
from noisecraft.pipelines.offload import SCALE_SUFFIX, SequentialOffload

#: stored weight formats
WEIGHT_FORMATS = ("fp16", "int8")
#: layers kept in float32 whatever their size: their ``weight.dtype`` is read by the models
#: (UNet.forward casts the timestep embedding to it; AutoencoderKL.last_layer)
KEEP_FP32 = ("time_embed.", "decoder.conv_out")
#: weights of up to this many elements are widened into one reused float32 buffer (64 MiB:
#: SD 1.5's largest U-Net weight is 14.7 M; the 38 M-element token embedding is allocated)
WORKSPACE = 2**24
#: the layer types whose ``weight`` is stored narrow (their forwards only use it as a tensor)
STORED_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)


def quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantisation with one float32 scale per output channel (dim 0).

    ``scale = max|w[i]| / 127`` (1 for an all-zero row), ``q = clamp(round(w / scale), -127,
    127)``; returns ``(q, scale)`` with ``scale`` shaped (out, 1, ...) to broadcast against
    ``q``, so ``q * scale`` approximates ``w`` within ``scale / 2``.
    """
    flat = w.detach().reshape(w.shape[0], -1)
    amax = flat.abs().amax(dim=1).float()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(flat.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale.reshape((-1,) + (1,) * (w.ndim - 1))


# ---------------------------------------------------------------------------- conversion


def _stored_layers(
    root: nn.Module, min_elements: int, keep: Iterable[str]
) -> list[tuple[str, nn.Module]]:
    keep = tuple(keep)
    out = []
    for name, m in root.named_modules():
        w = m._parameters.get("weight") if isinstance(m, STORED_TYPES) else None
        if w is None or not w.is_floating_point() or w.ndim < 2 or w.numel() < min_elements:
            continue
        if any(("." + k) in ("." + name) for k in keep):
            continue
        out.append((name, m))
    return out


def store_weights(
    root: nn.Module,
    weights: str,
    *,
    min_elements: int = 4096,
    keep: Iterable[str] = KEEP_FP32,
    release: FilePages | None = None,
) -> list[nn.Module]:
    """Store the ``weight`` of ``root``'s Linear / Conv2d / Embedding layers in ``weights``
    format (in place); every other floating-point tensor becomes float32. Returns the layers
    whose weight is stored (those that need the widening hooks)."""
    if weights not in WEIGHT_FORMATS:
        raise unknown_name("weights format", weights, WEIGHT_FORMATS)
    release = release or FilePages()
    layers = _stored_layers(root, min_elements, keep)
    for _, m in layers:
        w = m._parameters.pop("weight").detach()
        if weights == "fp16":
            stored = w.to(torch.float16)
        else:
            stored, scale = quantize_per_channel(w)
            m.register_buffer("weight" + SCALE_SUFFIX, scale)
        m.register_buffer("weight", stored)
        release.release_copied(w, stored)
        del w
    store_fp32(root, release, skip={id(m) for _, m in layers})  # biases, norms, small ones
    return [m for _, m in layers]


def low_memory_module(
    module: nn.Module, weights: str = "fp16", *, min_elements: int = 4096
) -> SequentialOffload:
    """One module (e.g. a bare U-Net) in low-memory mode, in place: its weights stored in
    ``weights`` format, each stored layer widened to float32 for its forward; returns the
    hooks (``.remove()`` removes them; the storage stays narrow)."""
    stored = store_weights(module, weights, min_elements=min_elements)
    ids = {id(m) for m in stored}
    return SequentialOffload(
        module, "cpu", torch.float32, select=lambda m: id(m) in ids, workspace=WORKSPACE
    )


#: glibc's ``mallopt`` parameter number of M_MMAP_THRESHOLD (malloc.h)
M_MMAP_THRESHOLD = -3
#: the mmap threshold low-memory mode fixes (bytes)
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``nbytes`` or more from its own mmap, unmapped when freed,
    for the rest of the process (glibc ``mallopt(M_MMAP_THRESHOLD, nbytes)``, which also
    stops glibc's dynamic raising of the threshold; module docstring). False where the C
    library is not glibc (nothing changes there)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, nbytes))


def low_memory(
    model: Any,
    weights: str = "fp16",
    *,
    vae: str | None = "fp16",
    min_elements: int = 4096,
    mmap_threshold: int | None = MMAP_THRESHOLD,
) -> Any:
    """The :class:`~noisecraft.models.latent_diffusion.LatentDiffusion` ``model`` with its U-Net and
    text-encoder weights stored in ``weights`` ("fp16" or "int8") and its VAE's in ``vae``
    ("fp16", "int8", or None = float32), each layer widened to float32 for its forward only
    (see the module docstring). ``mmap_threshold``: passed to :func:`fix_mmap_threshold`
    (process-wide); None leaves the allocator alone.

    The modules are converted in place (the returned model shares them with ``model``, which
    must not be used without the hooks); ``returned.offload.remove()`` removes the hooks.
    CPU only. Layers with fewer than ``min_elements`` weights stay float32.
    """
    from noisecraft.models.latent_diffusion import LatentDiffusion

    if not isinstance(model, LatentDiffusion):
        raise ConfigError(
            "low-memory mode is for latent (Stable Diffusion-type) models; this is a "
            f"{type(model).__name__}"
        )
    if weights not in WEIGHT_FORMATS:
        raise unknown_name("weight format", weights, WEIGHT_FORMATS, setting="low_memory")
    if vae is not None and vae not in WEIGHT_FORMATS:
        raise unknown_name("VAE weights format", vae, WEIGHT_FORMATS)
    if model.offload is not None:
        raise ConfigError("low-memory mode and sequential offload cannot be combined")
    for module in (model.unet, model.text_encoder, model.vae):
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type != "cpu":
                raise ConfigError(
                    f"low-memory mode runs on the CPU, but a weight is on {t.device}; "
                    "load the model with device='cpu'"
                )
    if mmap_threshold is not None:
        fix_mmap_threshold(mmap_threshold)
    release = FilePages()
    stored: list[nn.Module] = []
    for module, fmt in ((model.unet, weights), (model.text_encoder, weights), (model.vae, vae)):
        if fmt is None:
            store_fp32(module, release)
        else:
            stored += store_weights(module, fmt, min_elements=min_elements, release=release)
    release_freed_heap()  # the quantisation's temporaries: heap pages back to the OS
    ids = {id(m) for m in stored}
    handle = SequentialOffload(
        [model.unet, model.text_encoder, model.vae],
        "cpu",
        torch.float32,
        select=lambda m: id(m) in ids,
        workspace=WORKSPACE,
    )
    return model.replace(offload=handle)


def store_fp32(
    root: nn.Module, release: FilePages | None = None, skip: set[int] | None = None
) -> None:
    """Every floating-point parameter and buffer of ``root`` in float32 (in place), except
    the buffers of the modules whose ``id`` is in ``skip`` (the stored weights)."""
    release = release or FilePages()
    skip = skip or set()
    for m in root.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                m._parameters[name] = nn.Parameter(p.detach().float(), requires_grad=False)
                release(p)
        if id(m) in skip:
            continue
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                m._buffers[name] = b.float()
                release(b)


def load_low_memory(
    path: str | os.PathLike,
    weights: str = "fp16",
    *,
    vae: str | None = "fp16",
    vae_path: str | os.PathLike | None = None,
    prediction: str | None = None,
    arch: str | None = None,
    min_elements: int = 4096,
    mmap_threshold: int | None = MMAP_THRESHOLD,
) -> Any:
    """Load a model file (any format :func:`~noisecraft.io.formats.auto.load_any` reads) for
    low-memory mode without a float32 copy of a half-precision file: SD single files are read
    with ``dtype=None`` (stored dtype, memory-mapped), other formats as they load (native
    files map float32 weights with no copy); then :func:`low_memory`."""
    from noisecraft.io.formats.auto import detect_format, load_any

    if weights not in WEIGHT_FORMATS:
        raise unknown_name("weight format", weights, WEIGHT_FORMATS, setting="low_memory")
    if mmap_threshold is not None:  # before loading (the conversion's temporaries too), once
        fix_mmap_threshold(mmap_threshold)
    if detect_format(path) == "single-file":
        from noisecraft.io.formats.single_file import load_single_file

        model = load_single_file(path, prediction=prediction, vae=vae_path, family=arch, dtype=None)
    else:
        model = load_any(path, vae=vae_path, prediction=prediction, arch=arch)
    return low_memory(model, weights, vae=vae, min_elements=min_elements, mmap_threshold=None)


__all__ = [
    "KEEP_FP32",
    "MMAP_THRESHOLD",
    "WEIGHT_FORMATS",
    "fix_mmap_threshold",
    "load_low_memory",
    "low_memory",
    "low_memory_module",
    "quantize_per_channel",
    "store_fp32",
    "store_weights",
]
