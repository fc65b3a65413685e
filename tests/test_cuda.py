"""The CUDA paths (mixed precision training, sampling on the GPU). Skipped without CUDA, so CI
(CPU only) only checks that they import; run on a GPU machine with `pytest tests/test_cuda.py`."""

import dataclasses

import pytest
import torch

from conftest import tiny_config
from noisecraft.pipelines import GenerateRequest, PixelDiffusion, generate
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
    model = PixelDiffusion.load(tmp_path / "run" / "model.safetensors", device="cuda")
    assert next(model.unet.parameters()).is_cuda


@cuda
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_cuda_sampling_matches_cpu(tmp_path, sampler):
    cfg = tiny_config(tmp_path / "run", max_steps=3)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu"))
    Trainer(cfg).train()
    path = tmp_path / "run" / "model.safetensors"
    req = GenerateRequest(n=8, sampler=sampler, steps=10, cfg=2.0, classes=list(range(8)), seed=1)
    cpu = generate(PixelDiffusion.load(path), req)
    gpu = generate(PixelDiffusion.load(path, device="cuda"), req)
    # same CPU-drawn noise on both devices; only float rounding differs
    torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=0)
