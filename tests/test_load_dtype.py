"""Loading with a U-Net dtype of its own, and building modules without their random init.

``load_any(..., unet_dtype=torch.bfloat16)`` (what ``noisecraft.load(dtype="bf16")`` uses on
the CPU) casts the U-Net's weights straight from the file: the result must be bit-identical
to loading in float32 and casting afterwards (an fp16 -> fp32 widening is exact, so fp16 ->
bf16 directly and through fp32 round the same), in every format, with the text encoder and
the VAE left in float32.
"""

from __future__ import annotations

import pytest
import torch

from helpers import narrow_sd15_model
from noisecraft.io.build import build_module, no_init
from noisecraft.io.formats.auto import load_any
from noisecraft.io.formats.diffusers_write import save_diffusers_folder
from noisecraft.io.formats.single_file import save_single_file
from noisecraft.io.native import save_model
from noisecraft.models.text_encoder import CLIPTextEncoder, TextEncoderConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype")
    model = narrow_sd15_model(seed=3)
    paths = {
        "single file fp16": root / "sd_fp16.safetensors",
        "single file fp32": root / "sd.safetensors",
        "diffusers folder": root / "folder",
        "native": root / "native.safetensors",
    }
    save_single_file(model, paths["single file fp16"], dtype=torch.float16)
    save_single_file(model, paths["single file fp32"])
    save_diffusers_folder(model, paths["diffusers folder"])
    save_model(model, paths["native"])
    return paths


@pytest.mark.parametrize(
    "fmt", ["single file fp16", "single file fp32", "diffusers folder", "native"]
)
def test_unet_dtype_casts_straight_from_the_file(files, fmt):
    direct = load_any(files[fmt], unet_dtype=torch.bfloat16)
    reference = load_any(files[fmt])
    assert {p.dtype for p in direct.unet.parameters()} == {torch.bfloat16}
    for part in ("text_encoder", "vae"):
        assert {p.dtype for p in getattr(direct, part).parameters()} == {torch.float32}
    ref_sd = reference.unet.to(torch.bfloat16).state_dict()
    for key, value in direct.unet.state_dict().items():
        assert torch.equal(value, ref_sd[key]), key


def test_no_init_skips_the_initialisers_and_restores_them():
    t = torch.zeros(3)
    with no_init():
        assert torch.nn.init.normal_(t) is t
        torch.nn.init.kaiming_uniform_(t.view(1, 3))
        assert not t.any()
    torch.nn.init.normal_(t)  # back to the real one
    assert t.any()


def test_build_module_gives_the_weights_it_was_given():
    config = TextEncoderConfig(vocab_size=50, width=8, layers=1, heads=2, intermediate_size=16)
    torch.manual_seed(0)
    source = CLIPTextEncoder(config).state_dict()
    built = build_module(lambda: CLIPTextEncoder(config), source, what="text", source="x")
    for key, value in built.state_dict().items():
        assert torch.equal(value, source[key]), key
