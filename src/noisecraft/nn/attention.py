"""Attention over the pixels of a feature map, all through ``scaled_dot_product_attention``.

Two blocks, named as the checkpoints that use them:

* :class:`AttentionBlock` - improved-diffusion / guided-diffusion pixel self-attention
  (``norm``, ``qkv``, ``proj_out``).
* :class:`SpatialTransformer` - Stable Diffusion 1.x / 2.x (LDM): project in, transformer
  blocks with self-attention, cross-attention on a ``context`` and a GEGLU feed-forward,
  project out (``norm``, ``proj_in``, ``transformer_blocks.K.{attn1,attn2,ff,norm1..3}``,
  ``proj_out``).

Attention itself is ``softmax(q k^T / sqrt(d)) v`` (Vaswani et al. 2017 eq. 1), one SDPA call
over all heads at once (no Python loop over heads).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from noisecraft.errors import ConfigError
from noisecraft.nn.resnet import group_norm


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
        h = F.scaled_dot_product_attention(q, k, v)
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
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, N, d)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020 eq. 6): ``a * gelu(b)`` with ``[a, b] = proj(x)``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """``net.0`` GEGLU to ``mult * dim``, ``net.1`` dropout, ``net.2`` linear back to ``dim``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = mult * dim
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


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
            self.proj_in: nn.Module = nn.Linear(channels, inner)
            self.proj_out: nn.Module = _zero(nn.Linear(inner, channels))
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = _zero(nn.Conv2d(inner, channels, 1))
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
