"""The CLIP text encoder: parity with transformers' CLIPTextModel (test-only), causality,
clip skip, A1111 prompt chunks and weights, preset sizes, and user errors.

Parity builds a tiny random ``CLIPTextModel`` (jittered so LayerNorms and biases are not at
their 1 / 0 init), loads its state dict through ``load_transformers_state_dict`` and compares
outputs: if that load is strict and the outputs agree, our names and math are transformers'.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from noisecraft.errors import CheckpointError, ConfigError, UnknownNameError
from noisecraft.models.text_encoder import (
    CLIPTextEncoder,
    TextEncoderConfig,
    encode_prompt_chunks,
)

VOCAB, WIDTH, LAYERS, HEADS, MLP, POSITIONS = 1000, 32, 2, 4, 64, 77
EOT = VOCAB - 1  # like CLIP's 49407: the largest id, so argmax finds it


def _hf(act: str = "quick_gelu", eos: int = 2, layers: int = LAYERS, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
        hidden_act=act,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=eos,
    )
    model = CLIPTextModel(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _ours_from(hf: CLIPTextModel) -> CLIPTextEncoder:
    ours = CLIPTextEncoder(TextEncoderConfig.from_transformers(hf.config.to_dict())).eval()
    ours.load_transformers_state_dict(hf.state_dict())
    return ours


def _ids(batch: int = 3, length: int = POSITIONS, pad: int = EOT, seed: int = 0) -> torch.Tensor:
    """BOS, random words, EOT, then padding (EOT for SD 1.x, 0 for SD 2.x)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), pad, dtype=torch.long)
    for b in range(batch):
        n = int(torch.randint(1, length - 2, (1,), generator=g))
        ids[b, 0] = 0
        ids[b, 1 : n + 1] = torch.randint(3, EOT - 1, (n,), generator=g)
        ids[b, n + 1] = EOT
    return ids


def _tiny(**kw) -> CLIPTextEncoder:
    torch.manual_seed(0)
    config = TextEncoderConfig(
        vocab_size=VOCAB, width=WIDTH, layers=LAYERS, heads=HEADS, intermediate_size=MLP, **kw
    )
    return CLIPTextEncoder(config).eval()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("pad", [EOT, 0])
@torch.no_grad()
def test_parity_with_transformers(act: str, pad: int):
    hf = _hf(act)
    ours = _ours_from(hf)
    ids = _ids(pad=pad)
    ref = hf(ids, output_hidden_states=True)
    out = ours(ids, output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=1e-5, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == LAYERS + 1
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@torch.no_grad()
def test_clip_skip_2_is_penultimate_then_final_layer_norm(act: str):
    """diffusers' ``encode_prompt(clip_skip=1)``: ``final_layer_norm(hidden_states[-2])``."""
    hf = _hf(act)
    ours = _ours_from(hf)
    ids = _ids()
    ref = hf(ids, output_hidden_states=True)
    out = ours(ids, clip_skip=2)
    expected = hf.final_layer_norm(ref.hidden_states[-2])
    torch.testing.assert_close(out.last_hidden_state, expected, atol=1e-5, rtol=0)
    # pooled stays the final layer's (transformers' pooler_output), whatever clip_skip is
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=1e-5, rtol=0)
    assert not torch.allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-3)


@torch.no_grad()
def test_pooled_at_first_eos_when_eos_id_is_set():
    """transformers' non-legacy path: first position of ``eos_token_id``, not the argmax."""
    eos = 500
    hf = _hf(eos=eos)
    ours = _ours_from(hf)
    assert ours.config.eos_token_id == eos
    ids = _ids(pad=EOT)  # EOT (999) is now just a large id; put eos somewhere before it
    ids[:, 7] = eos
    ids[1, 3] = eos
    torch.testing.assert_close(ours(ids).pooled, hf(ids).pooler_output, atol=1e-5, rtol=0)


@torch.no_grad()
def test_attention_mask_parity():
    hf = _hf()
    ours = _ours_from(hf)
    ids = _ids(pad=0)
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0
    mask[2, 5:] = 0
    ref = hf(ids, attention_mask=mask)
    out = ours(ids, attention_mask=mask)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)
    assert not torch.allclose(out.last_hidden_state, ours(ids).last_hidden_state, atol=1e-4)


@torch.no_grad()
def test_causal():
    model = _tiny()
    ids = _ids(batch=1, seed=3)
    changed = ids.clone()
    changed[0, 10] = 123 if ids[0, 10] != 123 else 124
    a, b = model(ids).last_hidden_state, model(changed).last_hidden_state
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-4)


@torch.no_grad()
def test_chunks_are_separate_encodings_concatenated():
    model = _tiny()
    ids = _ids(batch=2, seed=5)
    z = encode_prompt_chunks(model, ids)
    assert z.shape == (1, 2 * POSITIONS, WIDTH)
    separate = torch.cat([model(ids[i : i + 1]).last_hidden_state for i in range(2)], dim=1)
    torch.testing.assert_close(z, separate, atol=1e-6, rtol=0)
    # all-1.0 weights are the identity; clip_skip reaches the encoder
    assert torch.equal(encode_prompt_chunks(model, ids, torch.ones(ids.shape)), z)
    skipped = encode_prompt_chunks(model, ids, clip_skip=2)
    torch.testing.assert_close(
        skipped[:, :POSITIONS], model(ids[:1], clip_skip=2).last_hidden_state, atol=1e-6, rtol=0
    )


@torch.no_grad()
def test_chunk_weights_follow_a1111_original_emphasis():
    model = _tiny()
    ids = _ids(batch=2, seed=6)
    weights = torch.ones(ids.shape)
    weights[0, 3:6] = 1.3  # "(a b c:1.3)"
    weights[1, 2] = 0.7
    z = encode_prompt_chunks(model, ids).reshape(2, POSITIONS, WIDTH)
    zw = encode_prompt_chunks(model, ids, weights).reshape(2, POSITIONS, WIDTH)
    assert not torch.allclose(z, zw, atol=1e-3)
    for i in range(2):  # per chunk: z * w, then rescaled to the original mean
        torch.testing.assert_close(zw[i].mean(), z[i].mean(), atol=1e-6, rtol=1e-5)
        scaled = z[i] * weights[i, :, None]
        torch.testing.assert_close(zw[i], scaled * (z[i].mean() / scaled.mean()))


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _hf_meta(**kw) -> CLIPTextModel:
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**kw))


@pytest.mark.parametrize(
    ("preset", "hf_kw", "expected"),
    [
        (TextEncoderConfig.sd15(), {"hidden_size": 768, "intermediate_size": 3072,
          "num_hidden_layers": 12, "num_attention_heads": 12}, 123_060_480),
        (TextEncoderConfig.sd2(), {"hidden_size": 1024, "intermediate_size": 4096,
          "num_hidden_layers": 24, "num_attention_heads": 16, "hidden_act": "gelu"}, 352_984_064),
        (TextEncoderConfig.sd2(layers=23, clip_skip=1), {"hidden_size": 1024,
          "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
          "hidden_act": "gelu"}, 340_387_840),
    ],
    ids=["sd15", "sd2", "sd2-diffusers-23-layers"],
)  # fmt: skip
def test_preset_sizes_match_transformers(preset: TextEncoderConfig, hf_kw: dict, expected: int):
    with torch.device("meta"):
        ours = CLIPTextEncoder(preset)
    hf = _hf_meta(vocab_size=49408, max_position_embeddings=77, **hf_kw)
    assert _n_params(ours) == _n_params(hf) == expected
    ref = {k: tuple(v.shape) for k, v in hf.state_dict().items() if "position_ids" not in k}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref


def test_presets():
    sd15, sd2 = TextEncoderConfig.sd15(), TextEncoderConfig.sd2()
    assert (sd15.width, sd15.layers, sd15.heads, sd15.activation) == (768, 12, 12, "quick_gelu")
    assert (sd15.clip_skip, sd15.max_positions, sd15.vocab_size) == (1, 77, 49408)
    assert (sd2.width, sd2.layers, sd2.heads, sd2.intermediate_size) == (1024, 24, 16, 4096)
    assert (sd2.activation, sd2.clip_skip, sd2.head_dim) == ("gelu", 2, 64)


@torch.no_grad()
def test_sd2_23_layer_folder_equals_24_layers_with_clip_skip_2():
    """diffusers SD 2.x folders drop the unused last layer; the context is the same."""
    hf = _hf("gelu", layers=3)
    full = _ours_from(hf)
    d = {**hf.config.to_dict(), "num_hidden_layers": 2}
    cut = CLIPTextEncoder(TextEncoderConfig.from_transformers(d))
    cut.load_transformers_state_dict(
        {k: v for k, v in hf.state_dict().items() if "layers.2." not in k}
    )
    ids = _ids(pad=0)
    a, b = full(ids, clip_skip=2).last_hidden_state, cut(ids).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_load_accepts_text_model_prefix_and_position_ids():
    hf = _hf()
    sd = {f"text_model.{k}": v for k, v in hf.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(POSITIONS)[None]
    ours = _tiny()
    ours.load_transformers_state_dict(sd)
    torch.testing.assert_close(ours.final_layer_norm.bias, hf.final_layer_norm.bias)


def test_load_rejects_other_layouts():
    ours = _tiny()
    with pytest.raises(CheckpointError, match="3 layers, the config 2"):
        ours.load_transformers_state_dict(_hf(layers=3).state_dict())
    sd = dict(_hf().state_dict())
    sd["final_layer_norm.weight"] = torch.ones(WIDTH + 1)
    with pytest.raises(CheckpointError, match="another shape"):
        ours.load_transformers_state_dict(sd)


def test_config_round_trip_and_validation():
    for config in (TextEncoderConfig.sd15(), TextEncoderConfig.sd2(eos_token_id=49407)):
        d = json.loads(json.dumps(config.to_dict()))
        assert TextEncoderConfig.from_dict(d) == config
    with pytest.raises(ConfigError, match="did you mean 'layers'"):
        TextEncoderConfig.from_dict({"layer": 3})
    with pytest.raises(ConfigError, match="must divide width"):
        TextEncoderConfig(width=30, heads=4)
    with pytest.raises(UnknownNameError, match="quick_gelu"):
        TextEncoderConfig(activation="quickgelu")
    with pytest.raises(ConfigError, match="clip_skip"):
        TextEncoderConfig(layers=2, clip_skip=3)


@torch.no_grad()
def test_bad_input_says_what_to_do():
    model = _tiny()
    with pytest.raises(ConfigError, match="chunk") as info:
        model(torch.zeros(1, POSITIONS + 1, dtype=torch.long))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="vocabulary"):
        model(torch.full((1, 5), VOCAB))
    with pytest.raises(ConfigError, match="clip_skip"):
        model(_ids(batch=1), clip_skip=0)
    with pytest.raises(ConfigError, match="clip_skip"):
        model(_ids(batch=1), clip_skip=LAYERS + 1)
    with pytest.raises(ConfigError, match="shape of the token ids"):
        encode_prompt_chunks(model, _ids(batch=2), torch.ones(2, 5))
