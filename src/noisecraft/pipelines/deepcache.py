"""DeepCache: reuse the deep U-Net features across denoiser calls (Ma et al. 2023).

"DeepCache: Accelerating Diffusion Models for Free" (Ma, Fang & Wang, CVPR 2024), sec. 3.2-3.3:
the high-level features of the U-Net's up-path change little between adjacent steps, so on a
*cache* call the full U-Net runs and the feature map entering the last ``branch`` output
blocks is kept; on the next ``interval - 1`` calls only the shallow branch runs -- the first
``branch`` input blocks (whose outputs are the skips those output blocks need), then the last
``branch`` output blocks on ``cat([cached, skip])`` and the output head -- and the cached
deep feature stands in for everything below (eq. 3 / "uniform 1:N" caching).

Counting. The cache is keyed by the **U-Net call (NFE)**, not by sampler step: call ``k``
(from 0, per sampling run) is a full pass when ``k % interval == 0``. A first-order sampler
(Euler, DDIM, DPM++ 2M, ...) calls once per step, so ``interval=2`` is "full, shallow, full,
...". Heun / DPM2 call twice per step (predictor and corrector): with ``interval=2`` every
predictor is full and every corrector shallow. With classifier-free guidance the conditional
and unconditional halves are one batch (:class:`~noisecraft.diffusion.CFGDenoiser`), so both
halves are cached together. A call whose input does not match the cached feature (another
batch or size) is a full pass and restarts the count.

``branch`` = ``b``: input blocks ``0..b-1`` and output blocks ``K-b..K-1`` (``K`` =
``len(unet.input_blocks)``) run on shallow calls. ``b = 1`` is the paper's shallowest branch
(the input conv and the last up block at full resolution); larger ``b`` is slower and closer
to the full U-Net. ``interval = 1`` runs the full U-Net on every call and gives exactly the
plain U-Net's output.

The U-Net itself is not changed: :func:`deepcache_forward` calls its blocks (the same loop as
:meth:`~noisecraft.models.unet.UNet.forward`), and :func:`deepcache` installs it for the
duration of a ``with`` block (one sampling run), as an instance attribute over ``forward``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from noisecraft.errors import ConfigError
from noisecraft.models.unet import UNet
from noisecraft.pipelines.compile import is_compiled


@dataclass(frozen=True)
class DeepCacheConfig:
    """``interval`` N: one full U-Net pass every N calls (1 = off, exact); ``branch`` b: how
    many input / output blocks at the top of the U-Net run on the cached calls (>= 1)."""

    interval: int = 2
    branch: int = 1

    def __post_init__(self) -> None:
        for name in ("interval", "branch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"DeepCache {name} must be a positive integer, got {value!r}")


@dataclass
class DeepCacheState:
    """The running state of one sampling run: U-Net calls so far, how many ran in full,
    shallow calls since the last full one, and the cached feature with its input's key."""

    config: DeepCacheConfig
    calls: int = 0
    full_calls: int = 0
    since_full: int = 0
    feature: Tensor | None = field(default=None, repr=False)
    key: tuple | None = None

    @property
    def shallow_calls(self) -> int:
        return self.calls - self.full_calls


def check_branch(unet: UNet, branch: int) -> None:
    """Raise :class:`ConfigError` if ``branch`` is not in ``1..len(input_blocks) - 1``."""
    k = len(unet.input_blocks)
    if not 1 <= branch <= k - 1:
        raise ConfigError(
            f"DeepCache branch {branch} does not fit this U-Net: choose 1..{k - 1} "
            f"(it has {k} input blocks)"
        )


def deepcache_forward(
    unet: UNet,
    state: DeepCacheState,
    x: Tensor,
    t: Tensor,
    class_labels: Tensor | None = None,
    context: Tensor | None = None,
    *,
    down_residuals: Sequence[Tensor] | None = None,
    mid_residual: Tensor | None = None,
) -> Tensor:
    """:meth:`UNet.forward` with DeepCache (module docstring); same arguments and output.

    ControlNet residuals: on shallow calls only the residuals of the skips that the branch
    uses are added (the deep ones and ``mid_residual`` act through the cached feature)."""
    unet._check(x, class_labels, context)
    cfg = state.config
    b = cfg.branch
    check_branch(unet, b)
    emb = unet.embedding(x, t, class_labels)
    k = len(unet.input_blocks)
    key = (tuple(x.shape), x.dtype, x.device)
    full = (
        cfg.interval == 1
        or state.feature is None
        or state.key != key
        or state.since_full + 1 >= cfg.interval
    )
    state.calls += 1
    state.since_full = 0 if full else state.since_full + 1
    if down_residuals is not None and len(down_residuals) != k:
        raise ConfigError(f"expected {k} down residuals, got {len(down_residuals)}")

    hs = []
    h = x
    blocks = unet.input_blocks if full else unet.input_blocks[:b]
    for block in blocks:
        h = block(h, emb, context)
        hs.append(h)
    if down_residuals is not None:
        hs = [a + r for a, r in zip(hs, down_residuals, strict=False)]
    if full:
        state.full_calls += 1
        h = unet.middle_block(h, emb, context)
        if mid_residual is not None:
            h = h + mid_residual
        for block in unet.output_blocks[: k - b]:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        if cfg.interval > 1:
            state.feature, state.key = h, key
    else:
        h = state.feature
    for block in unet.output_blocks[k - b :]:
        h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
    return unet.out(h)


@contextmanager
def deepcache(unet: UNet, config: DeepCacheConfig) -> Iterator[DeepCacheState]:
    """Within the block, ``unet(...)`` runs :func:`deepcache_forward` with a fresh state
    (yielded, to read the call counts); the plain forward is restored on exit."""
    check_branch(unet, config.branch)
    if is_compiled(unet):
        raise ConfigError(
            "--fast (DeepCache) and --compile do not mix: DeepCache calls the U-Net's blocks "
            "directly, so the compiled forward would never run; drop one of them"
        )
    if "forward" in vars(unet):
        raise ConfigError("this U-Net already runs with DeepCache (nested deepcache blocks)")
    state = DeepCacheState(config)

    def forward(*args: Any, **kwargs: Any) -> Tensor:
        return deepcache_forward(unet, state, *args, **kwargs)

    unet.forward = forward  # type: ignore[method-assign]
    try:
        yield state
    finally:
        del unet.forward
        state.feature = None


__all__ = [
    "DeepCacheConfig",
    "DeepCacheState",
    "check_branch",
    "deepcache",
    "deepcache_forward",
]
