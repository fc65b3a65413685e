"""The opt-in ``torch.compile`` path (noisecraft.pipelines.compile, ``generate --compile``):
a compiled U-Net computes what the eager one does, and stays the same module."""

from __future__ import annotations

import torch

from noisecraft.errors import ConfigError
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.pipelines.compile import compile_unet, is_compiled
from noisecraft.pipelines.fast import FAST
from test_latent_pipeline import tiny_model


def test_compiled_generation_equals_eager():
    """At 136x104 (latents 17x13): the compiled graph follows the U-Net's upsampling to an
    odd skip size (9x7 -> 17x13) as the eager forward does."""
    model = tiny_model()
    request = GenerateRequest(
        prompts=["the cat"], n=1, steps=3, cfg=4.0, seed=1, height=104, width=136
    )
    eager = generate(model, request)
    state = {k: v.clone() for k, v in model.unet.state_dict().items()}
    assert compile_unet(model) is model and is_compiled(model.unet)
    compiled = generate(model, request)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert type(model.unet).__name__ == "UNet"
    after = model.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_compile_refuses_a_model_without_unet():
    try:
        compile_unet(object())
    except ConfigError as e:
        assert "U-Net" in str(e)
    else:
        raise AssertionError("no error")


def test_fast_mode_and_compile_do_not_mix():
    """DeepCache changes which U-Net blocks run from call to call: not for a compiled graph."""
    model = compile_unet(tiny_model())
    try:
        generate(model, FAST.request(prompts=["the cat"], n=1, steps=2))
    except ConfigError as e:
        assert str(e) == e.render() and "compile" in str(e) and "fast (DeepCache)" in str(e)
        assert "--compile" in e.render({"compile": "--compile"})
    else:
        raise AssertionError("no error")
