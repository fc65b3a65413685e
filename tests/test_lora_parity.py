"""LoRA parity with diffusers: the same image as ``StableDiffusionPipeline.load_lora_weights``
+ ``set_adapters(names, adapter_weights)`` (PEFT 0.21 backend, unmerged LoRA layers), on the
tiny random SD pipeline built from our weights, within 2/255.

Random LoRA files in kohya's layout (written by :func:`write_kohya_lora`: U-Net attention,
1x1 and 3x3 convs, text encoder) and in the diffusers / PEFT layout (``lora_A`` / ``lora_B``,
alphas in ``lora_adapter_metadata``), one at a time and two at once with different weights.
"""

from __future__ import annotations

import json

import pytest
import torch

from noisecraft.adapters import AppliedLoRA, MergedLoRAs, read_lora, write_kohya_lora
from noisecraft.adapters.lora_keys import diffusers_names
from noisecraft.pipelines import generate
from test_latent_pipeline import H, W, _diffusers_components, _req, tiny_model
from test_lora_adapters import KEYS, _trained

PEFT_KEYS = (  # attention and feed-forward Linear layers (PEFT's usual targets)
    "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_v",
    "unet.input_blocks.1.1.transformer_blocks.0.attn2.to_q",
    "unet.middle_block.1.transformer_blocks.0.ff.net.2",
    "unet.output_blocks.2.1.transformer_blocks.0.attn2.to_out.0",
    "text_encoder.encoder.layers.0.self_attn.v_proj",
    "text_encoder.encoder.layers.1.self_attn.out_proj",
)


def _write_peft(path, model, modules, alpha):
    """``modules`` in diffusers' PEFT layout, alpha in ``lora_adapter_metadata``."""
    from safetensors.torch import save_file

    names = diffusers_names(list(modules), model.unet.config)
    tensors = {}
    for key, m in modules.items():
        tensors[f"{names[key]}.lora_A.weight"] = m.down.contiguous()
        tensors[f"{names[key]}.lora_B.weight"] = m.up.contiguous()
    rank = next(iter(modules.values())).rank
    config = {}
    for c in ("unet", "text_encoder"):
        paths = [n.split(".", 1)[1] for n in names.values() if n.startswith(c + ".")]
        config[f"{c}.r"], config[f"{c}.lora_alpha"] = rank, alpha
        config[f"{c}.target_modules"] = sorted(p.removeprefix("text_model.") for p in paths)
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    model = tiny_model()
    kohya = write_kohya_lora(d / "style.safetensors", _trained(model, KEYS, seed=1, std=0.5))
    peft = _write_peft(
        d / "peft.safetensors", model, _trained(model, PEFT_KEYS, 2, 4, 4.0, 1.0), 2.0
    )
    return {"kohya": kohya, "peft": peft, "dir": d}


CASES = {
    "kohya": [("kohya", 0.8)],
    "peft": [("peft", 1.0)],
    "both": [("kohya", 0.6), ("peft", -1.2)],
}


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # two adapters
@pytest.mark.parametrize("case", list(CASES))
def test_same_image_as_diffusers(case, files, tmp_path):
    import diffusers

    model = tiny_model()
    loras = CASES[case]
    parts = _diffusers_components(model, tmp_path)
    pipe = diffusers.StableDiffusionPipeline(**parts)
    for name, _ in loras:
        pipe.load_lora_weights(str(files[name]), adapter_name=name)
    pipe.set_adapters([n for n, _ in loras], adapter_weights=[w for _, w in loras])
    prompt, negative, steps, cfg, seed = "the cat", "a dog", 4, 5.0, 21
    with torch.no_grad():
        want = pipe(
            prompt=prompt,
            negative_prompt=negative,
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=[torch.Generator().manual_seed(seed)],
            output_type="pt",
            height=H,
            width=W,
        ).images
    req = dict(prompts=[prompt], negative_prompt=negative, steps=steps, cfg=cfg, seeds=[seed])
    base = (generate(model, _req(**req)) / 2 + 0.5).clamp(0, 1)
    merged = MergedLoRAs(model)
    merged.apply([AppliedLoRA.of(read_lora(files[n], model), w) for n, w in loras])
    got = (generate(model, _req(**req)) / 2 + 0.5).clamp(0, 1)
    assert (got - base).abs().max() > 10 / 255  # the LoRA changes the image
    assert (got - want.float()).abs().max() <= 2 / 255  # measured: <= 2e-6 (float rounding)
