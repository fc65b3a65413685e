"""The U-Net: shapes, conditioning, config round trip, and parity with diffusers (test-only).

Parity uses diffusers' own LDM -> diffusers converter (``convert_ldm_unet_checkpoint``, the
code that loads Stable Diffusion single-file checkpoints) on our state dict: if the result
loads strictly into diffusers' model and the outputs agree, then our names and layout are
those of ``model.diffusion_model.*`` in SD checkpoints.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from helpers import jitter
from noisecraft.errors import ConfigError
from noisecraft.models import UNet, UNetConfig
from noisecraft.nn import SpatialTransformer, Upsample

TINY = UNetConfig(
    in_channels=2,
    out_channels=2,
    model_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    num_heads=2,
    norm_groups=4,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast, and immune to OpenMP stalls on a shared 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _to_diffusers(model: UNet, layers_per_block: int, **config) -> dict[str, torch.Tensor]:
    sd = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    out = convert_ldm_unet_checkpoint(sd, {"layers_per_block": layers_per_block, **config})
    assert len(out) == len(sd)  # nothing of ours dropped by the converter
    return out


# ---------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shapes_non_square(learn_sigma):
    model = UNet(dataclasses.replace(TINY, learn_sigma=learn_sigma))
    out = model(torch.randn(3, 2, 32, 24), torch.tensor([0, 5, 999]))
    assert out.shape == (3, 4 if learn_sigma else 2, 32, 24)
    assert model.config.output_channels == out.shape[1]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"channel_mult": (1, 2, 2, 2)},
        {"channel_mult": (1, 2, 2), "resblock_updown": True, "use_scale_shift_norm": True},
    ],
)
@pytest.mark.parametrize("size", [(13, 10), (12, 9), (7, 5), (1, 1), (30, 26)])
def test_any_size_goes_through_every_level(overrides, size):
    """Odd sides halve to ceil(n / 2) and the up path returns to each skip's size: the output
    has the input's size at any depth (e.g. 13 -> 7 -> 4 -> 2 and back)."""
    torch.manual_seed(0)
    model = jitter(UNet(dataclasses.replace(TINY, **overrides)))
    x = torch.randn(2, 2, *size)
    assert model(x, torch.tensor([3, 500])).shape == x.shape
    with pytest.raises(ConfigError, match=r"\(batch, 2, height, width\)"):
        model(torch.randn(1, 3, *size), torch.tensor([1]))


def test_timesteps_broadcast_fractional_and_channels_last():
    torch.manual_seed(0)
    model = jitter(UNet(TINY), freeze=False)
    x = torch.randn(2, 2, 8, 12)
    t = torch.tensor(7.0)
    out = model(x, t)
    torch.testing.assert_close(model(x, torch.tensor([7, 7])), out)  # 0-d == (B,), int == float
    torch.testing.assert_close(
        model(x.to(memory_format=torch.channels_last), t), out, atol=1e-5, rtol=1e-5
    )
    # fractional t lies between its neighbours, close to both (the network is smooth in t)
    near, far = model(x, torch.tensor(7.001)), model(x, torch.tensor(7.5))
    assert (near - out).abs().max() < (far - out).abs().max()
    assert (near - out).abs().max() < 1e-2
    with pytest.raises(ConfigError, match="timesteps"):
        model(x, torch.tensor([1.0, 2.0, 3.0]))


# ---------------------------------------------------------------- class conditioning


def test_class_embedding_null_class():
    torch.manual_seed(0)
    model = jitter(UNet(dataclasses.replace(TINY, num_classes=5)), freeze=False)
    assert model.null_class == 5
    assert model.label_emb.weight.shape == (6, 4 * TINY.model_channels)  # last row: null class
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 400])
    null = model(x, t, torch.tensor([5, 5]))
    torch.testing.assert_close(model(x, t), null)  # missing labels == null class
    a = model(x, t, torch.tensor([0, 1]))
    b = model(x, t, torch.tensor([2, 1]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    assert not torch.allclose(a, null)
    with pytest.raises(ConfigError, match="unconditional"):
        UNet(TINY)(x, t, torch.tensor([0, 1]))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_classes": 3, "learn_sigma": True},
        {"resblock_updown": True, "use_scale_shift_norm": True, "head_channels": 4},
        {"context_dim": 6, "transformer_depth": 2, "use_linear_projection": True},
    ],
)
@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
def test_gradients_reach_every_parameter(overrides, size):
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, attention_levels=(0, 1), **overrides)
    model = jitter(UNet(cfg), freeze=False)
    x, t = torch.randn(2, 2, *size), torch.tensor([3.0, 250.5])
    kw = {}
    if cfg.num_classes:
        kw["class_labels"] = torch.tensor([0, 3])
    if cfg.context_dim:
        kw["context"] = torch.randn(2, 5, cfg.context_dim)
    model(x, t, **kw).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []
    if cfg.num_classes:  # exactly the rows of the labels used get gradient
        used = model.label_emb.weight.grad.abs().sum(1) > 0
        assert used.tolist() == [True, False, False, True]


def test_fresh_model_outputs_zero():
    # improved-diffusion init: the output conv starts at zero, so a new model predicts 0
    out = UNet(TINY)(torch.randn(1, 2, 8, 8), torch.tensor([10]))
    assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------- config


def test_config_round_trip_and_errors():
    cfg = UNetConfig(
        channel_mult=(1, 2, 4), attention_levels=(1, 2), num_classes=10, context_dim=32
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["channel_mult"] == [1, 2, 4]
    back = UNetConfig.from_dict(d)
    assert back == cfg and isinstance(back.channel_mult, tuple)
    with pytest.raises(ConfigError, match=r"'chanel_mult' \(did you mean 'channel_mult'\?\)"):
        UNetConfig.from_dict({**d, "chanel_mult": [1]})
    with pytest.raises(ConfigError, match="attention_levels"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(2,))
    with pytest.raises(ConfigError, match="model_channels"):
        UNetConfig(model_channels=0)
    with pytest.raises(ConfigError, match="norm_groups=32"):
        UNet(UNetConfig(model_channels=48, channel_mult=(1, 2), attention_levels=(1,)))


def test_context_is_required_exactly_when_configured():
    x, t = torch.randn(1, 2, 8, 8), torch.tensor([1])
    with pytest.raises(ConfigError, match="pass context"):
        UNet(dataclasses.replace(TINY, context_dim=6))(x, t)
    with pytest.raises(ConfigError, match="no cross-attention"):
        UNet(TINY)(x, t, context=torch.randn(1, 3, 6))


# ---------------------------------------------------------------- parity with diffusers

PIXEL = UNetConfig(
    in_channels=3,
    out_channels=2,
    model_channels=16,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_levels=(1, 2),
    head_channels=8,
    norm_groups=8,
    num_classes=10,
)


def _diffusers_pixel() -> UNet2DModel:
    return UNet2DModel(
        in_channels=3,
        out_channels=2,
        layers_per_block=2,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,  # UNet2DModel: channels per head
        norm_num_groups=8,
        num_class_embeds=11,  # num_classes + the null class
    )


def _pixel_to_diffusers(model: UNet) -> dict[str, torch.Tensor]:
    """Our pixel U-Net -> diffusers UNet2DModel names; qkv split per head (legacy layout)."""
    out = {}
    for k, v in _to_diffusers(model, 2, num_class_embeds=11).items():
        if ".attentions." not in k:
            out[k] = v
            continue
        base, rest = k.split(".attentions.")
        idx, name = rest.split(".", 1)
        base = f"{base}.attentions.{idx}."
        layer, param = name.split(".")
        if layer == "norm":
            out[base + "group_norm." + param] = v
        elif layer == "qkv":  # (3C[, 1]) read as (heads, [q|k|v], ch)
            c = v.shape[0] // 3
            heads = c // PIXEL.head_channels
            per_head = v.reshape(heads, 3, PIXEL.head_channels, *v.shape[1:])
            for i, n in enumerate("qkv"):
                w = per_head[:, i].reshape(c, *v.shape[1:])
                out[base + f"to_{n}.{param}"] = w[..., 0] if w.ndim == 3 else w
        else:
            assert layer == "proj_out"
            out[base + "to_out.0." + param] = v[..., 0] if v.ndim == 3 else v
    return out


def test_pixel_unet_parity_with_diffusers_unet2dmodel():
    torch.manual_seed(0)
    ours = jitter(UNet(PIXEL), freeze=False)
    ref = _diffusers_pixel().eval()
    assert _n_params(ours) == _n_params(ref)
    ref.load_state_dict(_pixel_to_diffusers(ours), strict=True)
    x, t, y = torch.randn(3, 3, 16, 12), torch.tensor([10.0, 500.5, 3.0]), torch.tensor([0, 10, 4])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, t, y), ref(x, t, class_labels=y).sample, atol=1e-4, rtol=0
        )


def _sd_tiny(use_linear: bool) -> tuple[UNetConfig, UNet2DConditionModel]:
    cfg = UNetConfig(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=2,
        attention_levels=(0,),
        num_heads=2,
        norm_groups=8,
        context_dim=24,
        transformer_depth=2,
        use_linear_projection=use_linear,
    )
    ref = UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=2,  # UNet2DConditionModel: number of heads (historical misnomer)
        norm_num_groups=8,
        use_linear_projection=use_linear,
        transformer_layers_per_block=2,
    )
    return cfg, ref.eval()


@pytest.mark.parametrize("use_linear", [False, True], ids=["sd1-conv-proj", "sd2-linear-proj"])
def test_cross_attention_unet_parity_with_diffusers(use_linear):
    torch.manual_seed(0)
    cfg, ref = _sd_tiny(use_linear)
    ours = jitter(UNet(cfg), freeze=False)
    assert _n_params(ours) == _n_params(ref)
    ref.load_state_dict(_to_diffusers(ours, 2), strict=True)
    # 16x12 keeps the deepest level at 8x6 (see notes/diffusers-parity.md)
    x, t, ctx = torch.randn(2, 4, 16, 12), torch.tensor([10.0, 500.5]), torch.randn(2, 7, 24)
    res = [
        torch.randn(2, c, *((16, 12) if i < 3 else (8, 6))) * 0.1
        for i, c in enumerate(ours.skip_channels)
    ]
    mid = torch.randn(2, 64, 8, 6) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, t, context=ctx),
            ref(x, t, encoder_hidden_states=ctx).sample,
            atol=1e-4,
            rtol=0,
        )
        # ControlNet residuals enter where diffusers adds them
        got = ours(x, t, context=ctx, down_residuals=res, mid_residual=mid)
        want = ref(
            x,
            t,
            encoder_hidden_states=ctx,
            down_block_additional_residuals=tuple(res),
            mid_block_additional_residual=mid,
        ).sample
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def _sd_three_levels() -> tuple[UNetConfig, UNet2DConditionModel]:
    cfg = UNetConfig(
        in_channels=4,
        out_channels=4,
        model_channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(0,),
        num_heads=2,
        norm_groups=8,
        context_dim=24,
    )
    ref = UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    return cfg, ref.eval()


def _level_sizes(h: int, w: int, levels: int) -> list[tuple[int, int]]:
    """Each level's size: a stride-2 conv with padding 1 halves n to ceil(n / 2)."""
    sizes = [(h, w)]
    for _ in range(levels - 1):
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    return sizes


# (13, 10): levels 13x10, 7x5, 4x3 -- odd heights at levels 0 and 1, an odd width at level 1
# (12, 9): 12x9, 6x5, 3x3 -- even heights, odd widths; (5, 3): 5x3, 3x2, 2x1; (16, 12): even
@pytest.mark.parametrize("fast", [True, False], ids=["fast-kernels", "reference-ops"])
@pytest.mark.parametrize("size", [(13, 10), (12, 9), (5, 3), (16, 12)])
def test_cross_attention_unet_parity_with_diffusers_at_any_size(size, fast):
    """diffusers upsamples to the skip's size where a level is odd (``forward_upsample_size``);
    so must we, with the fused sub-pixel upsampling kernel and with the reference ops."""
    from noisecraft.nn.kernels import fast_kernels

    torch.manual_seed(0)
    cfg, ref = _sd_three_levels()
    ours = jitter(UNet(cfg), freeze=False)
    ref.load_state_dict(_to_diffusers(ours, 1), strict=True)
    levels = _level_sizes(*size, 3)
    x, t, ctx = torch.randn(2, 4, *size), torch.tensor([10.0, 500.5]), torch.randn(2, 7, 24)
    # skips: conv_in + 1 per level at full size, then each downsample's output at the next
    skip_levels = [0, 0, 1, 1, 2, 2]
    res = [
        torch.randn(2, c, *levels[lv]) * 0.1
        for c, lv in zip(ours.skip_channels, skip_levels, strict=True)
    ]
    mid = torch.randn(2, 32, *levels[2]) * 0.1
    with torch.no_grad(), fast_kernels(fast):
        got = ours(x, t, context=ctx, down_residuals=res, mid_residual=mid)
        want = ref(
            x,
            t,
            encoder_hidden_states=ctx,
            down_block_additional_residuals=tuple(res),
            mid_block_additional_residual=mid,
        ).sample
        assert got.shape == x.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            ours(x, t, context=ctx), ref(x, t, encoder_hidden_states=ctx).sample, atol=1e-4, rtol=0
        )


def _diffusers_pixel_forward(ref: UNet2DModel, x, t, y) -> torch.Tensor:
    """``UNet2DModel.forward`` with every upsampler returning to the next skip's size, as
    ``UNet2DConditionModel`` does (``forward_upsample_size``); UNet2DModel itself only
    doubles, so it cannot take odd sizes."""
    emb = ref.time_embedding(ref.time_proj(t).to(x.dtype)) + ref.class_embedding(y)
    h = ref.conv_in(x)
    skips = [h]
    for block in ref.down_blocks:
        h, res = block(hidden_states=h, temb=emb)
        skips += res
    h = ref.mid_block(h, emb)
    for block in ref.up_blocks:
        attentions = getattr(block, "attentions", [None] * len(block.resnets))
        for resnet, attn in zip(block.resnets, attentions, strict=True):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            h = h if attn is None else attn(h)
        if block.upsamplers is not None:
            h = block.upsamplers[0](h, skips[-1].shape[-2:])
    return ref.conv_out(ref.conv_act(ref.conv_norm_out(h)))


def test_pixel_unet_at_odd_sizes_matches_diffusers_blocks():
    """Pixel U-Nets take any size too: our class-conditional pixel U-Net against diffusers'
    UNet2DModel blocks driven with the skip sizes (checked first against UNet2DModel itself
    at an even size). 11x9: levels 11x9, 6x5, 3x3."""
    torch.manual_seed(0)
    ours = jitter(UNet(PIXEL), freeze=False)
    ref = _diffusers_pixel().eval()
    ref.load_state_dict(_pixel_to_diffusers(ours), strict=True)
    t, y = torch.tensor([10.0, 500.5]), torch.tensor([0, 10])
    with torch.no_grad():
        x = torch.randn(2, 3, 16, 12)
        torch.testing.assert_close(
            _diffusers_pixel_forward(ref, x, t, y), ref(x, t, class_labels=y).sample
        )
        for size in [(11, 9), (6, 7)]:
            x = torch.randn(2, 3, *size)
            got = ours(x, t, y)
            assert got.shape == (2, 2, *size)
            torch.testing.assert_close(
                got, _diffusers_pixel_forward(ref, x, t, y), atol=1e-4, rtol=0
            )


def test_stable_diffusion_unet_takes_1360x768():
    """SD 1.5's U-Net on the meta device (shapes only) at 1360x768: latents 170x96 go down
    through 85x48, 43x24 and 22x12, and each upsampling returns to its skip's size (once
    refused: not a multiple of 64)."""
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
        ups = []
        for block in unet.output_blocks:
            if isinstance(block[-1], Upsample):
                block[-1].register_forward_hook(lambda m, i, o: ups.append(tuple(o.shape[-2:])))
        out = unet(
            torch.randn(2, 4, 96, 170), torch.tensor([1.0, 2.0]), context=torch.randn(2, 77, 768)
        )
    assert out.shape == (2, 4, 96, 170)
    assert ups == [(24, 43), (48, 85), (96, 170)]


@pytest.mark.parametrize("version", ["sd15", "sd2"])
def test_stable_diffusion_layout_matches_diffusers(version):
    """Full-size SD 1.5 / 2.x U-Nets on the meta device: same keys, shapes, heads."""
    if version == "sd15":
        cfg = UNetConfig.sd15()
        ref_kw = {"cross_attention_dim": 768, "attention_head_dim": 8}
    else:
        cfg = UNetConfig.sd2()
        ref_kw = {
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
        }
    with torch.device("meta"):
        ours = UNet(cfg)
        ref = UNet2DConditionModel(**ref_kw)  # defaults are SD 1.5's sizes
    converted = _to_diffusers(ours, 2)
    ref_sd = ref.state_dict()
    assert set(converted) == set(ref_sd)
    assert all(converted[k].shape == ref_sd[k].shape for k in ref_sd)
    if version == "sd15":
        assert _n_params(ours) == 859_520_964  # SD 1.5's published U-Net size
    ours_heads = [
        m.transformer_blocks[0].attn1.heads
        for m in ours.modules()
        if isinstance(m, SpatialTransformer)
    ]
    ref_heads = [m.heads for n, m in ref.named_modules() if n.endswith("attn1")]
    assert sorted(ours_heads) == sorted(ref_heads)
