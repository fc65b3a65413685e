"""U-Net names and configs: ours (LDM) <-> diffusers UNet2DConditionModel (test-only reference).

The key rules must agree with diffusers' own LDM converter (``convert_ldm_unet_checkpoint``)
and with the state dict of a ``UNet2DConditionModel`` built from the config we write; the
round trip must be bit-exact; weights read from a random diffusers U-Net must give its
outputs; configs our U-Net cannot express must be refused in one line naming the field.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from helpers import jitter
from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.build import build_module
from noisecraft.io.formats.unet_keys import (
    block_pairs,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from noisecraft.models.unet import UNet, UNetConfig

SD15 = UNetConfig.sd15()
SD2 = UNetConfig.sd2()
TINY = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(0,),
    num_heads=2,
    norm_groups=8,
    context_dim=24,
)
CONFIGS = {
    "sd15": SD15,
    "sd2": SD2,
    "sd15-inpaint": dataclasses.replace(SD15, in_channels=9),
    "tiny": TINY,
    "three-levels-r3": dataclasses.replace(
        TINY, channel_mult=(1, 2, 2), num_res_blocks=3, attention_levels=(1, 2)
    ),
    "no-attention-levels": dataclasses.replace(TINY, attention_levels=()),
    "attention-everywhere-depth2": dataclasses.replace(
        TINY, attention_levels=(0, 1), transformer_depth=2, use_linear_projection=True
    ),
    "head-channels": dataclasses.replace(TINY, num_heads=-1, head_channels=8),
    # equal channels at every level: [2, 2] heads could be read either way; a list is SD 2.x's
    # spelling of head_channels, an int SD 1.x's of num_heads
    "head-channels-equal-levels": dataclasses.replace(
        TINY, channel_mult=(1, 1), num_heads=-1, head_channels=8
    ),
    "num-heads-equal-levels": dataclasses.replace(TINY, channel_mult=(1, 1)),
    "scale-shift": dataclasses.replace(TINY, use_scale_shift_norm=True),
}

# Published diffusers configs (the unet/config.json files of runwayml/stable-diffusion-v1-5
# and stabilityai/stable-diffusion-2-1, as shipped on the Hugging Face hub).
SD15_JSON = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}
SD21_JSON = {
    **SD15_JSON,
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
# SDXL base's unet/config.json (stabilityai/stable-diffusion-xl-base-1.0), the fields that matter
SDXL_JSON = {
    **SD15_JSON,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def _diffusers_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------- key rules


@pytest.mark.parametrize("name", list(CONFIGS))
def test_keys_agree_with_diffusers_converter_and_model(name):
    """Same names as diffusers' LDM converter, and exactly the keys and shapes of the
    UNet2DConditionModel built from the config we write (meta device: no memory)."""
    cfg = CONFIGS[name]
    with torch.device("meta"):
        ours = UNet(cfg)
        ref = UNet2DConditionModel(**_diffusers_kwargs(unet_config_to_diffusers(cfg)))
    sd = ours.state_dict()
    mapped = unet_to_diffusers(sd, cfg)
    converted = convert_ldm_unet_checkpoint(
        {f"model.diffusion_model.{k}": v for k, v in sd.items()},
        {"layers_per_block": cfg.num_res_blocks},
    )
    assert mapped.keys() == converted.keys()
    assert all(mapped[k] is converted[k] for k in mapped)  # the same tensor under the same name
    ref_sd = ref.state_dict()
    assert mapped.keys() == ref_sd.keys()
    assert all(mapped[k].shape == ref_sd[k].shape for k in ref_sd)


@pytest.mark.parametrize("name", ["tiny", "three-levels-r3", "head-channels"])
def test_round_trip_is_bit_exact(name):
    cfg = CONFIGS[name]
    sd = jitter(UNet(cfg)).state_dict()
    there = unet_to_diffusers(sd, cfg)
    back = unet_from_diffusers(there, cfg)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k] is v  # renamed, never copied
        assert torch.equal(back[k], v)


def test_block_pairs_are_one_to_one():
    for cfg in CONFIGS.values():
        pairs = block_pairs(cfg)
        assert len({p[0] for p in pairs}) == len(pairs) == len({p[1] for p in pairs})


def test_unknown_keys_raise():
    sd = UNet(TINY).state_dict()
    there = unet_to_diffusers(sd, TINY)
    # outside every block (SDXL's added embedding) or an unknown resnet leaf; unknown names
    # inside an attention block pass through and build_module's strict load refuses them
    for extra in ("add_embedding.linear_1.weight", "down_blocks.0.resnets.0.extra.weight"):
        with pytest.raises(
            CheckpointError, match=rf"unet\.safetensors: unexpected U-Net weight '{extra}'"
        ):
            unet_from_diffusers({**there, extra: torch.zeros(1)}, TINY, source="unet.safetensors")
    three = CONFIGS["three-levels-r3"]
    with pytest.raises(CheckpointError, match="not a key of a U-Net with this config"):
        unet_to_diffusers(UNet(three).state_dict(), TINY)


# ---------------------------------------------------------------------------- outputs


def _from_diffusers(ref: UNet2DConditionModel) -> UNet:
    cfg = unet_config_from_diffusers(dict(ref.config))
    return build_module(
        lambda: UNet(cfg),
        unet_from_diffusers(ref.state_dict(), cfg),
        what="U-Net",
        source="test",
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"attention_head_dim": 2},  # SD 1.x: the number of heads
        {"attention_head_dim": [1, 2], "use_linear_projection": True},  # SD 2.x: 16-ch heads
        {"attention_head_dim": 2, "resnet_time_scale_shift": "scale_shift"},
        {"attention_head_dim": 4, "transformer_layers_per_block": 2, "layers_per_block": 2},
    ],
    ids=["sd1", "sd2-lists", "scale-shift", "depth2-r2"],
)
def test_diffusers_unet_outputs(kw):
    """A random diffusers U-Net read through our names and config gives its outputs."""
    torch.manual_seed(0)
    ref = UNet2DConditionModel(
        **{
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (16, 32),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 24,
            "norm_num_groups": 8,
            **kw,
        }
    )
    jitter(ref)
    ours = _from_diffusers(ref)
    if kw.get("attention_head_dim") == [1, 2]:
        assert ours.config.head_channels == 16
    x, t = torch.randn(2, 4, 12, 16), torch.tensor([10.0, 700.5])
    ctx = torch.randn(2, 7, 24)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, context=ctx)
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip(name):
    cfg = CONFIGS[name]
    d = unet_config_to_diffusers(cfg, sample_size=8)
    assert d["sample_size"] == 8
    assert unet_config_from_diffusers(d) == cfg


@pytest.mark.parametrize("which", ["sd15", "sd21", "sd15-inpaint"])
def test_published_configs(which):
    """SD 1.5: ``attention_head_dim: 8`` is 8 heads; SD 2.1: [5, 10, 20, 20] are 64-channel
    heads; the inpainting U-Net takes 9 channels. Each builds the layout diffusers builds."""
    d = {"sd15": SD15_JSON, "sd21": SD21_JSON, "sd15-inpaint": {**SD15_JSON, "in_channels": 9}}[
        which
    ]
    cfg = unet_config_from_diffusers(d)
    want = {"sd15": SD15, "sd21": SD2, "sd15-inpaint": CONFIGS["sd15-inpaint"]}[which]
    assert cfg == want
    with torch.device("meta"):
        ours = UNet(cfg)
        ref = UNet2DConditionModel(**_diffusers_kwargs(d))
    mapped = unet_to_diffusers(ours.state_dict(), cfg)
    ref_sd = ref.state_dict()
    assert mapped.keys() == ref_sd.keys()
    assert all(mapped[k].shape == ref_sd[k].shape for k in ref_sd)
    ours_heads = sorted(m.heads for n, m in ours.named_modules() if n.endswith("attn1"))
    ref_heads = sorted(m.heads for n, m in ref.named_modules() if n.endswith("attn1"))
    assert ours_heads == ref_heads


@pytest.mark.parametrize(
    "changes, field",
    [
        ({}, "addition_embed_type"),  # SDXL itself
        ({"addition_embed_type": None, "transformer_layers_per_block": [1, 2, 10]}, "transformer"),
    ],
)
def test_sdxl_is_refused(changes, field):
    d = {**SDXL_JSON, **changes}
    with pytest.raises(CheckpointError) as e:
        unet_config_from_diffusers(d, source="sdxl/unet/config.json")
    msg = str(e.value)
    assert msg.startswith("sdxl/unet/config.json: U-Net " + field) and "\n" not in msg
    if field == "addition_embed_type":
        assert "SDXL" in msg


@pytest.mark.parametrize(
    "field, value",
    [
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 10),
        ("dual_cross_attention", True),
        ("time_cond_proj_dim", 256),
        ("only_cross_attention", [True, False, False, False]),
        ("resnet_time_scale_shift", "ada_group"),
        ("mid_block_type", None),
        ("flip_sin_to_cos", False),
        ("norm_eps", 1e-6),
        ("layers_per_block", [2, 2, 1, 2]),
        ("cross_attention_dim", [768, 1024, 768, 768]),
        ("block_out_channels", [320, 480, 1280, 1280]),
        ("up_block_types", ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]),
        (
            "down_block_types",
            ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"],
        ),
        ("attention_head_dim", [5, 7, 20, 20]),
        ("norm_num_groups", None),
    ],
)
def test_unsupported_fields_are_named(field, value):
    with pytest.raises(CheckpointError) as e:
        unet_config_from_diffusers({**SD15_JSON, field: value}, source="m/unet/config.json")
    msg = str(e.value)
    assert msg.startswith(f"m/unet/config.json: U-Net {field}=") and "\n" not in msg
    assert "not supported" in msg


def test_configs_diffusers_cannot_express():
    for changes in (
        {"context_dim": None},
        {"resblock_updown": True},
        {"num_classes": 10},
        {"learn_sigma": True},
    ):
        with pytest.raises(ConfigError, match="no diffusers UNet2DConditionModel equivalent"):
            unet_config_to_diffusers(dataclasses.replace(TINY, **changes))
    # ours falls back to 1 channel per group in a 16-channel layer with norm_groups=32;
    # diffusers cannot, so the config is refused rather than written wrong
    with pytest.raises(ConfigError, match="norm_groups=32 does not divide"):
        unet_config_to_diffusers(dataclasses.replace(TINY, norm_groups=32))
