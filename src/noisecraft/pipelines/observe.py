"""Observing a text-to-image call from inside: cross-attention maps per prompt word, and
the latents every K steps.

An :class:`Observer` says what to record; :func:`~noisecraft.pipelines.generate.generate`
hands it to an :class:`AttentionRecorder` for each sampling run, which registers forward
pre-hooks on the U-Net's cross-attention modules (``transformer_blocks.K.attn2``) for the
run and removes them after. With no observer nothing is registered: the U-Net runs exactly
the code it runs without this module.

The maps are DAAM's (Tang et al. 2023, "What the DAAM: Interpreting Stable Diffusion Using
Cross Attention", sec. 3.1): for every cross-attention call, the attention probabilities
``softmax(q k^T / sqrt(d))`` of the conditional half of the CFG batch, averaged over heads,
each context position's (h, w) map upsampled (bicubic) to the latent size, summed over layers
and over the model calls of the observed steps; a word's map is the sum over its BPE pieces,
then min-max normalised to [0, 1].

The U-Net computes attention with SDPA, which never returns the probabilities, so the hook
computes ``q = to_q(x)``, ``k = to_k(context)`` and the softmax itself from the module's
inputs, on the conditional rows only. It returns nothing and writes nothing into the
module: the U-Net's output is bit-identical with and without it (tested).

The latents (``Observer(every=K)``) are read from the sampler's callback, which every
sampler calls after each step with its state ``x`` (k-diffusion's ``x = x0 + sigma * eps``)
and the denoiser's ``denoised``: a :class:`LatentRecorder` keeps, every K-th step, the DDPM
view ``x_t = x / sqrt(1 + sigma^2)`` (= ``sqrt(abar) x0 + sqrt(1 - abar) eps``, DDPM eq. 4
with ``sigma^2 = (1 - abar) / abar``) and the predicted x0, and the final latents last.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisecraft.errors import ConfigError
from noisecraft.nn.attention import CrossAttention, SpatialTransformer

__all__ = [
    "AttentionRecorder",
    "LatentRecorder",
    "LatentTrace",
    "Observation",
    "Observer",
    "attention_probs",
    "cross_attention_modules",
    "word_maps",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Observer:
    """What to record during a call: ``attention`` maps per prompt word (DAAM), over the
    sampler steps ``steps = (start, end)`` (0-based, end excluded, counted in each sampling
    run; None = all steps); ``every = K > 0``: the latents x_t and the predicted x0 after
    steps 0, K, 2K, ... and the final latents (0 = none)."""

    attention: bool = False
    steps: tuple[int, int] | None = None
    every: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.attention, bool):
            raise ConfigError(f"observe attention must be True or False, got {self.attention!r}")
        if not _is_int(self.every) or self.every < 0:
            raise ConfigError(
                f"observe every must be 0 (no latents) or a step count >= 1, got {self.every!r}",
                settings=["observe"],
            )
        if self.steps is not None:
            s = tuple(self.steps) if isinstance(self.steps, (tuple, list)) else None
            if s is None or len(s) != 2 or not all(_is_int(v) for v in s) or not 0 <= s[0] < s[1]:
                raise ConfigError(
                    f"the step range of @observe must be (start, end) with 0 <= start < end, "
                    f"got {self.steps!r}",
                    settings=["observe"],
                )
            object.__setattr__(self, "steps", s)


def cross_attention_modules(unet: nn.Module) -> list[tuple[SpatialTransformer, CrossAttention]]:
    """Each cross-attention module of ``unet`` (``attn2`` of every transformer block) with the
    :class:`SpatialTransformer` it is in (which knows the feature map's height and width)."""
    out = []
    for st in unet.modules():
        if isinstance(st, SpatialTransformer):
            out.extend((st, block.attn2) for block in st.transformer_blocks)
    return out


class AttentionRecorder:
    """Sums DAAM's per-position maps over the cross-attention calls of one sampling run.

    ``batch``: the images of the run (the conditional half of a CFG batch is its first
    ``batch`` rows); ``size``: the latents' (h, w); ``steps``: see :class:`Observer`.
    Use :meth:`watch` around the sampler and :meth:`on_step` from its callback; :attr:`sums`
    is then (batch, L, h, w) (None if no call was observed).
    """

    def __init__(self, batch: int, size: tuple[int, int], steps: tuple[int, int] | None = None):
        self.batch = batch
        self.size = size
        self.steps = steps
        self.step = 0
        self.sums: Tensor | None = None
        self.calls = 0

    def on_step(self, d: dict) -> None:
        """The sampler's callback after step ``d["i"]``: later calls belong to the next."""
        self.step = int(d["i"]) + 1

    def active(self) -> bool:
        return self.steps is None or self.steps[0] <= self.step < self.steps[1]

    @contextlib.contextmanager
    def watch(self, unet: nn.Module) -> Iterator[AttentionRecorder]:
        """Hooks on ``unet``'s cross-attention modules for the body of the ``with``."""
        handles = []
        try:
            for st, attn in cross_attention_modules(unet):
                cell: dict[str, tuple[int, int]] = {}
                handles.append(st.register_forward_pre_hook(_shape_hook(cell)))
                handles.append(attn.register_forward_pre_hook(self._hook(cell), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, cell: dict[str, tuple[int, int]]) -> Callable[..., None]:
        def hook(module: CrossAttention, args: tuple, kwargs: dict) -> None:
            if not self.active():
                return
            x = args[0]
            context = args[1] if len(args) > 1 else kwargs.get("context")
            hw = cell.get("hw")
            if context is None or hw is None:  # self-attention, or called outside its block
                return
            self.add(attention_probs(module, x[: self.batch], context[: self.batch]), hw)

        return hook

    def add(self, probs: Tensor, hw: tuple[int, int]) -> None:
        """Add one call's head-averaged probabilities (B, h*w, L) of a (h, w) feature map."""
        b, n, length = probs.shape
        maps = probs.transpose(1, 2).reshape(b, length, *hw).float()
        if tuple(hw) != tuple(self.size):
            maps = F.interpolate(maps, size=self.size, mode="bicubic", align_corners=False)
        self.sums = maps if self.sums is None else self.sums + maps
        self.calls += 1


def _shape_hook(cell: dict[str, tuple[int, int]]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple) -> None:
        cell["hw"] = tuple(args[0].shape[-2:])

    return hook


@torch.no_grad()
def attention_probs(
    module: CrossAttention, x: Tensor, context: Tensor, *, mean_heads: bool = True
) -> Tensor:
    """``softmax(q k^T / sqrt(d))`` of ``module`` on ``x`` (B, N, C) and ``context``
    (B, L, C'), averaged over heads: (B, N, L), float32 (Vaswani et al. 2017 eq. 1);
    ``mean_heads=False``: per head, (B, heads, N, L)."""
    heads = module.heads
    q = module.to_q(x).unflatten(-1, (heads, -1)).transpose(1, 2).float()
    k = module.to_k(context).unflatten(-1, (heads, -1)).transpose(1, 2).float()
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    probs = scores.softmax(dim=-1)
    return probs.mean(dim=1) if mean_heads else probs


@dataclass(frozen=True)
class LatentTrace:
    """One image's latents over a sampling run: ``steps`` (the step after which each row was
    taken; the final row is the number of steps run), ``sigmas`` (0 for the final row),
    ``xt`` and ``x0``, float32 (S, C, h, w) on the CPU (the final row: the result's latents
    in both)."""

    steps: list[int]
    sigmas: Tensor
    xt: Tensor
    x0: Tensor


class LatentRecorder:
    """A sampler callback keeping x_t (DDPM's view, module docstring) and the predicted x0 of
    every ``every``-th step of one run; :meth:`finish` adds the final latents and splits the
    run into one :class:`LatentTrace` per image."""

    def __init__(self, every: int):
        self.every = every
        self.steps: list[int] = []
        self.sigmas: list[float] = []
        self.xt: list[Tensor] = []
        self.x0: list[Tensor] = []

    def on_step(self, d: dict) -> None:
        i = int(d["i"])
        if i % self.every:
            return
        sigma = float(d["sigma"])
        self.steps.append(i)
        self.sigmas.append(sigma)
        self.xt.append((d["x"] / math.sqrt(1.0 + sigma**2)).detach().float().cpu())
        self.x0.append(d["denoised"].detach().float().cpu())

    def finish(self, final: Tensor, steps_run: int) -> list[LatentTrace]:
        """Add the final latents (B, C, h, w) as step ``steps_run``; one trace per image."""
        final = final.detach().float().cpu()
        xt = torch.stack([*self.xt, final], dim=1)  # (B, S, C, h, w)
        x0 = torch.stack([*self.x0, final], dim=1)
        sigmas = torch.tensor([*self.sigmas, 0.0])
        steps = [*self.steps, steps_run]
        return [LatentTrace(steps, sigmas, xt[j], x0[j]) for j in range(final.shape[0])]


class Observation:
    """What an :class:`Observer` recorded in one :func:`generate` call.

    ``attention``: per image, the summed maps (L, h, w) of every context position (None for
    an image no cross-attention call was observed for, e.g. a step range past the end);
    ``latents``: per image, a :class:`LatentTrace` (empty unless the observer's ``every``).
    :meth:`run` is what ``generate`` opens around each sampling run; :meth:`final` takes the
    run's final latents.
    """

    def __init__(self, observer: Observer):
        self.observer = observer
        self.attention: list[Tensor | None] = []
        self.latents: list[LatentTrace] = []
        self._latents: LatentRecorder | None = None

    @contextlib.contextmanager
    def run(
        self, unet: nn.Module, batch: int, size: tuple[int, int]
    ) -> Iterator[Callable[[dict], None] | None]:
        """Record a run of ``batch`` images with latents of ``size``; yields the callback
        the sampler must call after each step (None when nothing is recorded)."""
        watchers: list[Callable[[dict], None]] = []
        self._latents = LatentRecorder(self.observer.every) if self.observer.every else None
        if self._latents is not None:
            watchers.append(self._latents.on_step)
        if not self.observer.attention:
            yield _all(watchers)
            self.attention.extend([None] * batch)
            return
        recorder = AttentionRecorder(batch, size, self.observer.steps)
        with recorder.watch(unet):
            yield _all([recorder.on_step, *watchers])
        sums = recorder.sums
        self.attention.extend([None] * batch if sums is None else list(sums.cpu()))

    def final(self, latents: Tensor, steps_run: int) -> None:
        """The run's final latents (after ``steps_run`` steps), before decoding."""
        if self._latents is not None:
            self.latents.extend(self._latents.finish(latents, steps_run))
            self._latents = None


def _all(watchers: list[Callable[[dict], None]]) -> Callable[[dict], None] | None:
    if not watchers:
        return None
    if len(watchers) == 1:
        return watchers[0]

    def cb(d: dict) -> None:
        for w in watchers:
            w(d)

    return cb


def word_maps(sums: Tensor, positions: list[tuple[int, ...]]) -> Tensor:
    """(n_words, h, w) maps from the summed per-position maps ``sums`` (L, h, w): each word's
    positions summed, negative bicubic overshoot cut at 0, then min-max normalised to
    [0, 1] per word (a flat map is all 0)."""
    out = torch.stack([sums[list(p)].sum(dim=0) for p in positions]) if positions else None
    if out is None:
        return sums.new_zeros((0, *sums.shape[-2:]))
    out = out.clamp(min=0)
    lo = out.amin(dim=(-2, -1), keepdim=True)
    span = out.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (out - lo) / span.clamp(min=1e-30), torch.zeros_like(out))
