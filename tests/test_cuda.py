"""The CUDA paths (mixed precision training, sampling on the GPU). Skipped without CUDA, so CI
(CPU only) only checks that they import; run on a GPU machine with `pytest tests/test_cuda.py`."""

import dataclasses

import pytest
import torch

from conftest import tiny_config
from noisecraft.io.native import load_latent_diffusion, load_pixel_diffusion, save_model
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.training.trainer import Trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_mixed_precision_training_on_cuda(tmp_path, precision):
    cfg = tiny_config(
        tmp_path / "run",
        mixed_precision=precision,
        device="cuda",
        max_steps=40,
        lr=3e-3,
        warmup_steps=5,
    )
    trainer = Trainer(cfg)
    assert (
        trainer.amp_dtype == {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    )
    losses = trainer.train().losses
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    # weights stay float32 (autocast only changes the compute dtype) and save to CPU tensors
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    model = load_pixel_diffusion(tmp_path / "run" / "model.safetensors", device="cuda")
    assert next(model.unet.parameters()).is_cuda


@cuda
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_cuda_sampling_matches_cpu(tmp_path, sampler):
    cfg = tiny_config(tmp_path / "run", max_steps=3)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu"))
    Trainer(cfg).train()
    path = tmp_path / "run" / "model.safetensors"
    req = GenerateRequest(n=8, sampler=sampler, steps=10, cfg=2.0, classes=list(range(8)), seed=1)
    cpu = generate(load_pixel_diffusion(path), req)
    gpu = generate(load_pixel_diffusion(path, device="cuda"), req)
    # same CPU-drawn noise on both devices; only float rounding differs
    torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=0)


# ---------------------------------------------------------------------------- memory paths
# (CPU versions with a fake float64 "device" are in tests/test_memory.py)


@cuda
def test_half_precision_latent_model_on_cuda(tmp_path):
    from test_latent_pipeline import _req, tiny_model

    path = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), path)
    model = load_latent_diffusion(path, device="cuda", dtype=torch.float16)
    assert {(p.dtype, p.device.type) for p in model.unet.parameters()} == {(torch.float16, "cuda")}
    # the VAE stays float32: SD VAEs overflow float16 at large sizes
    assert {(p.dtype, p.device.type) for p in model.vae.parameters()} == {(torch.float32, "cuda")}
    req = _req(steps=2)
    out = generate(model, req)
    ref = generate(load_latent_diffusion(path), req)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1 and (out - ref).abs().mean() < 0.01


@cuda
def test_sequential_offload_on_cuda():
    from noisecraft.pipelines.offload import offload_latent_diffusion
    from test_latent_pipeline import _req, tiny_model

    model = tiny_model()
    req = _req(steps=2)
    ref = generate(model, req)
    weights = {n: p.data_ptr() for n, p in model.unet.named_parameters()}
    off = offload_latent_diffusion(model, "cuda")
    assert off.device.type == "cuda"
    on_gpu = []

    def count(mod, args):  # runs after the offload hook: only this module's weights on the GPU
        own = sum(p.numel() for p in mod.parameters(recurse=False))
        total = sum(
            p.numel()
            for m in (model.unet, model.vae, model.text_encoder)
            for p in m.parameters()
            if p.is_cuda
        )
        on_gpu.append((total, own))

    spies = [m.register_forward_pre_hook(count) for m in off.offload.hooked]
    out = generate(off, req)
    for s in spies:
        s.remove()
    assert on_gpu and all(total == own for total, own in on_gpu)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)
    # the weights never left the CPU; nothing of them stays on the GPU
    assert {n: p.data_ptr() for n, p in model.unet.named_parameters()} == weights
    assert all(not p.is_cuda for p in model.unet.parameters())
    off.offload.remove()
