"""Fast mode: DeepCache (exactness where it must be exact, its call pattern), dynamic int8
(close to float32), and the quality bounds of docs/performance.md on the shipped models.

Quality bounds: the shipped text model (assets/mnist_text.safetensors) is judged as in
tests/test_shipped_text_model.py -- the shipped MNIST classifier reads 100 images, ten
prompts per digit, and counts how often it reads the digit the prompt named.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.ao.nn.quantized import dynamic as nnqd

from helpers import jitter
from noisecraft.api.shipped import resolve_model
from noisecraft.errors import ConfigError
from noisecraft.io.native import load_latent_diffusion
from noisecraft.metrics.features import mnist_extractor
from noisecraft.models import LatentDiffusion, UNet, UNetConfig
from noisecraft.nn.quantize import quantize_int8
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.pipelines.deepcache import (
    DeepCacheConfig,
    DeepCacheState,
    deepcache,
    deepcache_forward,
)
from noisecraft.pipelines.fast import FAST, FastMode
from noisecraft.training.captions import DIGIT_WORDS
from test_latent_pipeline import _req as tiny_request
from test_latent_pipeline import tiny_model

TINY = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(0, 1),
    num_heads=2,
    norm_groups=4,
    context_dim=12,
)


@pytest.fixture(scope="module")
def unet() -> UNet:
    torch.manual_seed(0)
    return jitter(UNet(TINY), 1).eval()  # jittered: the zero-initialised output conv


@pytest.fixture(scope="module")
def shipped() -> LatentDiffusion:
    return load_latent_diffusion(resolve_model("mnist-text"))


def _inputs(b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 12, generator=g)
    t = torch.tensor([500.0, 250.0][:b])
    ctx = torch.randn(b, 5, 12, generator=g)
    return x, t, ctx


# ---------------------------------------------------------------- DeepCache on the U-Net


@torch.no_grad()
def test_interval_one_is_the_plain_unet_exactly(unet):
    state = DeepCacheState(DeepCacheConfig(interval=1, branch=1))
    for seed in range(3):
        x, t, ctx = _inputs(seed=seed)
        assert torch.equal(
            deepcache_forward(unet, state, x, t, context=ctx), unet(x, t, context=ctx)
        )
    assert state.full_calls == 3 and state.shallow_calls == 0


@pytest.mark.parametrize("branch", [1, 2, 3])
@torch.no_grad()
def test_a_shallow_call_on_the_cached_input_equals_the_full_pass(unet, branch):
    """Same input twice: the shallow branch recomputes the skips it needs and reuses the deep
    feature of the same input, so it must give the full U-Net's output bit for bit -- this
    checks which skip goes with which output block."""
    x, t, ctx = _inputs()
    plain = unet(x, t, context=ctx)
    with deepcache(unet, DeepCacheConfig(interval=2, branch=branch)) as state:
        first = unet(x, t, context=ctx)
        second = unet(x, t, context=ctx)
    assert (state.full_calls, state.shallow_calls) == (1, 1)
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert "forward" not in vars(unet)  # the plain forward is back


@torch.no_grad()
def test_shallow_calls_reuse_the_stale_deep_feature(unet):
    """Calls 0, N, 2N, ... are full; the others differ from the plain U-Net (stale deep
    features), and a batch of another shape restarts the count with a full pass."""
    xs = [_inputs(seed=s) for s in range(5)]
    with deepcache(unet, DeepCacheConfig(interval=3, branch=1)) as state:
        outs = [unet(x, t, context=c) for x, t, c in xs]
        x1, t1, c1 = _inputs(b=1, seed=9)
        single = unet(x1, t1, context=c1)
    for k, ((x, t, c), out) in enumerate(zip(xs, outs, strict=True)):
        same = torch.equal(out, unet(x, t, context=c))
        assert same == (k % 3 == 0), k
    assert torch.equal(single, unet(x1, t1, context=c1))
    assert (state.full_calls, state.shallow_calls) == (3, 3)


def _odd_inputs(b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """9x7 latents: level 1 is 5x4, so the up path returns to an odd skip (9x7)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 9, 7, generator=g), torch.tensor([500.0, 250.0][:b]), _inputs()[2]


class _Planted:
    """A :class:`~noisecraft.models.unet.FeatureCache` that records what the U-Net stores and
    hands back ``plant`` (when set) to make a call shallow."""

    def __init__(self, branch: int):
        self.branch, self.stored, self.plant = branch, [], None

    def reuse(self, x):
        return self.plant

    def store(self, feature):
        self.stored.append(feature)


@torch.no_grad()
def test_the_unet_forward_hook_runs_full_or_shallow_on_the_given_feature(unet):
    """The one block loop: ``UNet.forward(..., cache=)`` with no planted feature is the plain
    forward bit for bit and stores the feature entering output block K - branch; a shallow
    call runs on the planted feature (another feature, another output) and never reaches the
    deep blocks (their weights do not matter)."""
    x, t, ctx = _inputs()
    plain = unet(x, t, context=ctx)
    k = len(unet.input_blocks)
    for branch in (1, 2, 3):
        cache = _Planted(branch)
        assert torch.equal(unet(x, t, context=ctx, cache=cache), plain)
        (feature,) = cache.stored
        assert feature.shape[1] + unet.skip_channels[branch - 1] == (
            unet.output_blocks[k - branch][0].in_layers[0].num_channels
        )
        cache.plant = feature
        assert torch.equal(unet(x, t, context=ctx, cache=cache), plain)  # same input
        x2, t2, c2 = _inputs(seed=7)
        shallow = unet(x2, t2, context=c2, cache=cache)
        assert not torch.allclose(shallow, unet(x2, t2, context=c2))
        deep = copy.deepcopy(unet)
        for block in (deep.middle_block, deep.input_blocks[branch], deep.output_blocks[0]):
            for p in block.parameters():
                p.mul_(-3.0)
        assert torch.equal(deep(x2, t2, context=c2, cache=cache), shallow)
        assert not torch.allclose(deep(x2, t2, context=c2), unet(x2, t2, context=c2))
        cache.plant = feature + 1.0
        assert not torch.allclose(unet(x2, t2, context=c2, cache=cache), shallow)
        assert len(cache.stored) == 1  # shallow calls store nothing
    with pytest.raises(ConfigError, match="branch 4 does not fit: choose 1..3"):
        unet(x, t, context=ctx, cache=_Planted(4))


@pytest.mark.parametrize("branch", [1, 2, 3])
@torch.no_grad()
def test_deepcache_at_an_odd_size(unet, branch):
    """9x7 latents (an odd level): interval 1 is the plain U-Net bit for bit, and a shallow
    call on the cached input equals the full pass bit for bit (the upsampling inside the
    shallow branch, branch 3, returns to the odd skip's size)."""
    x, t, ctx = _odd_inputs()
    plain = unet(x, t, context=ctx)
    one = DeepCacheState(DeepCacheConfig(interval=1, branch=branch))
    assert torch.equal(deepcache_forward(unet, one, x, t, context=ctx), plain)
    with deepcache(unet, DeepCacheConfig(interval=2, branch=branch)) as state:
        first, second = unet(x, t, context=ctx), unet(x, t, context=ctx)
    assert (state.full_calls, state.shallow_calls) == (1, 1)
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert not unet._forward_pre_hooks  # the hook is gone


@torch.no_grad()
def test_int8_unet_at_an_odd_size_is_close_to_float32(unet):
    x, t, ctx = _odd_inputs()
    ref, out = unet(x, t, context=ctx), quantize_int8(unet)(x, t, context=ctx)
    assert out.shape == ref.shape
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.05


def test_nested_deepcache_is_refused(unet):
    with (
        deepcache(unet, DeepCacheConfig()),
        pytest.raises(ConfigError, match="already runs with DeepCache"),
    ):
        deepcache(unet, DeepCacheConfig()).__enter__()
    assert not unet._forward_pre_hooks


def test_bad_branch_is_a_config_error(unet):
    bad = DeepCacheConfig(interval=2, branch=4)
    with pytest.raises(ConfigError, match="branch 4 does not fit this U-Net: choose 1..3"):
        deepcache(unet, bad).__enter__()
    with pytest.raises(ConfigError, match="interval must be a positive integer"):
        DeepCacheConfig(interval=0)


# ---------------------------------------------------------------- through generate()


def _count_calls(model: LatentDiffusion, request: GenerateRequest) -> tuple[int, int, list]:
    """(U-Net calls, full passes, batch sizes) of one generate() call, via forward hooks on
    the output head (every call) and the middle block (full passes only)."""
    calls, full, batches = [], [], []
    h1 = model.unet.out.register_forward_hook(lambda m, i, o: calls.append(1))
    h2 = model.unet.middle_block.register_forward_hook(lambda m, i, o: full.append(1))
    h3 = model.unet.input_blocks[0].register_forward_hook(
        lambda m, i, o: batches.append(o.shape[0])
    )
    try:
        generate(model, request)
    finally:
        for h in (h1, h2, h3):
            h.remove()
    return len(calls), len(full), batches


@pytest.mark.parametrize(("sampler", "nfe"), [("dpmpp_2m", 6), ("heun", 11)])
def test_cache_is_kept_per_nfe_with_cfg_batched(shipped, sampler, nfe):
    """One U-Net call per NFE (Heun: two per step but one on the last), cond and uncond in
    one batch of 2; with interval 2 every other call is a full pass."""
    req = GenerateRequest(n=1, prompts=["a handwritten 3"], steps=6, cfg=5.0, sampler=sampler)
    calls, full, batches = _count_calls(shipped, dataclasses.replace(req, fast=True))
    assert calls == nfe and full == (nfe + 1) // 2
    assert set(batches) == {2}
    calls, full, _ = _count_calls(shipped, req)
    assert calls == full == nfe


def test_fast_interval_one_equals_plain_generate(shipped):
    req = dict(n=2, prompts=["a handwritten 5"], steps=4, cfg=5.0)
    plain = generate(shipped, GenerateRequest(**req))
    one = generate(shipped, GenerateRequest(**req, fast=FastMode(DeepCacheConfig(interval=1))))
    assert torch.equal(plain, one)


def test_fast_mode_and_int8_at_an_odd_size():
    """136x104 on the tiny random SD model (latents 17x13, its U-Net's level 1 9x7): interval
    1 is the plain image bit for bit, interval 2 runs every other call shallow, and the int8
    model stays close (measured max 0.016, DeepCache interval 2 branch 1: 0.032)."""
    model = tiny_model()
    req = tiny_request(height=104, width=136, steps=4)
    plain = generate(model, req)
    one = generate(model, dataclasses.replace(req, fast=FastMode(DeepCacheConfig(interval=1))))
    assert plain.shape[-2:] == (104, 136) and torch.equal(one, plain)
    calls, full, _ = _count_calls(model, dataclasses.replace(req, fast=True))
    assert (calls, full) == (4, 2)
    fast = generate(model, dataclasses.replace(req, fast=FastMode(DeepCacheConfig(2, 1))))
    assert 0 < (fast - plain).abs().max() < 0.1
    q = generate(model.int8(), req)
    assert 0 < (q - plain).abs().max() < 0.1


def test_fast_request_fills_in_the_fast_sampler():
    req = FAST.request(n=2, prompts=["a handwritten 1"])
    assert (req.sampler, req.spacing, req.steps, req.fast) == ("dpmpp_2m", "karras", 10, FAST)
    assert FAST.request(sampler="euler").spacing is None
    assert FAST.request(steps=4).steps == 4


# ---------------------------------------------------------------- int8


@torch.no_grad()
def test_int8_unet_is_close_to_float32(unet):
    q = quantize_int8(unet)
    x, t, ctx = _inputs()
    ref, out = unet(x, t, context=ctx), q(x, t, context=ctx)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05  # measured 0.006 (per-channel int8 weights)
    assert not isinstance(unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q, nnqd.Linear)
    assert isinstance(q.input_blocks[1][1].transformer_blocks[0].attn1.to_q, nnqd.Linear)
    assert not isinstance(q.time_embed[0], nnqd.Linear)


@torch.no_grad()
def test_int8_inplace_quantises_the_module_itself_with_the_same_result(unet):
    x, t, ctx = _inputs()
    want = quantize_int8(unet)(x, t, context=ctx)  # a copy: ``unet`` stays float
    own = copy.deepcopy(unet)
    q = quantize_int8(own, inplace=True)
    assert q is own
    assert isinstance(own.input_blocks[1][1].transformer_blocks[0].attn1.to_q, nnqd.Linear)
    torch.testing.assert_close(q(x, t, context=ctx), want, rtol=0, atol=0)


def test_int8_refuses_a_half_precision_model():
    with pytest.raises(ConfigError, match="float32 CPU model"):
        quantize_int8(UNet(TINY).to(torch.bfloat16))


# ---------------------------------------------------------------- quality on the shipped model


def _digit_accuracy(model: LatentDiffusion, request: GenerateRequest) -> float:
    digits = [d for d in range(10) for _ in range(10)]
    prompts = [f"a handwritten {DIGIT_WORDS[d]}" for d in digits]
    images = generate(model, dataclasses.replace(request, n=100, prompts=prompts))
    predicted = mnist_extractor().logits(images[..., 2:30, 2:30]).argmax(1)
    return (predicted == torch.tensor(digits)).float().mean().item()


def test_fast_mode_keeps_the_digits(shipped):
    """FAST: DeepCache N = 2, branch 2 + DPM++ 2M Karras 10 steps, CFG 5: measured 1.00 (plain
    DPM++ 2M Uniform 20 steps: 1.00; branch 1: 1.00)."""
    assert _digit_accuracy(shipped, FAST.request(cfg=5.0, seed=0)) >= 0.9


def test_fast_mode_interval_three_keeps_the_digits(shipped):
    """DeepCache N = 3, branch 1 (the cheapest setting) + 10 steps: measured 1.00."""
    fast = FastMode(DeepCacheConfig(interval=3, branch=1))
    assert _digit_accuracy(shipped, fast.request(cfg=5.0, seed=0)) >= 0.9


def test_int8_fast_mode_keeps_the_digits(shipped):
    """int8 Linear layers (U-Net + text encoder) + fast mode: measured 1.00."""
    assert _digit_accuracy(shipped.int8(), FAST.request(cfg=5.0, seed=0)) >= 0.9
