"""Build a model from a config and a state dict without holding two copies of the weights.

``Module(config)`` followed by ``load_state_dict`` allocates and randomly initialises every
parameter, then copies the loaded tensors over them: twice the weights' memory at the peak,
plus the time of an initialisation that is thrown away. Here the module is built on the
``meta`` device (shapes only, no storage) and ``load_state_dict(..., assign=True)`` makes the
loaded tensors its parameters. With tensors from ``safetensors.safe_open`` / ``load_file``
(memory-mapped) the weights exist once.

Measured (``bench/memory.py``, safetensors 0.8): ``load_file`` returns tensors that are views
of the file's memory map, so a float32 file becomes the model's parameters with no copy at
all; the pages count in the process's RSS as file-backed pages as they are first read. The
casts and the move to ``device`` are made tensor by tensor (``Tensor.to(device, dtype)``: one
copy in the target dtype on the target device, no intermediate CPU copy), and are no-ops
for a float32 file loaded on the CPU. When a tensor is copied (a half-precision file widened
to float32, or a move to another device), its pages of the file are dropped from the process
right after (:mod:`noisecraft.io.file_pages`), so the load peaks at the converted weights plus
about one tensor, not the file plus the weights (SD 1.5 fp16 file: 6.78 GB before, see
docs/performance.md).

The random initialisation is also skipped while the module is built (:func:`no_init`):
on the meta device it computes nothing, but the first ``normal_`` there loads PyTorch's
Python meta kernels, 1-3 s of a command's first load (measured on SD 1.5's text encoder).

Weights stored in half precision (fp16 / bf16 single files and diffusers ``variant="fp16"``
folders) are widened to ``dtype`` (float32 by default: CPU kernels are fastest and exact in
fp32, and bf16 is very slow on CPUs without AMX); on CUDA pass ``dtype=torch.float16``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor, nn

from noisecraft.errors import CheckpointError
from noisecraft.io.file_pages import FilePages

M = TypeVar("M", bound=nn.Module)


@contextmanager
def no_init() -> Iterator[None]:
    """``torch.nn.init``'s in-place initialisers (``normal_``, ``kaiming_uniform_``, ...)
    return their tensor untouched inside the block: for modules whose weights are assigned
    next (diffusers' ``no_init_weights`` does the same). Not thread-safe: it patches the
    ``torch.nn.init`` module for the block's duration."""
    init = torch.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(init, n) for n in names}

    def skip(tensor: Tensor, *args: object, **kwargs: object) -> Tensor:
        return tensor

    try:
        for n in names:
            setattr(init, n, skip)
        yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


def build_module(
    factory: Callable[[], M],
    state_dict: Mapping[str, Tensor],
    *,
    what: str,
    source: str | os.PathLike,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> M:
    """``factory()`` built on the meta device, then given ``state_dict`` as its parameters.

    * ``what`` / ``source`` name the part and the file in the one-line error raised when the
      weights do not fit the architecture (missing, unexpected or mis-shaped tensors).
    * Floating-point tensors are cast to ``dtype`` (None keeps them as stored) and every
      tensor is moved to ``device``, one tensor at a time, before it is assigned; a tensor
      copied out of a memory-mapped file has its file pages released (:class:`FilePages`).
    * Strict: every parameter and buffer must be in ``state_dict`` (the project's models have
      no non-persistent buffers, so nothing is left on the meta device).
    The module is returned in eval mode with ``requires_grad_(False)``.
    """
    with torch.device("meta"), no_init():
        module = factory()
    device = torch.device(device)
    pages = FilePages()
    tensors = {}
    for k, v in state_dict.items():
        cast = dtype if dtype is not None and v.is_floating_point() else v.dtype
        tensors[k] = v.to(device=device, dtype=cast)
        pages.release_copied(v, tensors[k])  # the file's copy of it leaves the RSS
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        first = _first_problem(str(e))
        raise CheckpointError(
            f"{source}: the {what} weights do not fit its architecture ({first})"
        ) from None
    return module.to(device).eval().requires_grad_(False)


def cast_floating_(module: M, dtype: torch.dtype) -> M:
    """``module.to(dtype=dtype)`` (floating-point parameters and buffers only, in place, the
    Parameter objects kept), tensor by tensor, releasing the file pages of each tensor that
    was a view of a memory-mapped file (:class:`FilePages`): a float32 file's U-Net cast to
    bfloat16 then holds the bfloat16 copy, not the copy and the file's pages."""
    pages = FilePages()
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                old = p.data
                p.data = old.to(dtype)
                pages.release_copied(old, p.data)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                m._buffers[name] = b.to(dtype)
                pages.release_copied(b, m._buffers[name])
    return module


def _first_problem(message: str) -> str:
    """The first concrete line of a ``load_state_dict`` error (e.g. a missing key)."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else lines[0]


__all__ = ["build_module", "cast_floating_", "no_init"]
