"""LoRA files: the layouts read (kohya spellings, PEFT, diffusers' older processor names,
LyCORIS' Tucker core) and the one-line refusals (another architecture, another kind)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from noisecraft.adapters import lora_modules_of, read_lora
from noisecraft.errors import CheckpointError
from test_latent_pipeline import WIDTH, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_kohya_spellings_and_alpha(model):
    sd = {
        # LDM-style U-Net name (A1111 reads it); 1x1 conv LoRA on a 1x1 conv
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": _r(2, 16, 1, 1),
        "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": _r(16, 2, 1, 1),
        "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(1.0, dtype=torch.float16),
        # lora_te1_ (SDXL-made files' first encoder) and the flat CLIP spelling
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": _r(2, WIDTH),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": _r(64, 2),
        "lora_te_encoder_layers_1_self_attn_k_proj.lora_down.weight": _r(3, WIDTH),
        "lora_te_encoder_layers_1_self_attn_k_proj.lora_up.weight": _r(WIDTH, 3),
    }
    mods = lora_modules_of(sd, model)
    assert set(mods) == {
        "unet.input_blocks.1.1.proj_in",
        "text_encoder.encoder.layers.0.mlp.fc1",
        "text_encoder.encoder.layers.1.self_attn.k_proj",
    }
    assert mods["unet.input_blocks.1.1.proj_in"].scale == 0.5
    assert mods["text_encoder.encoder.layers.1.self_attn.k_proj"].alpha is None


def test_diffusers_old_processor_layout_and_peft_adapter_names(model):
    sd = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
        ".down.weight": _r(2, 16),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
        ".up.weight": _r(16, 2),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": _r(2, WIDTH),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": _r(WIDTH, 2),
        "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_linear_layer.down.weight": _r(2, 64),
        "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_linear_layer.up.weight": _r(
            WIDTH, 2
        ),
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.default.weight": _r(
            2, WIDTH
        ),
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.default.weight": _r(
            16, 2
        ),
    }
    assert set(lora_modules_of(sd, model)) == {
        "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
        "text_encoder.encoder.layers.0.self_attn.q_proj",
        "text_encoder.encoder.layers.1.mlp.fc2",
        "unet.output_blocks.2.1.transformer_blocks.0.attn2.to_v",
    }


def test_locon_tucker_core_is_read(model):
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    sd = {
        f"{name}.lora_down.weight": _r(2, 16, 1, 1),
        f"{name}.lora_mid.weight": _r(2, 2, 3, 3),
        f"{name}.lora_up.weight": _r(16, 2, 1, 1),
    }
    lora = lora_modules_of(sd, model)["unet.input_blocks.1.0.in_layers.2"]
    assert lora.kernel_size == (3, 3) and lora.delta().shape == (16, 16, 3, 3)


def _sdxl_like() -> dict[str, torch.Tensor]:
    sd = {}
    for i in range(3):  # SDXL's second text encoder: no such model part here
        k = f"lora_te2_text_model_encoder_layers_{i}_self_attn_q_proj"
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = _r(4, 1280), _r(1280, 4)
        sd[f"{k}.alpha"] = torch.tensor(4.0)
    k = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"  # 2048-d context
    sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = _r(4, 2048), _r(16, 4)
    return sd


def test_sdxl_lora_is_refused_in_one_line_counting_keys(model, tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file(_sdxl_like(), str(path))
    with pytest.raises(CheckpointError) as e:
        read_lora(path, model)
    msg = str(e.value)
    assert msg == (
        "xl.safetensors: 9 of 11 LoRA keys match no layer of this model; 2 of 11 do not fit "
        "their layer's shape (e.g. lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k: "
        "16x2048 for a 16x32 weight) (an SDXL LoRA?); it does not fit this model"
    )


def test_sd2_lora_is_refused(model):
    k = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd = {f"{k}.lora_down.weight": _r(4, 1024), f"{k}.lora_up.weight": _r(1024, 4)}
    with pytest.raises(CheckpointError, match=r"2 of 2 do not fit .*\(an SD 2\.x LoRA\?\)"):
        lora_modules_of(sd, model, "sd2.safetensors")


def test_other_kinds_and_non_lora_files_are_refused(model):
    with pytest.raises(CheckpointError, match="LoHa file, not a LoRA"):
        lora_modules_of({"lora_unet_x.hada_w1_a": _r(2, 2)}, model)
    with pytest.raises(CheckpointError, match="holds no LoRA weights"):
        lora_modules_of({"model.diffusion_model.out.0.weight": _r(2)}, model)


def test_every_kohya_sd15_module_maps_to_our_sd15_layers():
    """kohya's SD 1.x LoRA modules, named the way its ``networks/lora.py`` names them (every
    Linear / 1x1 Conv2d under diffusers' ``Transformer2DModel`` and transformers'
    ``CLIPAttention`` / ``CLIPMLP``, ``.`` -> ``_``), built on the meta device from diffusers'
    and transformers' own SD 1.5 models: all 192 + 72 find a layer of ours of the same shape."""
    import types

    import transformers
    from diffusers import UNet2DConditionModel

    from noisecraft.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
    from noisecraft.models.unet import UNet, UNetConfig

    def kohya(prefix, root, parents):
        out = {}
        for name, module in root.named_modules():
            if type(module).__name__ not in parents:
                continue
            for child_name, child in module.named_modules():
                is_conv1x1 = isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
                if isinstance(child, torch.nn.Linear) or is_conv1x1:
                    full = f"{name}.{child_name}".removeprefix("text_model.").replace(".", "_")
                    out[prefix + full] = child.weight.shape
        return out

    with torch.device("meta"):
        theirs = {
            **kohya(
                "lora_unet_",
                UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8),
                {"Transformer2DModel"},
            ),
            **kohya(  # kohya's files have text_model. (transformers 4's names)
                "lora_te_text_model_",
                transformers.CLIPTextModel(
                    transformers.CLIPTextConfig(
                        hidden_size=768, intermediate_size=3072, num_attention_heads=12
                    )
                ),
                {"CLIPAttention", "CLIPMLP"},
            ),
        }
        ours = types.SimpleNamespace(
            unet=UNet(UNetConfig.sd15()), text_encoder=CLIPTextEncoder(TextEncoderConfig())
        )
    assert len(theirs) == 192 + 72
    sd = {}
    for name, shape in theirs.items():
        sd[f"{name}.lora_down.weight"] = torch.empty(4, *shape[1:], device="meta")
        sd[f"{name}.lora_up.weight"] = torch.empty(shape[0], 4, *shape[2:], device="meta")
    assert len(lora_modules_of(sd, ours)) == 264
