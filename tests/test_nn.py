"""Building blocks of the U-Net against closed forms and naive implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding

from helpers import jitter
from noisecraft.errors import ConfigError
from noisecraft.nn import (
    AttentionBlock,
    Downsample,
    ResBlock,
    SpatialTransformer,
    Upsample,
    kernels,
    norm_groups_for,
    resolve_heads,
    timestep_embedding,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast, and immune to OpenMP stalls on a shared 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- timestep embedding


def test_timestep_embedding_closed_form():
    # emb[k] = cos(t * 10000^(-k/half)), emb[half + k] = sin(...), computed in float64.
    t = torch.tensor([0.0, 1.0, 2.5, 17.25, 999.0])
    dim, half = 10, 5
    emb = timestep_embedding(t, dim)
    freqs = torch.tensor([10000.0 ** (-k / half) for k in range(half)], dtype=torch.float64)
    args = t.double()[:, None] * freqs
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    assert emb.shape == (5, dim) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.double(), expected, atol=2e-4, rtol=0)
    assert torch.equal(emb[0], torch.tensor([1.0] * half + [0.0] * half))


def test_timestep_embedding_flip_shift_and_odd_dim_match_diffusers():
    t = torch.tensor([3.0, 250.5, 981.0])
    for flip in (True, False):
        for shift in (0.0, 1.0):
            ours = timestep_embedding(t, 16, flip_sin_to_cos=flip, freq_shift=shift)
            ref = get_timestep_embedding(t, 16, flip_sin_to_cos=flip, downscale_freq_shift=shift)
            torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    sin_first = timestep_embedding(t, 16, flip_sin_to_cos=False)
    cos_first = timestep_embedding(t, 16)
    assert torch.equal(sin_first, torch.cat([cos_first[:, 8:], cos_first[:, :8]], dim=1))
    odd = timestep_embedding(t, 9)
    assert odd.shape == (3, 9) and torch.equal(odd[:, -1], torch.zeros(3))
    torch.testing.assert_close(odd[:, :8], timestep_embedding(t, 8))


def test_timestep_embedding_fractional_t_is_continuous():
    # every entry is cos/sin(t * f) with f <= 1, so |emb(t + h) - emb(t)| <= h
    t = torch.linspace(0.0, 50.0, 2001)
    emb = timestep_embedding(t, 32)
    step = (emb[1:] - emb[:-1]).abs().max().item()
    assert step <= (50.0 / 2000) + 1e-5
    mid = timestep_embedding(torch.tensor([10.5]), 32)
    assert not torch.allclose(mid, timestep_embedding(torch.tensor([10.0]), 32))
    assert not torch.allclose(mid, timestep_embedding(torch.tensor([11.0]), 32))
    # 0-d input is a batch of one; integer timesteps equal the same float ones
    assert torch.equal(
        timestep_embedding(torch.tensor(7), 8), timestep_embedding(t.new_tensor([7.0]), 8)
    )


# ---------------------------------------------------------------- norms, heads


def test_norm_groups_rule():
    assert norm_groups_for(64, 32) == 32
    assert norm_groups_for(8, 32) == 8  # fewer channels than groups: one channel per group
    with pytest.raises(ConfigError, match="norm_groups=32"):
        norm_groups_for(48, 32)


def test_resolve_heads():
    assert resolve_heads(320, 8, -1) == (8, 40)  # SD 1.x
    assert resolve_heads(640, 8, 64) == (10, 64)  # SD 2.x: head_channels wins
    with pytest.raises(ConfigError, match="num_heads=3"):
        resolve_heads(64, 3, -1)
    with pytest.raises(ConfigError, match="head_channels=24"):
        resolve_heads(64, 4, 24)


# ---------------------------------------------------------------- ResBlock, resampling


def _naive_resblock(block: ResBlock, x, emb, groups):
    w = dict(block.named_parameters())
    h = F.conv2d(
        F.silu(F.group_norm(x, groups, w["in_layers.0.weight"], w["in_layers.0.bias"])),
        w["in_layers.2.weight"],
        w["in_layers.2.bias"],
        padding=1,
    )
    e = F.linear(F.silu(emb), w["emb_layers.1.weight"], w["emb_layers.1.bias"])[..., None, None]
    if block.use_scale_shift_norm:
        scale, shift = e.chunk(2, dim=1)
        h = F.group_norm(h, groups, w["out_layers.0.weight"], w["out_layers.0.bias"])
        h = h * (1 + scale) + shift
    else:
        h = F.group_norm(h + e, groups, w["out_layers.0.weight"], w["out_layers.0.bias"])
    h = F.conv2d(F.silu(h), w["out_layers.3.weight"], w["out_layers.3.bias"], padding=1)
    skip = F.conv2d(x, w["skip_connection.weight"], w["skip_connection.bias"])
    return skip + h


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_matches_naive(scale_shift):
    torch.manual_seed(0)
    block = jitter(
        ResBlock(8, 12, 16, norm_groups=4, use_scale_shift_norm=scale_shift), std=0.1, freeze=False
    )
    x, emb = torch.randn(2, 8, 6, 5), torch.randn(2, 12)
    torch.testing.assert_close(block(x, emb), _naive_resblock(block, x, emb, 4))


def test_resblock_starts_as_identity_and_resamples():
    block = ResBlock(8, 12, norm_groups=4)
    x, emb = torch.randn(2, 8, 6, 4), torch.randn(2, 12)
    assert torch.equal(block(x, emb), x)  # zero-initialised last conv, identity skip
    up = ResBlock(8, 12, norm_groups=4, up=True)
    down = ResBlock(8, 12, 16, norm_groups=4, down=True)
    assert up(x, emb).shape == (2, 8, 12, 8)
    assert down(x, emb).shape == (2, 16, 3, 2)
    torch.testing.assert_close(up(x, emb), F.interpolate(x, scale_factor=2.0))


def test_down_and_upsample():
    x = torch.randn(1, 4, 6, 8)
    assert Downsample(4, 6).op.stride == (2, 2)
    assert Downsample(4, 6)(x).shape == (1, 6, 3, 4)
    torch.testing.assert_close(Downsample(4, use_conv=False)(x), F.avg_pool2d(x, 2))
    up = Upsample(4)
    ref = up.conv(x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    torch.testing.assert_close(up(x), ref)


def test_odd_sides_halve_to_ceil_and_come_back():
    """An odd side n: the stride-2 conv and the pooling give ceil(n / 2) (the pooling's last
    window averages the one row it covers); upsampling to (n, m) is the 2x map cropped."""
    x = torch.randn(1, 4, 7, 6)
    assert Downsample(4)(x).shape == (1, 4, 4, 3)
    pooled = Downsample(4, use_conv=False)(x)
    torch.testing.assert_close(pooled[..., :3, :], F.avg_pool2d(x, 2))
    torch.testing.assert_close(pooled[..., 3, :], (x[..., 6, 0::2] + x[..., 6, 1::2]) / 2)
    plain = Upsample(4, use_conv=False)
    small = torch.randn(1, 4, 4, 3)
    doubled = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(plain(small, (7, 5)), doubled[..., :7, :5])
    emb = torch.randn(1, 12)
    up = jitter(ResBlock(4, 12, norm_groups=4, up=True), std=0.1)
    down = ResBlock(4, 12, norm_groups=4, down=True)
    assert down(x, emb).shape == (1, 4, 4, 3)
    assert up(small, emb, (7, 6)).shape == (1, 4, 7, 6)
    assert up(small, emb).shape == (1, 4, 8, 6)


# ---------------------------------------------------------------- attention


def _naive_attention(q, k, v):
    """Per-head softmax(q k^T / sqrt(d)) v with explicit einsums; (B, H, N, d) tensors."""
    w = torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnm,bhmd->bhnd", w.softmax(dim=-1), v)


@pytest.mark.parametrize(("heads", "head_channels"), [(1, -1), (4, -1), (1, 4)])
def test_attention_block_matches_naive(heads, head_channels):
    torch.manual_seed(0)
    c = 16
    block = jitter(AttentionBlock(c, heads, head_channels, norm_groups=4), std=0.1, freeze=False)
    x = torch.randn(2, c, 5, 3)
    w = dict(block.named_parameters())
    flat = x.reshape(2, c, 15)
    h = F.group_norm(flat, 4, w["norm.weight"], w["norm.bias"])
    qkv = torch.einsum("oc,bct->bot", w["qkv.weight"][..., 0], h) + w["qkv.bias"][:, None]
    n_heads, ch = block.heads, block.head_dim
    assert n_heads * ch == c
    # improved-diffusion layout: per head, [q | k | v] of ch channels each
    qkv = qkv.reshape(2, n_heads, 3, ch, 15)
    q, k, v = (qkv[:, :, i].transpose(-1, -2) for i in range(3))
    a = _naive_attention(q, k, v).transpose(-1, -2).reshape(2, c, 15)
    out = torch.einsum("oc,bct->bot", w["proj_out.weight"][..., 0], a) + w["proj_out.bias"][:, None]
    expected = (flat + out).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    # channels_last input gives the same result
    torch.testing.assert_close(block(x.to(memory_format=torch.channels_last)), expected)


def _naive_cross_attention(attn, x, context, heads):
    w = dict(attn.named_parameters())
    q, k, v = x @ w["to_q.weight"].T, context @ w["to_k.weight"].T, context @ w["to_v.weight"].T
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    o = _naive_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return o @ w["to_out.0.weight"].T + w["to_out.0.bias"]


def _naive_spatial_transformer(st: SpatialTransformer, x, context, heads, groups):
    w = dict(st.named_parameters())
    b, c, hh, ww = x.shape
    h = F.group_norm(x, groups, w["norm.weight"], w["norm.bias"], eps=1e-6)
    h = h.reshape(b, c, hh * ww).transpose(1, 2)  # (B, HW, C)
    proj_in = w["proj_in.weight"].reshape(c, c)
    h = h @ proj_in.T + w["proj_in.bias"]
    for blk in st.transformer_blocks:
        n1, n2, n3 = blk.norm1, blk.norm2, blk.norm3
        z = F.layer_norm(h, (c,), n1.weight, n1.bias)
        h = h + _naive_cross_attention(blk.attn1, z, z, heads)  # self-attention
        h = h + _naive_cross_attention(
            blk.attn2, F.layer_norm(h, (c,), n2.weight, n2.bias), context, heads
        )
        z = F.layer_norm(h, (c,), n3.weight, n3.bias)
        proj = blk.ff.net[0].proj
        a, gate = (z @ proj.weight.T + proj.bias).chunk(2, dim=-1)
        h = h + (a * F.gelu(gate)) @ blk.ff.net[2].weight.T + blk.ff.net[2].bias
    h = h @ w["proj_out.weight"].reshape(c, c).T + w["proj_out.bias"]
    return h.transpose(1, 2).reshape(b, c, hh, ww) + x


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_matches_naive(use_linear):
    torch.manual_seed(0)
    c, heads, ctx_dim = 16, 4, 12
    st = SpatialTransformer(
        c, heads, c // heads, depth=2, context_dim=ctx_dim, use_linear=use_linear, norm_groups=4
    )
    jitter(st, std=0.1, freeze=False)
    x, context = torch.randn(2, c, 4, 3), torch.randn(2, 7, ctx_dim)
    expected = _naive_spatial_transformer(st, x, context, heads, 4)
    torch.testing.assert_close(st(x, context), expected, atol=1e-5, rtol=1e-5)
    # the context matters (cross-attention is wired) and the block starts as the identity
    assert not torch.allclose(st(x, torch.randn(2, 7, ctx_dim)), expected)
    fresh = SpatialTransformer(
        c, heads, c // heads, context_dim=ctx_dim, use_linear=use_linear, norm_groups=4
    )
    assert torch.equal(fresh(x, context), x)


def test_spatial_transformer_sd_parameter_names():
    st = SpatialTransformer(32, 4, 8, context_dim=12, norm_groups=8)
    names = set(dict(st.named_parameters()))
    for n in (
        "norm.weight",
        "proj_in.weight",
        "proj_out.bias",
        "transformer_blocks.0.attn1.to_q.weight",
        "transformer_blocks.0.attn2.to_k.weight",
        "transformer_blocks.0.attn2.to_v.weight",
        "transformer_blocks.0.attn2.to_out.0.bias",
        "transformer_blocks.0.ff.net.0.proj.weight",
        "transformer_blocks.0.ff.net.2.weight",
        "transformer_blocks.0.norm3.bias",
    ):
        assert n in names
    assert "transformer_blocks.0.attn1.to_q.bias" not in names
    assert st.transformer_blocks[0].attn2.to_k.in_features == 12


# ---------------------------------------------------------------- CPU fast kernels


def _fast_available() -> bool:
    x = torch.randn(2, 3)
    with torch.no_grad():
        return kernels._fast(x, x)


needs_onednn = pytest.mark.skipif(not _fast_available(), reason="no oneDNN ops in this torch")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_fast_linear_equals_f_linear(bias):
    torch.manual_seed(0)
    w, b = torch.randn(24, 16), (torch.randn(24) if bias else None)
    for x in (torch.randn(5, 16), torch.randn(2, 7, 16), torch.randn(7, 2, 16).transpose(0, 1)):
        ref = F.linear(x, w, b)
        with torch.no_grad():
            out = kernels.linear(x, w, b)
            with kernels.fast_kernels(False):
                assert torch.equal(kernels.linear(x, w, b), ref)  # switched off: the reference
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "padding", "size", "batch", "path"),
    [
        (16, 24, 1, 1, 0, 9, 2, "pointwise"),  # a 1x1 conv (proj_in, skip connections)
        (16, 24, 1, 2, 0, 9, 1, "pointwise"),
        (32, 320, 3, 1, 1, 4, 1, "im2col"),  # 4x5 pixels, 320 channels: 20 * 4096 <= 320**2
        (32, 320, 3, 2, 1, 8, 1, "im2col"),  # stride 2, odd sizes below
        (32, 320, 3, 2, 1, 7, 1, "im2col"),
        (24, 256, 4, 1, 2, 2, 1, "im2col"),  # even kernel: a 3x4 output
        (8, 16, 3, 1, 1, 12, 2, "reference"),  # many pixels, few channels: F.conv2d
    ],
)
def test_fast_conv2d_paths_equal_f_conv2d(cin, cout, k, stride, padding, size, batch, path):
    torch.manual_seed(0)
    conv = kernels.Conv2d(cin, cout, k, stride=stride, padding=padding)
    x = torch.randn(batch, cin, size, size + 1)
    assert kernels.conv_path(x.shape, conv.weight.shape, stride, padding) == path
    ref = F.conv2d(x, conv.weight, conv.bias, stride, padding)
    with torch.no_grad():
        out = conv(x)
        out_cl = conv(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_cl, ref, atol=1e-5, rtol=1e-5)


def test_fast_kernels_fall_back_for_autograd_and_keep_names():
    torch.manual_seed(0)
    lin, conv = kernels.Linear(6, 4), kernels.Conv2d(3, 256, 3, padding=1)
    assert isinstance(lin, torch.nn.Linear) and isinstance(conv, torch.nn.Conv2d)
    assert list(lin.state_dict()) == list(torch.nn.Linear(6, 4).state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 6, requires_grad=True)
    y = lin(x)  # autograd records: the reference op, bit for bit, with a backward
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    img = torch.randn(1, 3, 2, 2)  # im2col shape, but the weights require grad
    assert torch.equal(conv(img), F.conv2d(img, conv.weight, conv.bias, padding=1))
    half = torch.randn(2, 6).half()  # not float32: the reference op
    with torch.no_grad():
        assert torch.equal(lin.half()(half), F.linear(half, lin.weight, lin.bias))


def test_resblock_in_place_ops_keep_gradients():
    """The in-place SiLUs and skip addition give the out-of-place block's values and grads."""
    torch.manual_seed(0)
    block = jitter(ResBlock(8, 12, 16, norm_groups=4, dropout=0.1), std=0.1, freeze=False)
    x, emb = torch.randn(2, 8, 6, 5, requires_grad=True), torch.randn(2, 12)
    torch.manual_seed(1)
    block(x, emb).square().sum().backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in block.parameters())]
    x.grad = None
    block.zero_grad()
    torch.manual_seed(1)  # same dropout mask
    naive = _naive_train_resblock(block, x, emb, 4)
    naive.square().sum().backward()
    for a, b in zip(grads, [x.grad, *(p.grad for p in block.parameters())], strict=True):
        torch.testing.assert_close(a, b)


def _naive_train_resblock(block: ResBlock, x, emb, groups):
    w = dict(block.named_parameters())
    h = F.silu(F.group_norm(x, groups, w["in_layers.0.weight"], w["in_layers.0.bias"]))
    h = F.conv2d(h, w["in_layers.2.weight"], w["in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), w["emb_layers.1.weight"], w["emb_layers.1.bias"])[..., None, None]
    h = F.group_norm(h + e, groups, w["out_layers.0.weight"], w["out_layers.0.bias"])
    h = F.dropout(F.silu(h), 0.1, training=True)
    h = F.conv2d(h, w["out_layers.3.weight"], w["out_layers.3.bias"], padding=1)
    return F.conv2d(x, w["skip_connection.weight"], w["skip_connection.bias"]) + h


@needs_onednn
@pytest.mark.parametrize("crop", [(0, 0), (1, 0), (0, 1), (1, 1)], ids=str)
@pytest.mark.parametrize(("channels", "size", "channels_last"), [(8, 5, False), (6, 6, True)])
def test_upsample_conv_phases_equal_upsample_then_conv(channels, size, channels_last, crop):
    """Nearest upsampling (2x, or to one less row / column: a U-Net's odd skip) + 3x3 conv ==
    four interleaved 2x2 convs of the input, minus the dropped row's / column's taps."""
    torch.manual_seed(0)
    up = Upsample(channels, channels + 1)
    x = torch.randn(2, channels, size, size + 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out_size = (2 * size - crop[0], 2 * (size + 3) - crop[1])
    ref = up.conv(F.interpolate(x, size=out_size, mode="nearest"))
    assert kernels.upsample_path(x.shape, up.conv.weight.shape) == "subpixel"
    with torch.no_grad():
        direct = kernels.upsample_conv2d(x, up.conv.weight, up.conv.bias, out_size)
        out = up(x, out_size)
        with kernels.fast_kernels(False):
            plain = up(x, out_size)
    torch.testing.assert_close(plain, ref, rtol=0, atol=0)  # no fast path: the reference ops
    for y in (direct, out):
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    if crop == (0, 0):
        with torch.no_grad():
            assert torch.equal(up(x, None), out) and torch.equal(up(x), out)
    with pytest.raises(ValueError, match="cannot upsample"):
        up(x, (2 * size + 1, 2 * size))
    # few pixels, many channels: upsample, then the im2col conv path
    assert kernels.upsample_path((1, 320, 2, 2), (320, 320, 3, 3)) == "upsample"
