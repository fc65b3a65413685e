"""ControlNet files (io/controlnet_files.py): parity with diffusers' ControlNetModel (its own
single-file loader and folders), round trips, layouts, refusals.

Tiny random ControlNets; 16x12 latents (128x96 control images) keep the deepest level above
1x1 (notes/diffusers-parity.md).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file, save_file

from helpers import jitter
from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.controlnet_files import (
    convert_controlnet,
    is_controlnet,
    load_controlnet,
    save_controlnet,
)
from noisecraft.models.controlnet import ControlNet, ControlNetConfig
from noisecraft.models.unet import UNetConfig

BASE = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=2,
    attention_levels=(0, 1),
    num_heads=2,
    norm_groups=8,
    context_dim=24,
)
HINT = (8, 16, 16, 32)


def _reference_kwargs(use_linear: bool = False) -> dict:
    """diffusers' ControlNetModel of :data:`BASE`'s size, in its own words."""
    return dict(
        in_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=2,  # the number of heads (diffusers' historical misnomer)
        norm_num_groups=8,
        use_linear_projection=use_linear,
        conditioning_embedding_out_channels=HINT,
    )


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 12, generator=g)
    t = torch.tensor([10.0, 500.5])
    ctx = torch.randn(2, 7, 24, generator=g)
    hint = torch.rand(2, 3, 128, 96, generator=g)
    return x, t, ctx, hint


def _ours(seed: int = 0, base: UNetConfig = BASE) -> ControlNet:
    torch.manual_seed(seed)
    return jitter(ControlNet(ControlNetConfig(base, HINT)), seed)


def _assert_same_residuals(ours: ControlNet, ref: ControlNetModel, **options) -> None:
    x, t, ctx, hint = _inputs()
    scale = options.pop("scale", 1.0)
    with torch.no_grad():
        downs, mid = ours(x, t, ctx, hint, scale=scale, **options)
        want = ref(x, t, ctx, hint, conditioning_scale=scale, return_dict=False, **options)
    assert len(downs) == len(want[0])
    for got, ref_down in zip(downs, want[0], strict=True):
        torch.testing.assert_close(got, ref_down, atol=2e-5, rtol=0)
    torch.testing.assert_close(mid, want[1], atol=2e-5, rtol=0)
    assert mid.abs().max() > 1e-2  # the comparison is not between zeros


def _state_equal(a: ControlNet, b: ControlNet) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("use_linear", [False, True], ids=["sd1", "sd2-linear"])
def test_diffusers_folder_loads_with_the_same_residuals(tmp_path, use_linear):
    torch.manual_seed(0)
    ref = jitter(ControlNetModel(**_reference_kwargs(use_linear)))
    ref.save_pretrained(tmp_path / "cn")
    base = dataclasses.replace(BASE, use_linear_projection=use_linear)
    ours = load_controlnet(tmp_path / "cn", base)
    assert ours.controlnet_config == ControlNetConfig(base, HINT)
    assert is_controlnet(tmp_path / "cn")
    _assert_same_residuals(ours, ref)
    _assert_same_residuals(ours, ref, scale=0.55)
    _assert_same_residuals(ours, ref, scale=0.8, guess_mode=True)


def test_single_file_loads_in_diffusers_from_single_file(tmp_path):
    """Our original-layout file, read by diffusers' own converter (``from_single_file``;
    ``config=`` a local folder holding the reference's config, so nothing is downloaded)."""
    ours = _ours(1)
    path = save_controlnet(ours, tmp_path / "control_tiny.safetensors")
    assert all(k.startswith("control_model.") for k in load_file(path))
    ControlNetModel(**_reference_kwargs()).save_config(tmp_path / "config")
    ref = ControlNetModel.from_single_file(
        str(path), config=str(tmp_path / "config"), local_files_only=True
    ).eval()
    _assert_same_residuals(ours, ref)
    _assert_same_residuals(ours, ref, scale=0.7, guess_mode=True)


def test_diffusers_round_trip_and_convert_are_bit_exact(tmp_path):
    ours = _ours(2)
    save_controlnet(ours, tmp_path / "folder", format="diffusers")
    back = load_controlnet(tmp_path / "folder")
    assert back.controlnet_config == ours.controlnet_config
    _state_equal(ours, back)
    # single file -> diffusers -> single file, in the stored dtype (fp16 here)
    single = save_controlnet(ours, tmp_path / "a.safetensors", dtype=torch.float16)
    convert_controlnet(single, tmp_path / "b", "diffusers")
    convert_controlnet(tmp_path / "b", tmp_path / "c.safetensors", "single-file")
    a, c = load_file(single), load_file(tmp_path / "c.safetensors")
    assert a.keys() == c.keys()
    assert all(c[k].dtype == torch.float16 and torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ConfigError, match="convert it with to single-file or diffusers"):
        convert_controlnet(single, tmp_path / "d.safetensors", "noisecraft")


def test_convert_command_converts_controlnets(tmp_path, capsys):
    from noisecraft.cli.main import main

    ours = _ours(7)
    single = save_controlnet(ours, tmp_path / "cn.safetensors")
    assert main(["convert", str(single), str(tmp_path / "cn"), "--to", "diffusers"]) == 0
    assert "converted" in capsys.readouterr().out
    _state_equal(ours, load_controlnet(tmp_path / "cn"))
    assert main(["convert", str(tmp_path / "cn"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--to single-file or diffusers" in err
    assert len(err.strip().splitlines()) == 1


def test_full_pruned_and_pth_layouts_give_the_same_model(tmp_path):
    """Foreign files carry no config: it is inferred from the shapes (heads from the base)."""
    ours = _ours(3)
    state = {k: v.contiguous() for k, v in ours.state_dict().items()}
    save_file({"control_model." + k: v for k, v in state.items()}, tmp_path / "full.safetensors")
    save_file(state, tmp_path / "control_pruned_fp16.safetensors")
    full_pth = {"control_model." + k: v for k, v in state.items()}
    full_pth["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 3)  # a 1.0 full file
    torch.save({"state_dict": full_pth}, tmp_path / "control_v11p_tiny.pth")
    for name in ("full.safetensors", "control_pruned_fp16.safetensors", "control_v11p_tiny.pth"):
        assert is_controlnet(tmp_path / name)
        got = load_controlnet(tmp_path / name, BASE)
        assert got.controlnet_config == ours.controlnet_config, name
        _state_equal(ours, got)


def test_a_controlnet_for_another_base_is_refused_in_one_line(tmp_path):
    sd2 = dataclasses.replace(BASE, context_dim=1024, use_linear_projection=True, num_heads=4)
    path = save_controlnet(_ours(4, sd2), tmp_path / "sd2.safetensors")
    sd1 = dataclasses.replace(BASE, context_dim=768)
    with pytest.raises(CheckpointError) as e:
        load_controlnet(path, sd1)
    message = str(e.value)
    assert "\n" not in message
    assert "ControlNet for SD 2.x (context width 1024)" in message
    assert "the model is SD 1.x" in message and "use a ControlNet made for" in message
    wider = dataclasses.replace(BASE, model_channels=16)
    with pytest.raises(CheckpointError, match=r"U-Net layout \(channels 32 x \[1, 2\]"):
        load_controlnet(save_controlnet(_ours(5), tmp_path / "a.safetensors"), wider)


def test_other_files_are_refused(tmp_path):
    state = {k: v.contiguous() for k, v in _ours(6).state_dict().items()}
    xl = dict(state, **{"label_emb.0.0.weight": torch.zeros(8, 2816)})
    save_file(xl, tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="SDXL ControlNet; SDXL is not supported"):
        load_controlnet(tmp_path / "xl.safetensors")
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(1)}, tmp_path / "m.safetensors")
    assert not is_controlnet(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="is not a ControlNet"):
        load_controlnet(tmp_path / "m.safetensors")
    from noisecraft.io.formats.auto import load_any

    save_controlnet(_ours(6), tmp_path / "cn", format="diffusers")
    for path in (tmp_path / "cn", save_controlnet(_ours(6), tmp_path / "cn.safetensors")):
        with pytest.raises(CheckpointError, match="is a ControlNet, not a model"):
            load_any(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers ControlNetModel folder"):
        load_controlnet(tmp_path / "empty")
