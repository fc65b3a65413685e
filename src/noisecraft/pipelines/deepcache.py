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

The U-Net runs its own block loop: :class:`DeepCacheState` is the
:class:`~noisecraft.models.unet.FeatureCache` that ``UNet.forward(..., cache=state)`` asks,
once per call, whether to run shallow (and with which feature), and hands the deep feature of
each full call. :func:`deepcache` passes a fresh state to every call of the U-Net for the
duration of a ``with`` block (one sampling run), through a forward pre-hook.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

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
    _pending: tuple | None = field(default=None, repr=False)

    @property
    def shallow_calls(self) -> int:
        return self.calls - self.full_calls

    @property
    def branch(self) -> int:
        return self.config.branch

    def reuse(self, x: Tensor) -> Tensor | None:
        """Count this call; the cached feature if it is a shallow one, else None (a full
        call: the first, one whose input has another shape / dtype / device than the cached
        feature's, and every ``interval``-th)."""
        key = (tuple(x.shape), x.dtype, x.device)
        full = (
            self.config.interval == 1
            or self.feature is None
            or self.key != key
            or self.since_full + 1 >= self.config.interval
        )
        self.calls += 1
        if full:
            self.full_calls += 1
            self.since_full = 0
            self._pending = key
            return None
        self.since_full += 1
        return self.feature

    def store(self, feature: Tensor) -> None:
        """Keep the deep feature of a full call (not with ``interval`` 1: never reused)."""
        if self.config.interval > 1:
            self.feature, self.key = feature, self._pending


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
    """``unet(...)`` with DeepCache (module docstring): ``UNet.forward`` with ``cache=state``.

    ControlNet residuals: on shallow calls only the residuals of the skips that the branch
    uses are added (the deep ones and ``mid_residual`` act through the cached feature)."""
    check_branch(unet, state.config.branch)
    return unet(
        x,
        t,
        class_labels,
        context,
        down_residuals=down_residuals,
        mid_residual=mid_residual,
        cache=state,
    )


class _PassCache:
    """Forward pre-hook that gives every call of the U-Net ``cache=state`` (unless the call
    names a cache itself)."""

    def __init__(self, state: DeepCacheState):
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {"cache": self.state, **kwargs}


@contextmanager
def deepcache(unet: UNet, config: DeepCacheConfig) -> Iterator[DeepCacheState]:
    """Within the block, every ``unet(...)`` call gets ``cache=state``, one fresh
    :class:`DeepCacheState` for the block (yielded, to read the call counts); on exit the
    hook is removed and the cached feature dropped."""
    check_branch(unet, config.branch)
    if is_compiled(unet):
        raise ConfigError(
            "@fast (DeepCache) and @compile do not mix: DeepCache changes which U-Net "
            "blocks run from call to call, which a compiled graph does not follow; drop one",
            settings=["fast", "compile"],
        )
    if any(isinstance(h, _PassCache) for h in unet._forward_pre_hooks.values()):
        raise ConfigError("this U-Net already runs with DeepCache (nested deepcache blocks)")
    state = DeepCacheState(config)
    handle: RemovableHandle = unet.register_forward_pre_hook(_PassCache(state), with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()
        state.feature = None


__all__ = [
    "DeepCacheConfig",
    "DeepCacheState",
    "check_branch",
    "deepcache",
    "deepcache_forward",
]
