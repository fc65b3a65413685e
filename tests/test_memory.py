"""Memory: attention slicing, one copy of the weights when loading, load dtypes, sequential
offload (on a fake float64 "device"), the VAE tiling switch of generate(), and (slow) the peak
RSS of a full-size Stable Diffusion 1.5 model generating one image."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import jitter
from noisecraft.errors import ConfigError
from noisecraft.io.build import build_module
from noisecraft.io.native import load_latent_diffusion, save_model
from noisecraft.models import vae_tiling
from noisecraft.models.unet import UNet
from noisecraft.models.vae import VAEAttnBlock
from noisecraft.nn import attention as attn
from noisecraft.nn.attention import (
    AttentionBlock,
    AttentionSlicing,
    SpatialTransformer,
    attention,
    attention_slicing,
    get_attention_slicing,
    set_attention_slicing,
)
from noisecraft.pipelines import generate
from noisecraft.pipelines.offload import (
    offload_latent_diffusion,
    sequential_offload,
)
from test_latent_pipeline import UNET, _req, tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_slicing():
    """Every test starts and ends with slicing off (it is one process-wide switch)."""
    set_attention_slicing()
    yield
    set_attention_slicing()


def _qkv(b, h, lq, lk, d, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, h, lk, d, generator=g)
    v = torch.randn(b, h, lk, dv or d, generator=g)
    return q, k, v


def _reference(q, k, v):
    """softmax(q k^T / sqrt(d)) v written out (Vaswani et al. eq. 1), in float64."""
    q, k, v = q.double(), k.double(), v.double()
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (w @ v).float()


# ---------------------------------------------------------------------------- slicing


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 37, 37, 8), (2, 3, 37, 19, 8), (1, 1, 1, 5, 4), (3, 2, 50, 77, 16)],
    ids=["self-odd", "cross-odd", "one-query", "cross-77"],
)
@pytest.mark.parametrize("slice_size", [1, 5, 36, 37, 100])
def test_sliced_attention_equals_unsliced(shape, slice_size):
    q, k, v = _qkv(*shape, dv=shape[-1] + 3)
    whole = attention(q, k, v)
    torch.testing.assert_close(whole, _reference(q, k, v), atol=1e-5, rtol=0)
    with attention_slicing(slice_size=slice_size):
        sliced = attention(q, k, v)
    assert sliced.shape == whole.shape
    torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=0)


def test_slices_are_made_of_the_asked_size(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        calls.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", spy)
    q, k, v = _qkv(2, 3, 37, 19, 8)
    attention(q, k, v)
    assert calls == [(37, 19)]  # off by default: one SDPA call
    calls.clear()
    with attention_slicing(slice_size=10):
        attention(q, k, v)
    assert calls == [(10, 19), (10, 19), (10, 19), (7, 19)]
    calls.clear()
    # budget: the matrix is 2*3*37*19*4 bytes; 2*3*19*4 = 456 bytes per query row
    with attention_slicing(456 * 8):
        attention(q, k, v)
    assert [c[0] for c in calls] == [8, 8, 8, 8, 5]
    calls.clear()
    with attention_slicing(2 * 3 * 37 * 19 * 4):  # the whole matrix fits: not sliced
        attention(q, k, v)
    assert calls == [(37, 19)]


def test_budget_rows_at_sd15_first_level():
    """512x512 SD 1.5, first level: batch 2 (CFG) x 8 heads x 4096 x 4096 float32 = 1 GiB."""
    q = torch.empty(2, 8, 4096, 40, device="meta")
    k = torch.empty(2, 8, 4096, 40, device="meta")
    kc = torch.empty(2, 8, 77, 40, device="meta")
    assert AttentionSlicing(256 * 2**20).rows(q, k) == 1024
    assert AttentionSlicing(2**30).rows(q, k) is None
    assert AttentionSlicing(256 * 2**20).rows(q, kc) is None  # cross-attention: 19 MiB
    assert AttentionSlicing(1).rows(q, k) == 1  # never fewer than one row
    assert AttentionSlicing(slice_size=4096).rows(q, k) is None
    assert AttentionSlicing().rows(q, k) is None


def test_slicing_switch_and_context_manager():
    assert get_attention_slicing() == AttentionSlicing()
    previous = set_attention_slicing(2**20)
    assert previous == AttentionSlicing()
    with pytest.raises(RuntimeError), attention_slicing(slice_size=3):
        assert get_attention_slicing() == AttentionSlicing(slice_size=3)
        raise RuntimeError
    assert get_attention_slicing() == AttentionSlicing(2**20)  # restored after the error
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            set_attention_slicing(bad)
        with pytest.raises(ConfigError):
            set_attention_slicing(slice_size=bad)
    assert get_attention_slicing() == AttentionSlicing(2**20)


def test_sliced_blocks_equal_unsliced():
    torch.manual_seed(0)
    st = jitter(SpatialTransformer(16, 2, 8, context_dim=12, norm_groups=4), 1)
    block = jitter(AttentionBlock(16, num_heads=2, norm_groups=4), 2)
    vae_block = jitter(VAEAttnBlock(16, groups=4), 3)
    x = torch.randn(2, 16, 5, 7)  # 35 tokens
    ctx = torch.randn(2, 9, 12)
    whole = st(x, ctx), block(x), vae_block(x)
    with attention_slicing(slice_size=4):
        sliced = st(x, ctx), block(x), vae_block(x)
    for a, b in zip(whole, sliced, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_feed_forward_in_chunks_equals_whole(monkeypatch):
    torch.manual_seed(0)
    ff = jitter(attn.FeedForward(8), 1)  # GEGLU projection: 64 floats = 256 bytes per token
    x = torch.randn(2, 37, 8)
    with torch.enable_grad():
        whole = ff(x).detach()  # autograd: never chunked
    calls = []
    ff.net[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    monkeypatch.setattr(attn, "FEED_FORWARD_CHUNK_BYTES", 256 * 5)
    with torch.no_grad():
        chunked = ff(x)
    assert calls == [5] * 14 + [4]  # 74 tokens in chunks of 5
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- loading


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(path)):
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_loaded_weights_are_the_files_memory_map(tmp_path):
    """One copy: every float32 parameter of a loaded model lies in the file's memory map
    (no anonymous copy was made)."""
    path = tmp_path / "m.safetensors"
    save_model(tiny_model(), path)
    model = load_latent_diffusion(path)
    ranges = _mapped_ranges(path.resolve())
    assert ranges
    for module in (model.unet, model.vae, model.text_encoder):
        for name, p in module.named_parameters():
            ptr = p.data_ptr()
            assert any(lo <= ptr < hi for lo, hi in ranges), name


def test_build_module_shares_the_given_tensors():
    unet = UNet(UNET)
    sd = unet.state_dict()
    built = build_module(lambda: UNet(UNET), sd, what="unet", source="test")
    for name, p in built.named_parameters():
        assert p.data_ptr() == sd[name].data_ptr(), name  # assigned, not copied
    half = build_module(lambda: UNet(UNET), sd, what="unet", source="test", dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    kept = build_module(lambda: UNet(UNET), half.state_dict(), what="u", source="t", dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.float16}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("memory") / "tiny.safetensors"
    save_model(tiny_model(), path)
    return path


@pytest.mark.parametrize(
    ("dtype", "vae_dtype", "expect_vae"),
    [
        (torch.float16, None, torch.float32),  # fp16 VAEs overflow: kept in float32
        (torch.bfloat16, None, torch.bfloat16),
        (torch.float16, torch.float16, torch.float16),
    ],
)
def test_load_in_half_precision(saved, dtype, vae_dtype, expect_vae):
    ref_model = load_latent_diffusion(saved)
    model = load_latent_diffusion(saved, dtype=dtype, vae_dtype=vae_dtype)
    assert {p.dtype for p in model.unet.parameters()} == {dtype}
    assert {p.dtype for p in model.text_encoder.parameters()} == {dtype}
    assert {p.dtype for p in model.vae.parameters()} == {expect_vae}
    req = _req(steps=2)
    ref, out = generate(ref_model, req), generate(model, req)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    # half precision changes the image by rounding only (tiny random model, 2 Euler steps)
    assert (out - ref).abs().max() < 0.1
    assert (out - ref).abs().mean() < 0.01


# ---------------------------------------------------------------------------- offload


def test_offload_on_cpu_is_a_no_op():
    model = tiny_model()
    assert sequential_offload(model.unet, "cpu") is None
    assert offload_latent_diffusion(model, "cpu") is model
    for m in model.unet.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks


def test_offload_moves_one_module_at_a_time():
    """Fake device: the weights stay float32 on the CPU; each module runs on float64 copies
    of its own weights only, made just for its forward."""
    unet = jitter(UNet(UNET), 1)
    ref = copy.deepcopy(unet).double()
    before = {n: (p.data_ptr(), p.dtype) for n, p in unet.named_parameters()}
    handle = sequential_offload(unet, "cpu", dtype=torch.float64)
    assert handle is not None and handle.hooked
    own_bytes = {m: sum(p.numel() * 8 for p in m.parameters(recurse=False)) for m in unet.modules()}
    on_device = []

    def count(mod, args):
        on_device.append(
            (sum(p.numel() * 8 for p in unet.parameters() if p.dtype == torch.float64), mod)
        )
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                assert a.dtype == torch.float64  # inputs moved with the weights

    spies = [m.register_forward_pre_hook(count) for m in handle.hooked]
    x = torch.randn(2, 4, 6, 8)
    t = torch.tensor([10.0, 500.0])
    ctx = torch.randn(2, 7, UNET.context_dim)
    out = unet(x, t, context=ctx)
    for s in spies:
        s.remove()
    expected = ref(x.double(), t, context=ctx.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    assert len(on_device) >= len(handle.hooked)
    for total, mod in on_device:  # only the running module's own weights are "on the device"
        assert total == own_bytes[mod]
    after = {n: (p.data_ptr(), p.dtype) for n, p in unet.named_parameters()}
    assert after == before  # the CPU weights themselves, untouched
    handle.remove()
    assert unet(x, t, context=ctx).dtype == torch.float32


def test_offloaded_latent_model_generates_the_same_image():
    model = tiny_model()
    req = _req(steps=2)
    ref = generate(model, req)
    off = offload_latent_diffusion(model, "cpu", dtype=torch.float64)
    assert off is not model and off.offload is not None
    seen, on_device = [], []
    spy = model.unet.out[-1].register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    modules = (model.unet, model.vae, model.text_encoder)

    def count(mod, args):  # after the offload hook: only this module's weights are float64
        total = sum(p.numel() for m in modules for p in m.parameters() if p.dtype == torch.float64)
        on_device.append((total, sum(p.numel() for p in mod.parameters(recurse=False))))

    spies = [m.register_forward_pre_hook(count) for m in off.offload.hooked]
    out = generate(off, req)
    for s in [spy, *spies]:
        s.remove()
    assert seen and set(seen) == {torch.float64}  # the U-Net did run on the fake device
    assert on_device and all(total == own for total, own in on_device)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert {p.dtype for p in model.unet.parameters()} == {torch.float32}
    off.offload.remove()


def test_offloaded_latent_model_at_an_odd_size():
    """136x104 (latents 17x13, an odd U-Net level): the offloaded model (float64 fake device)
    makes the plain model's image."""
    model = tiny_model()
    req = _req(steps=2, height=104, width=136)
    ref = generate(model, req)
    off = offload_latent_diffusion(model, "cpu", dtype=torch.float64)
    out = generate(off, req)
    off.offload.remove()
    assert out.shape[-2:] == (104, 136)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- VAE tiling


def test_auto_tiling_threshold():
    model = tiny_model()
    assert vae_tiling.AUTO_TILE_PIXELS == 1024 * 1024
    assert not vae_tiling.needs_tiling(model.vae, (1, 4, 128, 128))  # 1024 x 1024
    assert vae_tiling.needs_tiling(model.vae, (1, 4, 128, 136))  # 1088 x 1024
    assert not vae_tiling.needs_tiling(model.vae, (1, 4, 64, 256))  # 2048 x 512 = 1 MP


def test_decode_trims_the_heap_and_changes_nothing(monkeypatch):
    model = tiny_model()
    z = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    trims = []
    real = vae_tiling.release_freed_heap
    monkeypatch.setattr(vae_tiling, "release_freed_heap", lambda: trims.append(1) or real())
    with torch.no_grad():
        images = vae_tiling.decode_latents(model.vae, z)
        assert images.equal(model.vae.decode_latents(z))
    blocks = sum(len(level.block) + hasattr(level, "upsample") for level in model.vae.decoder.up)
    assert len(trims) == 1 + blocks  # once before the decode, once before each decoder block
    assert not any(m._forward_pre_hooks for m in model.vae.modules())  # hooks removed
    try:
        glibc = bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError, AttributeError):
        glibc = False
    if glibc:
        assert real()  # glibc: malloc_trim was found and called


@pytest.fixture
def tiled_calls(monkeypatch):
    calls = []
    real = vae_tiling.tiled_decode

    def spy(vae, z, *a, **kw):
        calls.append(tuple(z.shape))
        return real(vae, z, *a, **kw)

    monkeypatch.setattr(vae_tiling, "tiled_decode", spy)
    return calls


def test_generate_vae_tiling_switch(tiled_calls):
    model = tiny_model()
    untiled = generate(model, _req(steps=1))
    assert tiled_calls == []  # small images decode whole by default
    assert generate(model, _req(steps=1, vae_tiling=False)).equal(untiled)
    tiled = generate(model, _req(steps=1, vae_tiling=True))
    assert tiled_calls == [(1, 4, 6, 8)]
    # one 512-pixel tile covers a 64x48 image: tiling changes nothing
    torch.testing.assert_close(tiled, untiled, atol=1e-6, rtol=0)


def test_forced_tiling_splits_small_images_in_two_per_side():
    """``tiled=True`` (``--tiling``) on an image up to 512 px still saves memory: tiles of
    half the longer side plus the overlap (2 x 2 tiles for SD's 512x512); 512-px tiles from
    1024 px up; an image smaller than two overlaps is one tile."""
    assert vae_tiling.forced_tile((1, 4, 64, 64)) == 40
    assert vae_tiling.tile_starts(64, 40, vae_tiling.TILE_OVERLAP) == [0, 24]
    assert vae_tiling.forced_tile((1, 4, 96, 40)) == 56
    assert len(vae_tiling.tile_starts(96, 56, 8)) == 2
    assert vae_tiling.forced_tile((1, 4, 128, 128)) == vae_tiling.TILE
    assert vae_tiling.forced_tile((1, 4, 6, 8)) == 12  # >= 8: one tile
    assert vae_tiling.tile_starts(8, 12, 8) == [0]


def test_large_images_decode_in_tiles(monkeypatch):
    """Which decoder LatentDiffusion.decode picks (stubs: decoding 1 MP images takes long)."""
    model = tiny_model()
    calls = []

    def stub(kind):
        def decode(*args, **kw):
            z = next(a for a in args if isinstance(a, torch.Tensor))
            calls.append((kind, tuple(z.shape)))
            return torch.zeros(z.shape[0], 3, 8 * z.shape[-2], 8 * z.shape[-1])

        return decode

    monkeypatch.setattr(vae_tiling, "tiled_decode", stub("tiled"))
    monkeypatch.setattr(model.vae, "decode_latents", stub("whole"))
    small, large = torch.zeros(1, 4, 136, 72), torch.zeros(1, 4, 136, 136)
    assert model.decode(small).shape == (1, 3, 1088, 576)  # 0.6 MP: whole
    assert model.decode(large).shape == (1, 3, 1088, 1088)  # 1.2 MP: tiles
    model.decode(large, tiled=False)
    model.decode(small, tiled=True)
    assert calls == [
        ("whole", (1, 4, 136, 72)),
        ("tiled", (1, 4, 136, 136)),
        ("whole", (1, 4, 136, 136)),
        ("tiled", (1, 4, 136, 72)),
    ]


# ---------------------------------------------------------------------------- slow: SD 1.5


@pytest.mark.slow
def test_sd15_generates_within_memory_budget(tmp_path):
    """Full-size SD 1.5 architecture with random weights, saved as a file, then loaded and
    sampled (256x256, 1 step) in a child process: peak RSS < 1.5 x the weights."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "memory.py"),
            "--size",
            "256",
            "--steps",
            "1",
            "--modes",
            "default",
            "--workdir",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])["default"]
    assert row["image_shape"] == [1, 3, 256, 256]
    assert row["finite"]
    assert row["weights_bytes"] > 4.2e9  # really SD 1.5 sized: 1.07 G float32 parameters
    assert row["peak_rss"] < 1.5 * row["weights_bytes"]
