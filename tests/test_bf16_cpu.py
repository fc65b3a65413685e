"""bf16 on the CPU: ``noisecraft.load(dtype="bf16")`` stores the U-Net in bf16, keeps the text
encoder, VAE and sampler in fp32, stays close to fp32, and warns where the CPU lacks bf16.

Tolerances: bf16 keeps 8 significant bits (a rounding error of up to 2^-9 = 0.2 % per value);
one U-Net pass of SD 1.5's architecture (random weights) measured 1.1e-2 max relative
difference against fp32 (bench/bf16_quality.py), so a U-Net pass must be within 3e-2 of
fp32 (max |diff| / max |fp32|); 20-step images of the shipped mini SD measured a mean
0.24/255 difference over 100 images, so 4 10-step images must stay within a mean 2/255 (and
a 10-step PNG of the CLI, measured 0.46/255, within a mean 2/255).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import noisecraft
from noisecraft.api import loading
from noisecraft.cli.main import main
from noisecraft.errors import NoisecraftWarning
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.nn import cpu_features, kernels
from noisecraft.nn.resnet import Upsample

X86_AVX512_BF16 = "processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AVX2 = "processor : 0\nflags : fpu sse2 avx2 fma\n"
ARM_BF16 = "processor : 0\nFeatures : fp asimd sve bf16 i8mm\n"
ARM_OLD = "processor : 0\nFeatures : fp asimd evtstrm\n"


def test_cpu_flags_and_what_bf16_misses():
    assert "avx512_bf16" in cpu_features.cpu_flags(X86_AVX512_BF16)
    assert cpu_features.cpu_flags("model name : x\n") is None
    has = lambda text: cpu_features.bf16_missing(cpu_features.cpu_flags(text), "AVX512")  # noqa: E731
    assert has(X86_AVX512_BF16) is None and has(ARM_BF16) is None
    assert has("flags : fpu sse2 amx_bf16 amx_tile\n") is None  # AMX alone is enough
    missing = cpu_features.bf16_missing(cpu_features.cpu_flags(X86_AVX2), "AVX2")
    assert "avx512_bf16" in missing and "amx_bf16" in missing and "AVX2" in missing
    assert "bf16 extension" in has(ARM_OLD)


def test_unreadable_cpuinfo_is_said(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_features, "CPUINFO", tmp_path / "no-cpuinfo")
    assert "could not be read" in cpu_features.bf16_missing(capability="AVX2")


@pytest.fixture(scope="module")
def pipes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoisecraftWarning)
        return noisecraft.load("mnist-text"), noisecraft.load("mnist-text", dtype="bf16")


def test_bf16_load_warns_in_one_line_where_the_cpu_lacks_bf16(monkeypatch):
    monkeypatch.setattr(loading, "bf16_missing", lambda: "this CPU has neither avx512_bf16 X")
    with pytest.warns(NoisecraftWarning, match="neither avx512_bf16 X") as caught:
        noisecraft.load("mnist-text", dtype="bf16")
    message = str(caught[0].message)
    assert "\n" not in message and "slower than fp32" in message and "fp32" in message
    monkeypatch.setattr(loading, "bf16_missing", lambda: None)  # a CPU with bf16: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoisecraftWarning)
        noisecraft.load("mnist-text", dtype="bf16")


def test_bf16_stores_the_unet_only_and_the_sampler_stays_fp32(pipes):
    _, p16 = pipes
    m = p16.model
    assert next(m.unet.parameters()).dtype == torch.bfloat16
    assert next(m.vae.parameters()).dtype == torch.float32
    assert next(m.text_encoder.parameters()).dtype == torch.float32
    seen = []
    p16(
        "a handwritten 4",
        steps=3,
        n=1,
        callback=lambda d: seen.append((d["x"].dtype, d["denoised"].dtype)),
    )
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)


def test_bf16_image_close_to_fp32_with_the_same_infotext_and_replay(pipes):
    p32, p16 = pipes
    kw = {"steps": 10, "n": 4, "seed": 7}
    a, b = p32("a handwritten 2", **kw), p16("a handwritten 2", **kw)
    assert a.infotexts == b.infotexts  # a loading option, like fp16: not in the infotext
    diff = (a.tensors.float() - b.tensors.float()).abs()
    assert 0 < diff.mean() < 2 / 255  # bf16 changes the image, slightly (module docstring)
    again = p16.replay(b.infotexts[1])  # the second image (seed 8), alone: batch 1 instead
    torch.testing.assert_close(again.tensors[0], b.tensors[1], atol=1e-4, rtol=0)  # of 4
    assert torch.equal(p16.replay(again.infotexts[0]).tensors[0], again.tensors[0])


def _tiny_unet() -> UNet:
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        UNetConfig.sd15(),
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        context_dim=24,
        norm_groups=8,
    )
    net = UNet(cfg).eval()
    with torch.no_grad():  # zero-initialised output layers made random: a non-trivial output
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return net


def test_bf16_unet_pass_within_tolerance_of_fp32():
    net = _tiny_unet()
    x, t, ctx = torch.randn(2, 4, 12, 10), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 24)
    with torch.no_grad():
        ref = net(x, t, context=ctx)
        out = net.to(torch.bfloat16)(x.bfloat16(), t, context=ctx.bfloat16())
    assert out.dtype == torch.bfloat16
    rel = float((out.float() - ref).abs().max() / ref.abs().max())
    assert 0 < rel < 3e-2


def test_kernels_step_aside_for_bf16_and_under_autocast():
    """bf16 tensors take the reference ops (measured faster in a whole U-Net pass), and so
    do float32 ones under autocast (the oneDNN ops would not be cast: they would run fp32)."""
    torch.manual_seed(0)
    lin = kernels.Linear(64, 96)
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert not kernels._fast(x.bfloat16(), lin.weight.bfloat16())
        w16, b16 = lin.weight.bfloat16(), lin.bias.bfloat16()
        assert torch.equal(kernels.linear(x.bfloat16(), w16, b16), F.linear(x.bfloat16(), w16, b16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not kernels._fast(x, lin.weight)
            out = lin(x)
        assert out.dtype == torch.bfloat16  # autocast cast it: the reference op ran
        assert torch.equal(out, F.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()))


@pytest.fixture
def bf16_kernels(monkeypatch):
    """The oneDNN paths let in for bf16, as bench/bf16_speed.py's comparison row does."""
    monkeypatch.setattr(kernels, "_FAST_DTYPES", (torch.float32, torch.bfloat16))
    x = torch.randn(2, 3).bfloat16()
    with torch.no_grad():
        if not kernels._fast(x, x):
            pytest.skip("no oneDNN bf16 kernels here")


def _close_bf16(out: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16 output against the float32 reference on the same bf16 values: within 2e-2 of
    the largest value (8 significant bits, rounded once more per sum of partial products)."""
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 2e-2


def test_bf16_fast_paths_match_the_float32_ops(bf16_kernels):
    """Let in for bf16 (the bench's row), the oneDNN paths (linear, 1x1 conv, im2col conv,
    sub-pixel upsampling conv) give the float32 ops' result on the same values, to bf16
    rounding."""
    torch.manual_seed(0)
    bf = torch.bfloat16
    w, b, x = torch.randn(48, 32).to(bf), torch.randn(48).to(bf), torch.randn(3, 7, 32).to(bf)
    with torch.no_grad():
        assert kernels._fast(x, w, b)
        _close_bf16(kernels.linear(x, w, b), F.linear(x.float(), w.float(), b.float()))
        for k, size, cout, path in ((1, 6, 24, "pointwise"), (3, 4, 320, "im2col")):
            conv = kernels.Conv2d(16, cout, k, padding=k // 2).to(bf)
            img = torch.randn(1, 16, size, size + 1).to(bf)
            assert kernels.conv_path(img.shape, conv.weight.shape, 1, k // 2) == path
            ref = F.conv2d(img.float(), conv.weight.float(), conv.bias.float(), 1, k // 2)
            _close_bf16(conv(img), ref)
        up = Upsample(8, 8).to(bf)
        img = torch.randn(2, 8, 5, 6).to(bf)
        assert kernels.upsample_path(img.shape, up.conv.weight.shape) == "subpixel"
        ref = F.conv2d(
            F.interpolate(img.float(), scale_factor=2.0, mode="nearest"),
            up.conv.weight.float(),
            up.conv.bias.float(),
            padding=1,
        )
        _close_bf16(up(img), ref)


def test_cli_generate_dtype_bf16(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(loading, "bf16_missing", lambda: None)
    out = {}
    for dtype in ("fp32", "bf16"):
        path = tmp_path / f"{dtype}.png"
        args = [
            "generate",
            "a handwritten 8",
            "--steps",
            "10",
            "--dtype",
            dtype,
            "--out",
            str(path),
        ]
        assert main(args) == 0, capsys.readouterr().err
        out[dtype] = Image.open(path)
    assert out["fp32"].text["parameters"] == out["bf16"].text["parameters"]
    a, b = (np.asarray(im).astype(np.float64) for im in out.values())
    assert 0 < np.abs(a - b).mean() < 2
    monkeypatch.setattr(loading, "bf16_missing", lambda: "this CPU has neither avx512_bf16 X")
    args = ["generate", "a 1", "--steps", "1", "--dtype", "bf16", "--out", str(tmp_path / "w.png")]
    assert main(args) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "neither avx512_bf16 X" in warned[0]
