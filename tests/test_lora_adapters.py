"""LoRA adapters: the low-rank change, trainable hooks, kohya files and merging.

Closed forms: a merged weight ``W + s * up @ down`` computes what the unmerged layer
``W x + s * up(down(x))`` computes (Linear, 3x3 LoCon, Tucker core); training hooks change
nothing until ``up`` moves and nothing after ``remove()``; a written kohya file reads back to
the same modules and diffusers' ``load_lora_weights`` reads it to the same U-Net / text
encoder outputs; unloading restores every tensor of the state dict bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from noisecraft.adapters import (
    AppliedLoRA,
    LoRAFile,
    LoRAModule,
    MergedLoRAs,
    add_trainable_lora,
    lora_targets,
    read_lora,
    write_kohya_lora,
)
from noisecraft.adapters.lora_keys import name_index
from noisecraft.errors import CheckpointError, ConfigError
from test_latent_pipeline import tiny_model


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_delta_linear_equals_unmerged_forward():
    g = _g(0)
    w, x = torch.randn(6, 5, generator=g), torch.randn(3, 5, generator=g)
    lora = LoRAModule(torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g), alpha=3.0)
    merged = x @ (w + lora.delta(0.7)).T
    unmerged = x @ w.T + 0.7 * (3.0 / 2) * (x @ lora.down.T) @ lora.up.T
    torch.testing.assert_close(merged, unmerged)
    assert LoRAModule(lora.down, lora.up).scale == 1.0  # alpha None = rank


def test_delta_conv_locon_and_tucker_equal_the_conv_chain():
    g = _g(1)
    w, x = torch.randn(6, 4, 3, 3, generator=g), torch.randn(2, 4, 7, 5, generator=g)
    down, up = torch.randn(3, 4, 3, 3, generator=g), torch.randn(6, 3, 1, 1, generator=g)
    lora = LoRAModule(down, up, alpha=1.5)
    got = F.conv2d(x, w + lora.delta(2.0), padding=1)
    want = F.conv2d(x, w, padding=1) + 2.0 * 0.5 * F.conv2d(F.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    d1, mid = torch.randn(3, 4, 1, 1, generator=g), torch.randn(3, 3, 3, 3, generator=g)
    tucker = LoRAModule(d1, up, alpha=None, mid=mid)
    got = F.conv2d(x, tucker.delta(), padding=1)
    want = F.conv2d(F.conv2d(F.conv2d(x, d1), mid, padding=1), up)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_lora_targets_names_every_layer_and_kohya_spellings():
    model = tiny_model()
    targets = lora_targets(model)
    key = "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert key in targets and "text_encoder.encoder.layers.1.self_attn.q_proj" in targets
    assert all(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in targets.values())
    index = name_index(model)
    for name in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",  # LDM, as A1111 reads
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",  # PEFT
    ):
        assert index[name] == key
    te = "text_encoder.encoder.layers.0.mlp.fc1"
    for name in (
        "lora_te_text_model_encoder_layers_0_mlp_fc1",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1",
    ):
        assert index[name] == te
    # resnet leaves and resamplers take diffusers' names
    assert index["lora_unet_down_blocks_0_resnets_0_conv1"] == "unet.input_blocks.1.0.in_layers.2"
    assert index["lora_unet_down_blocks_0_downsamplers_0_conv"] == "unet.input_blocks.2.0.op"


def _trained(model, keys, seed=1, rank=4, alpha=2.0, std=0.2):
    """The modules of a LoRA whose ``up`` is random (as if trained); the hooks removed."""
    lora = add_trainable_lora(model, keys, rank=rank, alpha=alpha, init_seed=seed)
    with torch.no_grad():
        for pair in lora.pairs:
            pair.up.weight.copy_(torch.randn(pair.up.weight.shape, generator=_g(seed)) * std)
    modules = lora.to_modules()
    lora.remove()
    return modules


def _unet_out(model, seed=0):
    g = _g(seed)
    x = torch.randn(2, 4, 6, 8, generator=g)
    ctx = torch.randn(2, 77, model.unet.config.context_dim, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10.0, 500.0]), context=ctx)


def _text_out(model):
    ids = model.tokenizer(["the cat"])
    with torch.no_grad():
        return model.encode_prompt(["the cat"]), ids


KEYS = (
    "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "unet.input_blocks.1.1.proj_in",  # 1x1 conv
    "unet.input_blocks.1.0.in_layers.2",  # 3x3 conv (LoCon)
    "unet.middle_block.1.transformer_blocks.0.ff.net.0.proj",
    "unet.output_blocks.3.1.transformer_blocks.0.attn1.to_out.0",
    "text_encoder.encoder.layers.0.self_attn.q_proj",
    # diffusers 0.42 reads kohya text-encoder files in its old layout only when they patch an
    # out_proj ("to_out_lora"); real kohya files always do
    "text_encoder.encoder.layers.0.self_attn.out_proj",
    "text_encoder.encoder.layers.1.mlp.fc2",
)


def test_trainable_lora_is_unmerged_merge_and_remove_restore():
    model = tiny_model()
    before = _unet_out(model)
    state = {k: v.clone() for k, v in model.unet.state_dict().items()}
    lora = add_trainable_lora(model, KEYS, rank=4, init_seed=3)
    assert torch.equal(_unet_out(model), before)  # up starts at zero
    assert all(p.requires_grad for p in lora.parameters())
    assert len(list(lora.parameters())) == 2 * len(KEYS)
    with torch.no_grad():
        for pair in lora.pairs:
            pair.up.weight.normal_(0, 0.2, generator=_g(4))
    hooked = _unet_out(model)
    assert not torch.allclose(hooked, before, atol=1e-3)
    modules = lora.to_modules()
    lora.remove()
    assert torch.equal(_unet_out(model), before)
    assert list(model.unet.state_dict()) == list(state)  # names unchanged
    merged = MergedLoRAs(model)
    merged.apply([AppliedLoRA.of(LoRAFile("x", Path("x"), modules, {}))])
    torch.testing.assert_close(_unet_out(model), hooked, atol=1e-5, rtol=1e-5)
    merged.restore()
    assert all(torch.equal(state[k], v) for k, v in model.unet.state_dict().items())


def test_trainable_lora_gradients_reach_lora_only():
    model = tiny_model()
    lora = add_trainable_lora(model, KEYS[:2], rank=2, init_seed=0)
    with torch.no_grad():
        for pair in lora.pairs:
            pair.up.weight.fill_(0.01)
    x = torch.randn(1, 4, 6, 8, generator=_g(0))
    ctx = torch.randn(1, 77, model.unet.config.context_dim, generator=_g(1))
    model.unet(x, torch.tensor([5.0]), context=ctx).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())
    lora.remove()


def test_trainable_lora_refuses_bad_targets():
    model = tiny_model()
    with pytest.raises(ConfigError, match="did you mean"):
        add_trainable_lora(model, ["unet.input_blocks.1.1.transformer_blocks.0.attn1.to_qq"], 4)
    with pytest.raises(ConfigError, match="rank"):
        add_trainable_lora(model, KEYS, 0)


def test_kohya_file_round_trip(tmp_path):
    model = tiny_model()
    modules = _trained(model, KEYS)
    path = write_kohya_lora(tmp_path / "style.safetensors", modules, {"ss_network_dim": "4"})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"ss_network_dim": "4"}
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in keys
    read = read_lora(path, model)
    assert read.name == "style" and set(read.modules) == set(modules)
    for k, m in modules.items():
        r = read.modules[k]
        assert torch.equal(r.down, m.down) and torch.equal(r.up, m.up) and r.alpha == m.alpha
    plain = dict(modules)  # no U-Net config: refused, or given by the model
    with pytest.raises(ConfigError, match="config"):
        write_kohya_lora(tmp_path / "x.safetensors", plain)
    write_kohya_lora(tmp_path / "x.safetensors", plain, model=model)


def test_pt_file_read_through_the_safe_reader(tmp_path):
    model = tiny_model()
    modules = _trained(model, KEYS)
    path = write_kohya_lora(tmp_path / "a.safetensors", modules)
    from safetensors.torch import load_file

    torch.save(load_file(path), tmp_path / "a.pt")
    read = read_lora(tmp_path / "a.pt", model)
    assert all(torch.equal(read.modules[k].up, m.up) for k, m in modules.items())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1), "x": Evil()}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError):
        read_lora(tmp_path / "e.pt", model)


def test_unload_restores_the_state_dict_bit_for_bit(tmp_path):
    model = tiny_model()
    state = {k: v.clone() for k, v in {**_sd(model)}.items()}
    a = _trained(model, KEYS, seed=1)
    b = _trained(model, KEYS[2:], seed=2, rank=3)
    pa = write_kohya_lora(tmp_path / "a.safetensors", a)
    pb = write_kohya_lora(tmp_path / "b.safetensors", b)
    fa, fb = read_lora(pa, model), read_lora(pb, model)
    merged = MergedLoRAs(model)
    base = _unet_out(model)
    merged.apply([AppliedLoRA.of(fa, 0.8), AppliedLoRA.of(fb, -0.5)])
    assert not torch.allclose(_unet_out(model), base, atol=1e-3)
    assert set(merged.patched) == set(KEYS)
    merged.apply([AppliedLoRA.of(fb, 1.0)])  # another set: from the originals
    assert set(merged.patched) == set(KEYS[2:])
    merged.restore()
    now = _sd(model)
    assert list(now) == list(state) and all(torch.equal(state[k], now[k]) for k in state)
    assert torch.equal(_unet_out(model), base)


def _sd(model):
    return {
        **{f"unet.{k}": v for k, v in model.unet.state_dict().items()},
        **{f"text_encoder.{k}": v for k, v in model.text_encoder.state_dict().items()},
    }


def test_two_loras_merge_as_the_sum_of_their_deltas(tmp_path):
    model = tiny_model()
    a = _trained(model, KEYS[:3], seed=1)
    b = _trained(model, KEYS[:3], seed=5, alpha=8.0)
    key = KEYS[0]
    w0 = lora_targets(model)[key].weight.detach().clone()
    fa = LoRAFile("a", tmp_path / "a", a, {})
    fb = LoRAFile("b", tmp_path / "b", b, {})
    MergedLoRAs(model).apply([AppliedLoRA.of(fa, 0.5), AppliedLoRA.of(fb, 2.0)])
    want = w0 + a[key].delta(0.5) + b[key].delta(2.0)
    torch.testing.assert_close(lora_targets(model)[key].weight, want)
    assert math.isclose(b[key].scale, 2.0)
