"""The key-rule mapper (noisecraft.key_rules) and every component's tables (io/formats/keys,
models/vae_keys, the single-file layout).

Every table, in each layout, is applied to the state dict of a real tiny model (random
weights) and back: the result must be the same keys in the same order with the same tensors
(renames the very same objects). Unmapped keys must be reported, never dropped; ignored keys
reported apart. The OpenCLIP and CLIP tables are compared with the converters of diffusers and
the names of transformers (test-only references); the U-Net and VAE diffusers tables are
checked against diffusers' own converters in test_unet_keys.py / test_vae.py.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from noisecraft.errors import ConfigError
from noisecraft.io.formats import ldm_layout
from noisecraft.io.formats.keys import clip, openclip, unet, vae
from noisecraft.key_rules import (
    Conv1x1,
    Split,
    Table,
    ignore,
    read_only,
    rule,
    to_ours,
    to_theirs,
    under,
)
from noisecraft.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.models.vae import AutoencoderKL, VAEConfig

UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=16,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_levels=(0, 2),
    num_heads=2,
    norm_groups=8,
    context_dim=32,
)
UNETS = {
    "sd1-like": UNET,
    "linear-depth2-scale-shift": dataclasses.replace(
        UNET, use_linear_projection=True, transformer_depth=2, use_scale_shift_norm=True
    ),
    "one-block-no-attention": dataclasses.replace(
        UNET, num_res_blocks=1, attention_levels=(), channel_mult=(1, 2)
    ),
}
VAES = {
    "two-levels": VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8),
    "four-levels": VAEConfig(
        base_channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=2, norm_groups=4
    ),
}
TEXT = TextEncoderConfig(width=64, layers=3, heads=2, intermediate_size=96, vocab_size=100)


def _random(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


def _round_trip(
    table: Table, sd: dict[str, torch.Tensor], *, renames_only: bool, ordered: bool = True
) -> dict:
    """ours -> theirs -> ours (and theirs -> ours -> theirs) must be the identity; in the same
    order unless the table joins tensors (split parts come back next to each other)."""
    there = to_theirs(table, sd)
    assert not there.unmapped and not there.ignored
    back = to_ours(table, there.tensors)
    assert not back.unmapped and not back.ignored
    assert list(back.tensors) == list(sd) if ordered else back.tensors.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(back.tensors[k], v), k
        if renames_only:
            assert back.tensors[k] is v, k  # a rename never copies
    again = to_theirs(table, back.tensors)
    assert list(again.tensors) == list(there.tensors)
    assert all(torch.equal(again.tensors[k], v) for k, v in there.tensors.items())
    return there.tensors


# ---------------------------------------------------------------------------- components


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_tables_round_trip(name):
    cfg = UNETS[name]
    sd = _random(UNet(cfg))
    assert _round_trip(unet.LDM, sd, renames_only=True) == sd
    theirs = _round_trip(unet.diffusers_table(cfg), sd, renames_only=True)
    assert any(k.startswith("down_blocks.0.resnets.0.norm1.") for k in theirs)
    assert len(theirs) == len(sd)


@pytest.mark.parametrize("name", list(VAES))
def test_vae_tables_round_trip(name):
    cfg = VAES[name]
    sd = _random(AutoencoderKL(cfg))
    assert _round_trip(vae.LDM, sd, renames_only=True) == sd
    assert _round_trip(vae.VAE_FILE, sd, renames_only=True) == sd
    theirs = _round_trip(
        vae.diffusers_table(len(cfg.channel_mult)), sd, renames_only=False
    )  # attention 1x1 convs become Linear weights (views)
    q = theirs["encoder.mid_block.attentions.0.to_q.weight"]
    assert q.ndim == 2 and q.data_ptr() == sd["encoder.mid.attn_1.q.weight"].data_ptr()


def test_vae_ldm_table_reads_linear_attention_and_ignores_the_loss():
    sd = _random(AutoencoderKL(VAES["two-levels"]))
    key = "decoder.mid.attn_1.proj_out.weight"
    foreign = {**sd, key: sd[key][:, :, 0, 0], "loss.logvar": torch.zeros(())}
    got = to_ours(vae.LDM, foreign)
    assert got.ignored == ("loss.logvar",) and not got.unmapped
    assert torch.equal(got.tensors[key], sd[key])  # back to a (C, C, 1, 1) conv weight
    assert to_theirs(vae.LDM, got.tensors).tensors[key].ndim == 4  # written as a conv


@pytest.mark.parametrize("layout", ["clip", "clip_flat"])
def test_clip_tables_round_trip(layout):
    sd = _random(CLIPTextEncoder(TEXT))
    theirs = _round_trip(clip.LAYOUTS[layout], sd, renames_only=True)
    prefixed = all(k.startswith("text_model.") for k in theirs)
    assert prefixed == (layout == "clip") and clip.layout_of(theirs) == layout
    _round_trip(clip.DIFFUSERS, sd, renames_only=True)


def test_clip_tables_read_transformers_names_with_or_without_the_prefix():
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=100,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=77,
        )
    )
    ours = set(CLIPTextEncoder(TEXT).state_dict())
    ref = dict(hf.state_dict())
    ref["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # transformers 4
    ref["text_projection.weight"] = torch.zeros(64, 64)  # CLIPTextModelWithProjection
    for sd in (ref, {k.removeprefix("text_model."): v for k, v in ref.items()}):
        got = to_ours(clip.DIFFUSERS, sd)
        assert set(got.tensors) == ours and not got.unmapped
        assert sorted(got.ignored) == sorted(
            k for k in sd if k.endswith("position_ids") or k.startswith("text_projection.")
        )
        # a single file's tables ignore position_ids only; the projection is no SD weight and
        # reaches the strict load, which refuses it by name
        for table in clip.LAYOUTS.values():
            got = to_ours(table, sd)
            assert set(got.tensors) == ours | {"text_projection.weight"}


def test_openclip_table_round_trips_and_matches_diffusers_converter():
    sd = _random(CLIPTextEncoder(TEXT))
    theirs = _round_trip(openclip.OPENCLIP, sd, renames_only=False, ordered=False)
    w = theirs["transformer.resblocks.1.attn.in_proj_weight"]
    assert w.shape == (3 * 64, 64)
    assert torch.equal(
        w, torch.cat([sd[f"encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"])
    )
    back = to_ours(openclip.OPENCLIP, theirs).tensors
    assert back["encoder.layers.1.self_attn.k_proj.weight"].data_ptr() == w[64:].data_ptr()
    # diffusers' reader of SD 2.x single files gives the same names and tensors
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    prefix = "cond_stage_model.model."
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=64))
    ref = single_file_utils.convert_open_clip_checkpoint(
        text_model, {prefix + k: v for k, v in theirs.items()}, prefix=prefix
    )
    ref = {k.removeprefix("text_model."): v for k, v in ref.items()}
    assert ref.keys() == back.keys()
    assert all(torch.equal(ref[k], back[k]) for k in ref)


def test_openclip_unused_tensors_are_ignored_and_unknown_ones_reported():
    theirs = openclip.to_openclip(_random(CLIPTextEncoder(TEXT)))
    extra = {"text_projection": torch.zeros(4, 4), "logit_scale": torch.zeros(())}
    odd = {"transformer.resblocks.0.attn.extra": torch.zeros(1), "ln_final.scale": torch.zeros(1)}
    got = to_ours(openclip.OPENCLIP, {**theirs, **extra, **odd})
    assert got.ignored == tuple(extra) and got.unmapped == tuple(odd)
    bad = {**theirs, "transformer.resblocks.0.attn.in_proj_bias": torch.zeros(64 * 3 + 1)}
    assert to_ours(openclip.OPENCLIP, bad).unmapped == (
        "transformer.resblocks.0.attn.in_proj_bias",
    )
    with pytest.raises(ConfigError, match="encoder.layers.0.foo.weight has no OpenCLIP name"):
        openclip.to_openclip({"encoder.layers.0.foo.weight": torch.zeros(1)})


def test_ema_table_round_trips():
    sd = _random(UNet(UNET))
    table = ldm_layout.ema_table(sd)
    theirs = _round_trip(table, sd, renames_only=True)
    assert all("model_ema." + k == ldm_layout.ema_key(o) for k, o in zip(theirs, sd, strict=True))
    got = to_ours(table, {**theirs, "decay": torch.tensor(0.9), "stray": torch.zeros(1)})
    assert got.ignored == ("decay",) and got.unmapped == ("stray",)


@pytest.mark.parametrize("layout", ldm_layout.TEXT_LAYOUTS)
def test_single_file_layout_joins_and_splits_back(layout):
    parts = (
        _random(UNet(UNET), 1),
        _random(AutoencoderKL(VAES["two-levels"]), 2),
        _random(CLIPTextEncoder(TEXT), 3),
    )
    file = ldm_layout.join_ldm_parts(*parts, layout)
    split = ldm_layout.split_ldm_state_dict(file)
    assert split.text_layout == layout and not split.extras and not split.ema
    for want, got in zip(parts, (split.unet, split.vae, split.text_encoder), strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert list(split.unet) == list(parts[0]) and list(split.vae) == list(parts[1])


# ---------------------------------------------------------------------------- the mapper


def test_unmapped_keys_are_reported_not_dropped():
    unet_sd = _random(UNet(UNET))
    vae_sd = _random(AutoencoderKL(VAES["two-levels"]))
    text_sd = _random(CLIPTextEncoder(TEXT))
    for table, sd, bogus in (
        (unet.diffusers_table(UNET), unet_sd, "input_blocks.1.0.not_a_leaf.weight"),
        (unet.diffusers_table(UNET), unet_sd, "label_emb.0.weight"),
        (vae.diffusers_table(2), vae_sd, "encoder.foo.weight"),
        (openclip.OPENCLIP, text_sd, "encoder.layers.0.mystery.weight"),
    ):
        got = to_theirs(table, {**sd, bogus: torch.zeros(1)})
        assert got.unmapped == (bogus,)
        assert to_ours(table, got.tensors).tensors.keys() == sd.keys()  # the rest is intact


def test_a_split_with_a_part_missing_is_reported():
    sd = _random(CLIPTextEncoder(TEXT))
    del sd["encoder.layers.2.self_attn.v_proj.bias"]
    got = to_theirs(openclip.OPENCLIP, sd)
    assert set(got.unmapped) == {
        "encoder.layers.2.self_attn.q_proj.bias",
        "encoder.layers.2.self_attn.k_proj.bias",
    }
    assert "transformer.resblocks.2.attn.in_proj_bias" not in got.tensors
    assert "transformer.resblocks.2.attn.in_proj_weight" in got.tensors


def test_first_match_wins_read_only_is_not_written_and_clashes_are_reported():
    table = Table(
        rule("a.{i}.special.{rest}", "A.{i}.SPECIAL.{rest}"),
        read_only("a.{i}.{rest}", "A.{i}.old.{rest}"),
        rule("a.{i}.{rest}", "A.{i}.{rest}"),
        ignore("junk.{rest}"),
    )
    t = torch.zeros(1)
    assert list(to_theirs(table, {"a.1.special.w": t, "a.1.w": t}).tensors) == [
        "A.1.SPECIAL.w",
        "A.1.w",  # the read-only rule is never written
    ]
    got = to_ours(table, {"A.1.old.w": t, "A.1.w": t, "junk.x": t, "other": t})
    assert list(got.tensors) == ["a.1.w"] and got.tensors["a.1.w"] is t
    assert got.unmapped == ("A.1.w", "other")  # the second spelling clashes; "other" unknown
    assert got.ignored == ("junk.x",)


def test_fields_prefixes_and_transforms():
    r = under("blk.{i}.", "block_{i}.", [rule("{kind:q|k}.weight", "to_{kind}.weight", Conv1x1())])
    table = Table(r)
    w = torch.randn(3, 3, 1, 1)
    there = to_theirs(table, {"blk.7.q.weight": w}).tensors
    assert list(there) == ["block_7.to_q.weight"] and there["block_7.to_q.weight"].shape == (3, 3)
    assert to_ours(table, there).tensors["blk.7.q.weight"].shape == (3, 3, 1, 1)
    assert to_theirs(table, {"blk.x.q.weight": w}).unmapped == ("blk.x.q.weight",)  # {i}: digits
    with pytest.raises(ValueError, match="same fields"):
        rule("a.{i}", "b")
    with pytest.raises(ValueError, match="same fields"):
        rule("a.{i}.{part}", "b.{i}.{part}", Split("part", ("x", "y")))
    with pytest.raises(ValueError, match="twice"):
        rule("a.{i}.{i}", "b.{i}")
