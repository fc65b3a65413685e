"""The ControlNet model (models/controlnet.py): residual shapes, zero convolutions, scales.

Parity with diffusers' ``ControlNetModel`` and the file formats are in
``test_controlnet_files.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import jitter
from noisecraft.errors import ConfigError
from noisecraft.models.controlnet import ControlNet, ControlNetConfig, guess_mode_scales
from noisecraft.models.unet import UNet, UNetConfig

TINY = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    num_heads=2,
    norm_groups=8,
    context_dim=12,
)
HINT = (4, 8, 8, 16)  # four levels (8x), narrow


def _inputs(b: int = 2, h: int = 5, w: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g)
    t = torch.tensor([10.0, 700.0][:b])
    ctx = torch.randn(b, 3, 12, generator=g)
    hint = torch.rand(b, 3, 8 * h, 8 * w, generator=g)
    return x, t, ctx, hint


def _controlnet(seed: int = 0) -> ControlNet:
    torch.manual_seed(seed)
    return jitter(ControlNet(ControlNetConfig(TINY, HINT)), seed)


@pytest.mark.parametrize("size", [(5, 7), (8, 8), (1, 3)])
def test_residuals_have_the_shapes_of_the_unets_skips(size):
    unet = UNet(TINY)
    cn = _controlnet()
    x, t, ctx, hint = _inputs(2, *size)
    downs, mid = cn(x, t, ctx, hint)
    hs = []  # the skips, as the U-Net computes them
    emb = unet.embedding(x, t)
    h = x
    for block in unet.input_blocks:
        h = block(h, emb, ctx)
        hs.append(h)
    assert [tuple(d.shape) for d in downs] == [tuple(s.shape) for s in hs]
    assert [d.shape[1] for d in downs] == list(unet.skip_channels)
    assert tuple(mid.shape) == tuple(unet.middle_block(h, emb, ctx).shape)
    out = unet(x, t, context=ctx, down_residuals=downs, mid_residual=mid)
    assert out.shape == x.shape


def test_from_unet_copies_the_encoder_and_adds_nothing():
    """Eq. 1-2: zero convolutions make a fresh ControlNet's residuals exactly zero, so the
    U-Net's output is unchanged; the encoder is the U-Net's (same tensors' values)."""
    torch.manual_seed(0)
    unet = jitter(UNet(TINY), 1)
    cn = ControlNet.from_unet(unet, hint_channels=HINT)
    for k, v in unet.state_dict().items():
        if not k.startswith(("output_blocks.", "out.")):
            assert torch.equal(cn.state_dict()[k], v), k
    x, t, ctx, hint = _inputs()
    with torch.no_grad():  # the same (fast) kernels in both U-Net calls
        downs, mid = cn(x, t, ctx, hint)
    assert all(torch.count_nonzero(d) == 0 for d in downs)
    assert torch.count_nonzero(mid) == 0
    plain = unet(x, t, context=ctx)
    assert torch.equal(unet(x, t, context=ctx, down_residuals=downs, mid_residual=mid), plain)


def test_zero_convs_learn_first():
    """With zero convs the first gradient reaches the zero convs' weights (their input is
    not zero) but nothing before them (their weight is) — the paper's argument in 3.1."""
    unet = UNet(TINY)
    cn = ControlNet.from_unet(unet, hint_channels=HINT)
    x, t, ctx, hint = _inputs()
    downs, mid = cn(x, t, ctx, hint)
    g = torch.Generator().manual_seed(1)
    loss = sum((r * torch.randn(r.shape, generator=g)).sum() for r in [*downs, mid])
    loss.backward()
    assert all(z[0].weight.grad.abs().sum() > 0 for z in cn.zero_convs)
    assert cn.middle_block_out[0].weight.grad.abs().sum() > 0
    assert cn.input_blocks[1][0].in_layers[2].weight.grad.abs().sum() == 0
    assert cn.input_hint_block[0].weight.grad.abs().sum() == 0


def test_scales_multiply_each_residual():
    cn = _controlnet()
    x, t, ctx, hint = _inputs()
    downs, mid = cn(x, t, ctx, hint)
    n = len(downs) + 1
    per = [0.5 + i for i in range(n)]
    d2, m2 = cn(x, t, ctx, hint, scale=per)
    for i, (a, b) in enumerate(zip(downs, d2, strict=True)):
        torch.testing.assert_close(b, a * per[i], rtol=1e-6, atol=0)
    torch.testing.assert_close(m2, mid * per[-1], rtol=1e-6, atol=0)
    d3, m3 = cn(x, t, ctx, hint, scale=0.7, guess_mode=True)
    g = guess_mode_scales(n)
    for i, (a, b) in enumerate(zip(downs, d3, strict=True)):
        torch.testing.assert_close(b, a * 0.7 * g[i], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m3, mid * 0.7, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match=f"give one ControlNet scale or {n}"):
        cn(x, t, ctx, hint, scale=[1.0, 2.0])


def test_guess_mode_scales_are_the_original_soft_injection():
    """cldm's soft injection for SD's 13 residuals is 0.825 ** (12 - i); diffusers' (ours)
    is 10 ** (-1 + i / 12): both geometric, from ~0.1 to 1, within 1 % of each other (0.6 %
    at most)."""
    ours = guess_mode_scales(13).double()
    original = torch.tensor([0.825 ** (12 - i) for i in range(13)], dtype=torch.float64)
    assert ours[-1] == 1 and math.isclose(ours[0].item(), 0.1, rel_tol=1e-6)
    torch.testing.assert_close(ours[1:] / ours[:-1], torch.full((12,), 10 ** (1 / 12)).double())
    assert ((ours - original).abs() / original).max() < 0.01


def test_a_shared_hint_equals_the_repeated_hint():
    cn = _controlnet()
    x, t, ctx, hint = _inputs()
    one = hint[:1]
    a = cn(x, t, ctx, one)
    b = cn(x, t, ctx, one.expand(2, -1, -1, -1).contiguous())
    for u, v in zip(a[0] + [a[1]], b[0] + [b[1]], strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-6)


def test_hint_changes_the_residuals_and_bad_inputs_are_one_line():
    cn = _controlnet()
    x, t, ctx, hint = _inputs()
    d1, _ = cn(x, t, ctx, hint)
    d2, _ = cn(x, t, ctx, 1 - hint)
    assert (d1[0] - d2[0]).abs().max() > 1e-4
    with pytest.raises(ConfigError, match=r"control image must be \(1 or 2, 3, 40, 56\)") as e:
        cn(x, t, ctx, hint[..., :-8])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="ControlNet has cross-attention"):
        cn(x, t, None, hint)


def test_config_round_trip_and_errors():
    c = ControlNetConfig(TINY, HINT)
    assert ControlNetConfig.from_dict(c.to_dict()) == c
    assert ControlNetConfig.from_dict(c.to_dict()).unet == TINY
    assert c.hint_factor == 8
    with pytest.raises(ConfigError, match="hint_channels"):
        ControlNetConfig(TINY, ())
    with pytest.raises(ConfigError, match="unknown ControlNet config key"):
        ControlNetConfig.from_dict({**c.to_dict(), "hint": 3})
    with pytest.raises(ConfigError, match="ControlNetConfig"):
        ControlNet(TINY)  # type: ignore[arg-type]
