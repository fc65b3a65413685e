"""Low-memory mode (noisecraft.pipelines.lowmem): fp16 / int8 weight storage, fp32 compute."""

from __future__ import annotations

import pytest
import torch

from noisecraft.errors import ConfigError, UnknownNameError
from noisecraft.io.file_pages import FilePages
from noisecraft.io.formats.single_file import save_single_file
from noisecraft.io.native import save_model
from noisecraft.pipelines import generate
from noisecraft.pipelines.lowmem import (
    load_low_memory,
    low_memory,
    quantize_per_channel,
)
from noisecraft.pipelines.offload import dequantize
from test_latent_pipeline import H, W, _req, tiny_model


def _stored(model) -> dict[str, torch.dtype]:
    return {
        f"{part}.{n}": b.dtype
        for part in ("unet", "text_encoder", "vae")
        for n, b in getattr(model, part).named_buffers()
        if n.endswith("weight")
    }


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return generate(tiny_model(), _req(height=H, width=W))


def test_quantize_per_channel_round_trip():
    g = torch.Generator().manual_seed(0)
    w = (
        torch.randn(6, 5, 3, 3, generator=g)
        * torch.tensor([1, 10, 0.01, 1, 1, 1])[:, None, None, None]
    )
    w[3] = 0  # an all-zero output channel
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (6, 1, 1, 1)
    assert int(q.abs().max()) == 127  # each non-zero row uses the full range
    back = dequantize(q, scale)
    assert back.dtype == torch.float32
    assert bool(((back - w).abs() <= scale / 2 + 1e-7).all())  # half a step at most
    assert bool((back[3] == 0).all())


def test_weights_are_stored_narrow_and_compute_is_float32():
    model = low_memory(tiny_model(), "int8", vae="fp16", min_elements=0)
    stored = _stored(model)
    assert stored["unet.input_blocks.0.0.weight"] == torch.int8
    assert stored["text_encoder.embeddings.token_embedding.weight"] == torch.int8
    assert stored["vae.decoder.up.0.block.0.conv1.weight"] == torch.float16
    assert "unet.time_embed.0.weight" not in stored  # its dtype is read by UNet.forward
    # parameters() (what the pipeline reads for the input dtype) are float32 only
    for part in (model.unet, model.text_encoder, model.vae):
        assert {p.dtype for p in part.parameters()} == {torch.float32}
    # a stored layer sees a float32 weight in its forward, and gets its storage back after
    conv = model.unet.input_blocks[0][0]
    seen = []
    handle = conv.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    generate(model, _req(height=H, width=W, steps=1))
    handle.remove()
    assert seen and set(seen) == {torch.float32}
    assert conv.weight.dtype == torch.int8
    model.offload.remove()
    assert not model.offload.hooked


def test_fp16_storage_changes_images_by_rounding_only(reference):
    """fp16 weights, fp32 arithmetic: max pixel change <= 1e-2 (measured 1.3e-3 on this
    tiny random model); int8: <= 0.1 (measured 0.020)."""
    fp16 = generate(low_memory(tiny_model(), "fp16", min_elements=0), _req(height=H, width=W))
    assert (fp16 - reference).abs().max() <= 1e-2
    assert (fp16 - reference).abs().max() > 0  # the weights really were rounded
    int8 = generate(
        low_memory(tiny_model(), "int8", vae="int8", min_elements=0), _req(height=H, width=W)
    )
    assert (int8 - reference).abs().max() <= 0.1


@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_an_odd_size_gives_the_image_of_the_widened_weights(fmt):
    """136x104 (latents 17x13; the tiny U-Net upsamples 9x7 back to 17x13): the model in
    low-memory mode makes the image of the plain model holding its widened weights (fp16
    rounded, int8 dequantised) -- the hooks change where weights live, not which blocks run
    or at what size (float rounding only: the narrow Upsample weights take the reference
    upsample path instead of the sub-pixel kernel)."""
    req = _req(height=104, width=136)
    model = low_memory(tiny_model(), fmt, vae=fmt, min_elements=0)
    ref = tiny_model()
    with torch.no_grad():
        for part in ("unet", "text_encoder", "vae"):
            params = dict(getattr(ref, part).named_parameters())
            buffers = dict(getattr(model, part).named_buffers())
            for name, b in buffers.items():
                if b.dtype == torch.float16:
                    params[name].copy_(b.float())
                elif b.dtype == torch.int8:
                    params[name].copy_(dequantize(b, buffers[name + "_scale"]))
    got = generate(model, req)
    assert got.shape[-2:] == (104, 136)
    torch.testing.assert_close(got, generate(ref, req), atol=1e-4, rtol=0)


def test_workspace_widening_is_exact():
    """Widening into the reused workspace gives bit-identical images to fresh allocations."""
    for fmt in ("fp16", "int8"):
        model = low_memory(tiny_model(), fmt, vae=fmt, min_elements=0)
        assert model.offload.workspace > 0
        with_workspace = generate(model, _req(height=H, width=W, steps=2))
        assert model.offload._buffer is not None and not model.offload._busy
        model.offload.workspace = 0
        assert torch.equal(generate(model, _req(height=H, width=W, steps=2)), with_workspace)


def test_vae_none_keeps_it_float32(reference):
    model = low_memory(tiny_model(), "fp16", vae=None, min_elements=0)
    assert not any(k.startswith("vae.") for k in _stored(model))
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}


def test_min_elements_keeps_small_layers_float32():
    model = low_memory(tiny_model(), "fp16", min_elements=10**9)
    assert _stored(model) == {}
    assert model.offload.hooked == []


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(UnknownNameError, match="int4"):
        low_memory(tiny_model(), "int4")
    with pytest.raises(UnknownNameError):
        low_memory(tiny_model(), "fp16", vae="bf16")
    with pytest.raises(ConfigError, match="latent"):
        low_memory(object(), "fp16")


def test_fp16_single_file_loads_as_fp16_storage_without_a_copy(tmp_path, reference):
    """An fp16 single file: the stored weights ARE the file's memory-mapped fp16 tensors."""
    path = tmp_path / "half.safetensors"
    save_single_file(tiny_model(), path, dtype=torch.float16)
    model = load_low_memory(path, "fp16", min_elements=0)
    conv = model.unet.input_blocks[0][0]
    assert conv.weight.dtype == torch.float16
    ranges = FilePages().ranges  # private file mappings of this process
    ptr = conv.weight.data_ptr()
    assert any(lo <= ptr < hi for lo, hi in ranges)  # a view of the file, not a copy
    out = generate(model, _req(height=H, width=W))
    assert (out - reference).abs().max() <= 1e-2


def test_fp32_native_file_converts_tensor_by_tensor(tmp_path, reference):
    path = tmp_path / "m.safetensors"
    save_model(tiny_model(), path)
    model = load_low_memory(path, "int8", min_elements=0)
    assert _stored(model)["unet.input_blocks.0.0.weight"] == torch.int8
    out = generate(model, _req(height=H, width=W))
    assert (out - reference).abs().max() <= 0.1


# ---------------------------------------------------------------------------- shipped model


def _shipped(weights: str | None, **kw):
    from noisecraft.api.shipped import resolve_model
    from noisecraft.io.native import load_latent_diffusion

    model = load_latent_diffusion(resolve_model("mnist-text"))
    return model if weights is None else low_memory(model, weights, **kw)


def _digits(model, per_digit: int, seed: int) -> tuple[torch.Tensor, float]:
    """Images of "a handwritten <word>" and the fraction the MNIST classifier reads as the
    digit asked for (as tests/test_shipped_text_model.py: DPM++ 2M on its default Karras
    schedule, 20 steps, CFG 5)."""
    from noisecraft.metrics.features import mnist_extractor
    from noisecraft.pipelines import GenerateRequest
    from noisecraft.training.captions import DIGIT_WORDS

    digits = [d for d in range(10) for _ in range(per_digit)]
    prompts = [f"a handwritten {DIGIT_WORDS[d]}" for d in digits]
    req = GenerateRequest(
        n=len(prompts), prompts=prompts, sampler="dpmpp_2m", steps=20, cfg=5.0, seed=seed
    )
    images = generate(model, req)
    predicted = mnist_extractor().logits(images[..., 2:30, 2:30]).argmax(1)
    return images, (predicted == torch.tensor(digits)).float().mean().item()


def test_shipped_model_quality_20_prompts():
    """Shipped mini SD, 20 prompts: fp16 storage max pixel change <= 2e-2 ([-1, 1] range),
    int8 accuracy >= 0.9. Measured over 100 prompts (the slow test): fp16 max 0.0062,
    int8 mean 0.0011 / max 0.11, both 100/100 digits (Uniform schedule: 0.0075, 0.18)."""
    ref, acc32 = _digits(_shipped(None), 2, seed=0)
    fp16, acc16 = _digits(_shipped("fp16"), 2, seed=0)
    int8, acc8 = _digits(_shipped("int8"), 2, seed=0)
    assert (fp16 - ref).abs().max() <= 2e-2
    assert (int8 - ref).abs().mean() <= 5e-3
    assert acc16 >= acc32 - 0.05 and acc8 >= 0.9


@pytest.mark.slow
def test_shipped_model_quality_100_prompts():
    """The README's 100 prompts (ten per digit) with every weight stored (min_elements=0),
    VAE included: measured fp16 100/100, max change 0.0081; int8 (VAE int8 too) 100/100,
    mean change 0.0020, max 0.27 (Uniform schedule: 0.011, 0.34)."""
    ref, _ = _digits(_shipped(None), 10, seed=0)
    fp16, acc16 = _digits(_shipped("fp16", min_elements=0), 10, seed=0)
    int8, acc8 = _digits(_shipped("int8", vae="int8", min_elements=0), 10, seed=0)
    assert acc16 >= 0.95 and acc8 >= 0.95
    assert (fp16 - ref).abs().max() <= 2e-2
    assert (int8 - ref).abs().mean() <= 5e-3


def test_low_memory_fixes_the_mmap_threshold_unless_told(monkeypatch):
    """low_memory() fixes glibc's mmap threshold (1 MiB) by default; None leaves it."""
    import noisecraft.pipelines.lowmem as lm
    from test_latent_pipeline import tiny_model

    calls = []
    monkeypatch.setattr(lm, "fix_mmap_threshold", lambda n=lm.MMAP_THRESHOLD: calls.append(n))
    lm.low_memory(tiny_model(), "int8")
    lm.low_memory(tiny_model(), "int8", mmap_threshold=None)
    assert calls == [1 << 20]
    assert lm.MMAP_THRESHOLD == 1 << 20


def test_load_low_memory_fixes_the_threshold_once_before_loading(tmp_path, monkeypatch):
    import noisecraft.pipelines.lowmem as lm

    path = tmp_path / "m.safetensors"
    save_model(tiny_model(), path)
    calls = []
    monkeypatch.setattr(lm, "fix_mmap_threshold", lambda n=lm.MMAP_THRESHOLD: calls.append(n))
    lm.load_low_memory(path, "int8")
    assert calls == [1 << 20]
