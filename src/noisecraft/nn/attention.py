"""Attention over the pixels of a feature map, all through ``scaled_dot_product_attention``.

Two blocks, named as the checkpoints that use them:

* :class:`AttentionBlock` - improved-diffusion / guided-diffusion pixel self-attention
  (``norm``, ``qkv``, ``proj_out``).
* :class:`SpatialTransformer` - Stable Diffusion 1.x / 2.x (LDM): project in, transformer
  blocks with self-attention, cross-attention on a ``context`` and a GEGLU feed-forward,
  project out (``norm``, ``proj_in``, ``transformer_blocks.K.{attn1,attn2,ff,norm1..3}``,
  ``proj_out``).

Attention itself is ``softmax(q k^T / sqrt(d)) v`` (Vaswani et al. 2017 eq. 1), one SDPA call
over all heads at once (no Python loop over heads), made by :func:`attention`.

Attention slicing
-----------------
The attention matrix of one call holds ``batch * heads * Lq * Lk`` numbers: at Stable Diffusion
1.5's first U-Net level for a 512x512 image (4096 tokens, 8 heads, batch 2 with CFG) that is
1 GiB in float32, 5 GiB at 768x768. Whether it is ever allocated depends on SDPA's kernel:

* **CPU** (torch 2.13): ``F.scaled_dot_product_attention`` runs a fused, flash-style kernel for
  float32, float16, bfloat16 and float64 that never materialises the matrix. Measured peak
  RSS above the inputs for q, k, v of shape (2, 8, 4096, 40) (``bench/memory.py --sdpa``):
  20 MiB, of which 10 MiB is the output, for a 1 GiB matrix; (2, 8, 9216, 40): 33 MiB (5 GiB
  matrix); the VAE's mid-block attention at 512x512, (1, 1, 4096, 512): 19 MiB. SDPA's
  unfused ``SDPBackend.MATH`` kernel peaks at 2333 MiB for the first case (the scores, their
  softmax), and at 344 MiB sliced with a 128 MiB budget.
* **CUDA**: the flash and memory-efficient kernels do not materialise it either; the math
  kernel does, and SDPA falls back to it for some inputs (dtypes, masks, head sizes, GPUs).

So slicing is **off by default** (SDPA picks its kernel, as before). With one switch,
:func:`set_attention_slicing` (or the :func:`attention_slicing` context manager for a block of
code), a call whose matrix exceeds ``budget_bytes`` is computed in query chunks: rows
``i:j`` of the output are ``SDPA(q[..., i:j, :], k, v)``, each chunk's matrix within the
budget. Each output row depends only on its own query row, so the result is the unsliced one
up to float rounding. ``slice_size`` forces chunks of that many query rows instead. The budget
bounds one chunk's matrix; an unfused kernel holds two or three matrices of that size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisecraft.errors import ConfigError
from noisecraft.nn.kernels import Conv2d, Linear
from noisecraft.nn.resnet import group_norm


@dataclass(frozen=True)
class AttentionSlicing:
    """When and how :func:`attention` cuts a call into query chunks.

    * ``budget_bytes``: slice calls whose attention matrix (``batch * heads * Lq * Lk``
      elements of the query's dtype) is larger than this, into chunks whose matrix fits it
      (at least one query row per chunk). None = no budget.
    * ``slice_size``: always use chunks of this many query rows (wins over the budget).
    Both None (the default) = never slice.
    """

    budget_bytes: int | None = None
    slice_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("budget_bytes", "slice_size"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"attention slicing {name} must be a positive integer or None")

    def rows(self, q: Tensor, k: Tensor) -> int | None:
        """Query rows per chunk for ``q`` (..., Lq, d) against ``k`` (..., Lk, d); None = one
        unsliced call."""
        lq, lk = q.shape[-2], k.shape[-2]
        if self.slice_size is not None:
            return self.slice_size if self.slice_size < lq else None
        if self.budget_bytes is None:
            return None
        batch_heads = q.numel() // max(lq * q.shape[-1], 1)
        row_bytes = batch_heads * lk * q.element_size()  # one query row of the matrix
        if row_bytes * lq <= self.budget_bytes:
            return None
        return max(1, self.budget_bytes // max(row_bytes, 1))


_SLICING = AttentionSlicing()


def set_attention_slicing(
    budget_bytes: int | None = None, *, slice_size: int | None = None
) -> AttentionSlicing:
    """Set THE process-wide attention slicing switch; returns the previous setting.

    ``set_attention_slicing(512 * 2**20)`` slices every attention call whose matrix exceeds
    512 MiB; ``set_attention_slicing(slice_size=1024)`` forces 1024-query chunks;
    ``set_attention_slicing()`` turns slicing off (the default). See the module docstring for
    when it saves memory (not with CPU SDPA, which is already fused).
    """
    global _SLICING
    previous = _SLICING
    _SLICING = AttentionSlicing(budget_bytes, slice_size)
    return previous


def get_attention_slicing() -> AttentionSlicing:
    """The current setting of :func:`set_attention_slicing`."""
    return _SLICING


@contextlib.contextmanager
def attention_slicing(
    budget_bytes: int | None = None, *, slice_size: int | None = None
) -> Iterator[AttentionSlicing]:
    """:func:`set_attention_slicing` for the body of a ``with`` block, then the previous one."""
    previous = set_attention_slicing(budget_bytes, slice_size=slice_size)
    try:
        yield _SLICING
    finally:
        set_attention_slicing(previous.budget_bytes, slice_size=previous.slice_size)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for (..., L, d) tensors, sliced over queries when the
    :func:`set_attention_slicing` switch asks for it (module docstring); SDPA otherwise."""
    rows = _SLICING.rows(q, k)
    if rows is None:
        return F.scaled_dot_product_attention(q, k, v)
    lq = q.shape[-2]
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    for i in range(0, lq, rows):
        out[..., i : i + rows, :] = F.scaled_dot_product_attention(q[..., i : i + rows, :], k, v)
    return out


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def resolve_heads(channels: int, num_heads: int, head_channels: int) -> tuple[int, int]:
    """(heads, channels per head) for a layer of ``channels``.

    ``head_channels != -1`` wins (heads = channels / head_channels, as SD 2.x with 64);
    otherwise ``num_heads`` heads of ``channels / num_heads`` (as SD 1.x with 8 heads).
    """
    if head_channels != -1:
        if head_channels <= 0 or channels % head_channels:
            raise ConfigError(
                f"head_channels={head_channels} must divide the {channels} channels of an "
                f"attention layer; choose a divisor or set head_channels=-1 and use num_heads"
            )
        return channels // head_channels, head_channels
    if num_heads <= 0 or channels % num_heads:
        raise ConfigError(
            f"num_heads={num_heads} must divide the {channels} channels of an attention layer; "
            f"choose a divisor or set head_channels"
        )
    return num_heads, channels // num_heads


class AttentionBlock(nn.Module):
    """Multi-head self-attention among all H*W positions, with a residual connection.

    ``qkv`` is a 1x1 Conv1d to 3*C channels laid out head-major, as improved-diffusion's
    AttentionBlock (guided-diffusion's "legacy" order): the (B, 3C, T) output is read as
    (B*heads, 3*ch, T) and each head's slice split into q, k, v. ``proj_out`` starts at zero.
    """

    def __init__(
        self, channels: int, num_heads: int = 1, head_channels: int = -1, norm_groups: int = 32
    ):
        super().__init__()
        self.heads, self.head_dim = resolve_heads(channels, num_heads, head_channels)
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        qkv = qkv.reshape(b, self.heads, 3 * self.head_dim, -1).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)  # each (B, heads, T, ch)
        h = attention(q, k, v)
        h = self.proj_out(h.transpose(-1, -2).reshape(b, c, -1))
        return (x + h).reshape(b, c, *spatial)


class CrossAttention(nn.Module):
    """Multi-head attention of a token sequence on ``context`` (itself when None).

    LDM / diffusers names: ``to_q``, ``to_k``, ``to_v`` (no bias), ``to_out.0`` (with bias).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, N, d)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020 eq. 6): ``a * gelu(b)`` with ``[a, b] = proj(x)``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


#: Without autograd, :class:`FeedForward` runs on chunks of tokens whose GEGLU projection
#: (``2 * mult * dim`` numbers per token) fits in this many bytes.
FEED_FORWARD_CHUNK_BYTES = 16 * 2**20


class FeedForward(nn.Module):
    """``net.0`` GEGLU to ``mult * dim``, ``net.1`` dropout, ``net.2`` linear back to ``dim``.

    The network acts on each token alone, so without autograd it runs on chunks of tokens
    (:data:`FEED_FORWARD_CHUNK_BYTES` of GEGLU projection each; the result is the unchunked
    one up to float rounding), diffusers' "feed-forward chunking". At 512x512 SD 1.5's first
    level (8192 tokens of width 320, CFG batch 2) the projection, its GELU and the product
    hold 160 MiB at once unchunked, 32 MiB chunked.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = mult * dim
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        proj = self.net[0].proj.out_features
        rows = max(1, FEED_FORWARD_CHUNK_BYTES // (proj * x.element_size()))
        n = x.shape[:-1].numel()
        if n <= rows or torch.is_grad_enabled():
            return self.net(x)
        flat = x.reshape(n, x.shape[-1])
        out = flat.new_empty((n, self.net[2].out_features))
        for i in range(0, n, rows):
            out[i : i + rows] = self.net(flat[i : i + rows])
        return out.reshape(*x.shape[:-1], -1)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on ``context``, feed-forward.

    ``x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))`` (LDM).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM's transformer over the pixels of a feature map (Rombach et al. 2022 sec. 3.3).

    GroupNorm (eps 1e-6), ``proj_in`` (1x1 conv for SD 1.x, linear for SD 2.x with
    ``use_linear``), ``depth`` :class:`BasicTransformerBlock` s on the (B, H*W, C) tokens,
    ``proj_out`` (zero-initialised), plus the input. ``context`` is (B, L, context_dim).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        *,
        depth: int = 1,
        context_dim: int | None = None,
        use_linear: bool = False,
        norm_groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = group_norm(channels, norm_groups, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = Linear(channels, inner)
            self.proj_out: nn.Module = _zero(Linear(inner, channels))
        else:
            self.proj_in = Conv2d(channels, inner, 1)
            self.proj_out = _zero(Conv2d(inner, channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout)
            for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
