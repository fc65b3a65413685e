"""Latent text-to-image through the one generate() core: prompts, CFG, seeds, img2img,
inpainting (blended and 9-channel), guidance rescale, previews, save/load, and parity with
diffusers' Stable Diffusion pipelines built from the same tiny random weights (test-only)."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

from helpers import jitter
from noisecraft.diffusion import CFGDenoiser, NoiseSchedule, make_sigmas, rescale_guidance
from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.native import load_latent_diffusion, load_pixel_diffusion, save_model
from noisecraft.io.tokenizer_spec import tokenizer_from_spec, tokenizer_spec
from noisecraft.models import LatentDiffusion, PixelDiffusion
from noisecraft.models.latent_diffusion import latent_to_rgb
from noisecraft.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from noisecraft.models.tokenizer import CLIPTokenizer, bytes_to_unicode
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.models.vae import AutoencoderKL, VAEConfig
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.pipelines.generate import count_steps, img2img_start

H, W = 48, 64  # latents 6x8: the U-Net's deepest level stays 3x4 (notes/diffusers-parity.md)
WIDTH = 32
MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>")]
UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(0,),
    num_heads=2,
    norm_groups=8,
    context_dim=WIDTH,
)
VAE = VAEConfig(base_channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4)


def small_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer with 520 tokens: bytes, bytes</w>, six merges, start and end."""
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols)] + ["".join(m) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, MERGES, cleanup="transformers")


def tiny_model(unet: UNetConfig = UNET, vae: VAEConfig = VAE, **kw) -> LatentDiffusion:
    tok = small_tokenizer()
    torch.manual_seed(0)
    te = CLIPTextEncoder(
        TextEncoderConfig(
            vocab_size=tok.vocab_size, width=WIDTH, layers=2, heads=2, intermediate_size=64
        )
    )
    return LatentDiffusion(
        unet=jitter(UNet(unet), 1),
        vae=jitter(AutoencoderKL(vae), 2, std=0.02),
        # jittered: a zero final-LayerNorm bias makes every chunk's mean ~0, and A1111's
        # emphasis (which divides by the chunk mean) then divides 0 by 0
        text_encoder=jitter(te, 3),
        tokenizer=tok,
        schedule=NoiseSchedule.scaled_linear(),
        image_size=64,
        **kw,
    )


@pytest.fixture(scope="module")
def model() -> LatentDiffusion:
    return tiny_model()


def _req(**kw) -> GenerateRequest:
    base = dict(n=1, prompts=["a cat"], steps=3, sampler="euler", height=H, width=W, cfg=4.0)
    return GenerateRequest(**{**base, **kw})


def _image(seed: int = 0, n: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, H, W), generator=g) * 2 - 1


class _Spy:
    """Wrap a module's forward and record the input shapes and kwargs of every call."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.calls = module, []
        self.forward = module.forward
        module.forward = self  # type: ignore[method-assign]

    def __call__(self, x, t, **kw):
        self.calls.append((x.clone(), kw))
        return self.forward(x, t, **kw)

    def restore(self):
        del self.module.forward


# ---------------------------------------------------------------------------- prompts / CFG


def test_encode_prompt_chunks_and_pads_with_empty_prompt(model):
    long = ", ".join(["the cat"] * 40)  # > 75 tokens: two chunks, nothing cut
    ctx = model.encode_prompt([long, "a dog"])
    assert ctx.shape == (2, 154, WIDTH)
    alone = model.encode_prompt(["a dog"])
    assert alone.shape == (1, 77, WIDTH)
    torch.testing.assert_close(ctx[1, :77], alone[0])
    empty = model.encode_prompt([""])[0]
    torch.testing.assert_close(ctx[1, 77:], empty)  # A1111 pads with the empty prompt
    weighted = model.encode_prompt(["a (cat:1.5)"])
    assert not torch.allclose(weighted, model.encode_prompt(["a cat"]))


def test_cfg_one_is_the_conditional_model_alone(model):
    spy = _Spy(model.unet)
    try:
        a = generate(model, _req(n=2, cfg=1.0, negative_prompt=""))
        assert all(x.shape[0] == 2 for x, _ in spy.calls)  # no unconditional half
        b = generate(model, _req(n=2, cfg=1.0, negative_prompt="the dog"))
        spy.calls.clear()
        c = generate(model, _req(n=2, cfg=3.0, negative_prompt="the dog"))
        assert all(x.shape[0] == 4 for x, _ in spy.calls)  # one batch: cond + uncond
    finally:
        spy.restore()
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # negative prompt ignored at cfg 1
    d = generate(model, _req(n=2, cfg=3.0, negative_prompt=""))
    assert (c - d).abs().max() > 1e-3  # ... and used at cfg != 1
    # cfg 1 equals the denoiser on the conditional context only
    sig = make_sigmas(model.schedule, 3, "linspace")
    den = model.denoiser("linspace")
    ctx = model.encode_prompt(["a cat"])
    x = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(0)) * sig[0]
    from noisecraft.samplers import sample_euler

    ref = model.decode(sample_euler(den, x, sig, extra_args={"context": ctx})).clamp(-1, 1)
    torch.testing.assert_close(a[:1], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_batch_with_seeds_equals_single_runs(model, sampler):
    prompts = ["a cat", "the dog"]  # one chunk each: no padding in the batch
    both = generate(model, _req(n=2, prompts=prompts, seeds=[11, 5], sampler=sampler))
    one = generate(model, _req(prompts=prompts[:1], seeds=[11], sampler=sampler))
    two = generate(model, _req(prompts=prompts[1:], seeds=[5], sampler=sampler))
    torch.testing.assert_close(both, torch.cat([one, two]), atol=1e-5, rtol=0)
    # seeds=None: image i gets seed + i
    default = generate(model, _req(n=2, prompts=prompts, seed=11, sampler=sampler))
    torch.testing.assert_close(
        default[1:], generate(model, _req(prompts=prompts[1:], seeds=[12], sampler=sampler))
    )


def test_initial_noise_is_diffusers_per_image_cpu_noise(model):
    seen = []
    generate(model, _req(n=2, seeds=[3, 4]), callback=lambda d: seen.append(d))
    sigma0 = make_sigmas(model.schedule, 3, "linspace")[0]
    want = torch.cat(
        [torch.randn((1, 4, 6, 8), generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    )
    torch.testing.assert_close(seen[0]["x"], want * sigma0)
    assert [d["i"] for d in seen] == [0, 1, 2] and seen[0]["start"] == 0 and seen[0]["stop"] == 2


def test_previews(model):
    cheap, vae = [], []
    generate(model, _req(steps=4), callback=lambda d: cheap.append(d), preview_every=2)
    assert [("preview" in d) for d in cheap] == [True, False, True, True]  # every 2nd + last
    assert cheap[0]["preview"].shape == (1, 3, 6, 8)
    generate(model, _req(steps=2), callback=lambda d: vae.append(d), preview_every=1, preview="vae")
    assert vae[0]["preview"].shape == (1, 3, H, W)
    z = torch.randn(2, 4, 3, 3)
    rgb = latent_to_rgb(z)
    assert rgb.shape == (2, 3, 3, 3) and rgb.abs().max() <= 1
    torch.testing.assert_close(
        latent_to_rgb(z * 0.01)[0, :, 0, 0],
        (z[0, :, 0, 0] * 0.01)
        @ torch.tensor(
            [
                [0.298, 0.207, 0.208],
                [0.187, 0.286, 0.173],
                [-0.158, 0.189, 0.264],
                [-0.184, -0.271, -0.473],
            ]
        ),
    )


# ---------------------------------------------------------------------------- guidance rescale


def _diffusers_rescale(noise_cfg, noise_text, phi):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    return rescale_noise_cfg(noise_cfg, noise_text, guidance_rescale=phi)


def test_rescale_in_output_space_equals_diffusers_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g) * 3
    sigma = torch.tensor([0.5, 2.0, 9.0], dtype=torch.float64)
    s = sigma.float().reshape(-1, 1, 1, 1)
    out_c, out_u = torch.randn(2, 3, 4, 5, 5, generator=g)
    w, phi = 6.0, 0.7
    out_cfg = out_u + w * (out_c - out_u)
    for prediction, a, b in (
        ("eps", torch.ones_like(s), -s),
        ("v", 1 / (1 + s**2), -s / (1 + s**2).sqrt()),
    ):

        def to_x0(o, a=a, b=b):
            return a * x + b * o

        want = to_x0(_diffusers_rescale(out_cfg, out_c, phi))
        x0_cfg = to_x0(out_u) + w * (to_x0(out_c) - to_x0(out_u))
        c_skip = torch.ones_like(sigma) if prediction == "eps" else 1 / (1 + sigma**2)
        got = rescale_guidance(x0_cfg, to_x0(out_c), phi, x=x, c_skip=c_skip)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # rescaling x0 itself (no c_skip) is another thing
        assert (rescale_guidance(x0_cfg, to_x0(out_c), phi) - want).abs().max() > 1e-2
    # phi = 0 is plain CFG; x0-prediction (a = 0) agrees with the x0-space formula
    assert rescale_guidance(x0_cfg, out_c, 0.0, x=x, c_skip=torch.ones(3)) is x0_cfg
    torch.testing.assert_close(
        rescale_guidance(out_cfg, out_c, phi, x=x, c_skip=torch.zeros(3)),
        rescale_guidance(out_cfg, out_c, phi),
    )


def test_guided_denoiser_rescale_zero_is_plain_cfg(model):
    den = model.denoiser()
    ctx = model.encode_prompt(["a cat", ""])
    x = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(1)) * 5
    sigma = torch.tensor([5.0])
    plain = CFGDenoiser(den, 5.0, {"context": ctx[1:]})(x, sigma, context=ctx[:1])
    ours = CFGDenoiser(den, 5.0, {"context": ctx[1:]}, 0.0, c_skip=model.c_skip)
    torch.testing.assert_close(ours(x, sigma, context=ctx[:1]), plain, rtol=0, atol=0)
    rescaled = CFGDenoiser(den, 5.0, {"context": ctx[1:]}, 0.7, c_skip=model.c_skip)
    assert (rescaled(x, sigma, context=ctx[:1]) - plain).abs().max() > 1e-4
    a = generate(model, _req(guidance_rescale=0.0))
    b = generate(model, _req(guidance_rescale=0.7))
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="guidance_rescale must be in"):
        generate(model, _req(guidance_rescale=1.5))


# ---------------------------------------------------------------------------- img2img


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.7), (100, 0.29), (4, 0.1), (3, 1.0)])
def test_img2img_start_matches_diffusers_get_timesteps(steps, strength):
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    sched = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    sched.set_timesteps(steps)
    fake = types.SimpleNamespace(scheduler=sched)
    ts, run = StableDiffusionImg2ImgPipeline.get_timesteps(fake, steps, strength, "cpu")
    start = img2img_start(steps, strength)
    assert run == steps - start == len(ts)
    ours = make_sigmas(NoiseSchedule.scaled_linear(), steps, "linspace")[start:]
    torch.testing.assert_close(
        ours, sched.sigmas[sched.begin_index :].float(), rtol=1e-5, atol=1e-5
    )


def test_img2img_strength_zero_is_the_vae_round_trip(model):
    x = _image()
    out = generate(model, _req(init_image=x, strength=0.0, steps=5), callback=pytest.fail)
    z = model.vae.encode_latents(x, torch.Generator().manual_seed(0))  # the image's generator
    torch.testing.assert_close(out, model.vae.decode_latents(z).clamp(-1, 1))
    mode = model.replace(sample_posterior=False)
    out = generate(mode, _req(init_image=x, strength=0.0))
    want = model.vae.decode(model.vae.encode(x).mode()).clamp(-1, 1)
    torch.testing.assert_close(out, want)


def test_img2img_starts_at_the_strength_sigma(model):
    x = _image()
    seen = []
    generate(model, _req(init_image=x, strength=0.5, steps=6, seeds=[7]), callback=seen.append)
    sig = make_sigmas(model.schedule, 6, "linspace")
    assert len(seen) == 3 and count_steps(model, _req(init_image=x, strength=0.5, steps=6)) == 3
    g = torch.Generator().manual_seed(7)
    z = model.vae.encode_latents(x, g)  # first the posterior sample, then the noise
    noise = torch.randn((1, 4, 6, 8), generator=g)
    torch.testing.assert_close(seen[0]["x"], z + noise * sig[3])  # Euler's add_noise
    torch.testing.assert_close(seen[0]["sigma"], sig[3])


def test_img2img_strength_one_is_text_to_image_when_the_latent_is_zero(model):
    """At strength 1 diffusers (and we) start from z + sigma_max * noise, after drawing the
    posterior sample: equal to text-to-image exactly when z = 0 and no sample is drawn."""
    vae = AutoencoderKL(VAE)
    vae.load_state_dict(model.vae.state_dict())
    with torch.no_grad():
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.zero_()  # posterior N(0, 1): mode 0
    zero = model.replace(vae=vae.eval(), sample_posterior=False)
    a = generate(zero, _req(init_image=_image(), strength=1.0, seeds=[3]))
    b = generate(zero, _req(seeds=[3]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = generate(model, _req(init_image=_image(), strength=1.0, seeds=[3]))
    assert (c - generate(model, _req(seeds=[3]))).abs().max() > 1e-3  # z and the draw order


# ---------------------------------------------------------------------------- inpainting


def _mask(n: int = 1) -> torch.Tensor:
    m = torch.zeros(n, 1, H, W)
    m[..., :, : W // 2] = 1.0  # repaint the left half
    return m


def test_inpaint_keeps_known_latents(model):
    """Outside the mask the final latents ARE the init image's latents, so the pixels there
    are its VAE round trip up to what the decoder mixes in across the mask edge. (A random
    VAE's decoder is global -- mid attention, GroupNorm statistics -- so the pixel-level check
    is made where decoding is the identity: the pixel model in test_pixel_model_...)."""
    x, mask = _image(), _mask()
    req = _req(init_image=x, mask=mask, seeds=[2], steps=4)
    lat = generate(model, req, decode=False)
    g = torch.Generator().manual_seed(2)
    known = model.vae.encode_latents(x, g)  # drawn first, then the noise
    m = F.interpolate(mask, size=(6, 8))
    assert torch.equal(lat * (1 - m), known * (1 - m))  # exactly the known latents
    assert (lat * m - known * m).abs().max() > 0.1
    torch.testing.assert_close(generate(model, req), model.decode(lat).clamp(-1, 1))


def test_inpaint_blend_equals_diffusers_after_step_blend(model):
    """The denoiser-wrapper blend gives diffusers' loop: Euler step, then blend the known
    latents noised to the next sigma with the initial noise (clean after the last step)."""
    x, mask = _image(), _mask()
    got = generate(model, _req(init_image=x, mask=mask, seeds=[4], steps=4), decode=False)
    g = torch.Generator().manual_seed(4)
    known = model.vae.encode_latents(x, g)
    noise = torch.randn((1, 4, 6, 8), generator=g)
    m = F.interpolate(mask, size=(6, 8))
    sig = make_sigmas(model.schedule, 4, "linspace").tolist()
    ctx = model.encode_prompt(["a cat", ""])
    den = CFGDenoiser(model.denoiser(), 4.0, {"context": ctx[1:]})
    lat = noise * sig[0]
    for i in range(4):
        d = den(lat, torch.tensor([sig[i]]), context=ctx[:1])
        lat = lat + (sig[i + 1] - sig[i]) * (lat - d) / sig[i]
        lat = (1 - m) * (known + sig[i + 1] * noise) + m * lat
    torch.testing.assert_close(got, lat, atol=1e-5, rtol=1e-5)


def test_nine_channel_inpaint_unet_conditioning():
    model = tiny_model(dataclasses.replace(UNET, in_channels=9))
    assert model.inpaint_unet
    x, mask = _image(n=2), _mask()
    spy = _Spy(model.unet)
    try:
        out = generate(model, _req(n=2, init_image=x, mask=mask, seeds=[5, 6], cfg=3.0))
    finally:
        spy.restore()
    assert out.shape == (2, 3, H, W)
    x_in, _ = spy.calls[0]
    assert x_in.shape == (4, 9, 6, 8)  # (cond + uncond) x [latents, mask, masked latents]
    m = F.interpolate(mask, size=(6, 8))
    torch.testing.assert_close(x_in[:, 4:5], m.expand(4, -1, -1, -1))
    # strength 1: no image latents; the generator draws the noise, then the masked image
    for j, seed in enumerate((5, 6)):
        g = torch.Generator().manual_seed(seed)
        torch.randn((1, 4, 6, 8), generator=g)
        masked = model.vae.encode_latents(x[j : j + 1] * (mask < 0.5), g)
        torch.testing.assert_close(x_in[j : j + 1, 5:], masked)
        torch.testing.assert_close(x_in[j + 2 : j + 3, 5:], masked)


# ---------------------------------------------------------------------------- errors, io


def test_one_line_errors(model):
    cases = [
        (_req(width=60), "multiple of 8"),
        (_req(init_image=_image(), strength=1.5), "strength"),
        (_req(strength=0.5), "strength needs init_image"),
        (_req(init_image=_image(), mask=torch.ones(1, 1, 16, 16)), "mask is 16x16"),
        (_req(mask=torch.ones(1, 1, H, W)), "mask needs init_image"),
        (_req(classes=[1]), "takes prompt, not class_label"),
        (_req(n=3, prompts=["a", "b"]), "2 prompts for 3 images"),
        (_req(n=2, seeds=[1]), "1 seeds for 2 images"),
        (_req(init_image=_image()[:, :, :36], height=None, width=None), "multiple of 8"),
    ]
    for req, match in cases:
        with pytest.raises(ConfigError) as e:
            generate(model, req)
        assert match in str(e.value) and "\n" not in str(e.value), (match, str(e.value))
    # any multiple of the VAE's 8 goes: 72 = 8 x 9, an odd latent width (once "multiples of 16")
    assert generate(model, _req(width=72, steps=1)).shape == (1, 3, H, 72)


def test_pixel_model_through_the_same_core():
    torch.manual_seed(0)
    unet = UNet(
        UNetConfig(
            model_channels=8,
            channel_mult=(1, 2),
            num_heads=2,
            norm_groups=4,
            attention_levels=(1,),
            num_classes=3,
        )
    ).eval()
    pixel = PixelDiffusion(unet, NoiseSchedule.cosine(100), image_size=8)
    with pytest.raises(ConfigError, match="this model takes class_label, not prompt"):
        generate(pixel, GenerateRequest(n=1, prompts=["a cat"]))
    # img2img and inpainting need no pixel-specific code
    x = torch.rand(1, 1, 8, 8) * 2 - 1
    out = generate(pixel, GenerateRequest(n=2, steps=3, init_image=x, strength=0.0))
    torch.testing.assert_close(out, x.expand(2, -1, -1, -1))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    out = generate(
        pixel, GenerateRequest(n=1, steps=3, classes=[1], cfg=2.0, init_image=x, mask=mask)
    )
    torch.testing.assert_close(out[..., 4:], x[..., 4:])
    # any size: 7x5 pixels (the U-Net's level 1 is 4x3), through txt2img and img2img
    out = generate(pixel, GenerateRequest(n=2, steps=3, classes=[0, 2], height=7, width=5))
    assert out.shape == (2, 1, 7, 5) and out.std() > 0
    x = torch.rand(1, 1, 7, 5) * 2 - 1
    out = generate(pixel, GenerateRequest(n=1, steps=3, init_image=x, strength=0.0))
    torch.testing.assert_close(out, x)


def test_save_load_round_trip(model, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_model(model, path)
    back = load_latent_diffusion(path)
    spec = back.info.config["tokenizer"]
    assert spec["name"] == "custom" and "vocab_json" in spec
    assert back.tokenizer.encode("the cat") == model.tokenizer.encode("the cat")
    req = _req(n=2, negative_prompt="dog", guidance_rescale=0.5)
    torch.testing.assert_close(generate(back, req), generate(model, req), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="'latent_diffusion' model, but a 'unet'"):
        load_pixel_diffusion(path)
    pixel = tmp_path / "pixel.safetensors"
    save_model(
        PixelDiffusion(UNet(UNetConfig(model_channels=8, norm_groups=4)), NoiseSchedule.linear()),
        pixel,
    )
    with pytest.raises(CheckpointError, match="'unet' model, but a 'latent_diffusion'"):
        load_latent_diffusion(pixel)


def test_default_tokenizer_is_saved_by_name():
    tok = CLIPTokenizer.default(pad_token_id=0)
    spec = tokenizer_spec(tok)
    assert spec["name"] == "clip-default" and "vocab_json" not in spec
    back = tokenizer_from_spec(spec)
    assert back.pad_token_id == 0 and back.encode("a photo of a cat") == tok.encode(
        "a photo of a cat"
    )
    with pytest.raises(ConfigError, match="CLIPTokenizer"):
        tokenizer_spec(lambda texts: torch.zeros(len(texts), 77, dtype=torch.long))


def test_any_callable_tokenizer_works(model):
    """Dependency injection: a plain callable (B, 77) tokenizer is one chunk per prompt."""
    tok = model.tokenizer
    plain = model.replace(tokenizer=lambda texts: tok(texts))
    torch.testing.assert_close(
        plain.encode_prompt(["the cat", ""]), model.encode_prompt(["the cat", ""])
    )


# ---------------------------------------------------------------------------- diffusers parity


def _diffusers_components(model: LatentDiffusion, tmp_path):
    import transformers
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from noisecraft.models.tokenizer import write_vocab_files

    u, v, t = model.unet.config, model.vae.config, model.text_encoder.config
    cross = u.in_channels  # 4 or 9
    unet = UNet2DConditionModel(
        in_channels=cross,
        out_channels=4,
        layers_per_block=u.num_res_blocks,
        block_out_channels=tuple(u.model_channels * m for m in u.channel_mult),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=u.context_dim,
        attention_head_dim=u.num_heads,
        norm_num_groups=u.norm_groups,
        sample_size=H // 8,
    )
    sd = {f"model.diffusion_model.{k}": w for k, w in model.unet.state_dict().items()}
    unet.load_state_dict(
        convert_ldm_unet_checkpoint(sd, {"layers_per_block": u.num_res_blocks}), strict=True
    )
    n = len(v.channel_mult)
    vae = DAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(v.base_channels * m for m in v.channel_mult),
        layers_per_block=v.num_res_blocks,
        latent_channels=v.z_channels,
        norm_num_groups=v.norm_groups,
        scaling_factor=v.scaling_factor,
    )
    vae.load_state_dict(model.vae.to_diffusers_state_dict(), strict=True)
    te = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.width,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            max_position_embeddings=t.max_positions,
            hidden_act="quick_gelu",
            bos_token_id=model.tokenizer.bos_token_id,
            eos_token_id=model.tokenizer.eos_token_id,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    )
    te.load_state_dict(model.text_encoder.state_dict(), strict=True)  # transformers 5 names
    write_vocab_files(model.tokenizer, tmp_path / "tok")
    tok = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "tok"), model_max_length=77)
    sched = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
    )
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=te.eval(),
        tokenizer=tok,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _pil(x: torch.Tensor):
    from PIL import Image

    from noisecraft.viz.images import to_uint8

    return Image.fromarray(to_uint8(x)[0])


@pytest.mark.parametrize("mode", ["txt2img", "euler_a", "img2img", "inpaint", "inpaint9"])
def test_parity_with_diffusers_euler(mode, tmp_path):
    """Same weights, same seeds: diffusers' SD pipelines (Euler / Euler a, list of CPU
    generators) and generate() agree to float rounding (observed max 3e-6)."""
    import diffusers

    model = tiny_model(dataclasses.replace(UNET, in_channels=9)) if mode == "inpaint9" else None
    model = model or tiny_model()
    parts = _diffusers_components(model, tmp_path)
    prompt, negative, steps, cfg, seed = "the cat", "a dog", 4, 5.0, 21
    init = _pil(_image(3))
    x = torch.from_numpy(__import__("numpy").asarray(init, dtype="float32")).permute(2, 0, 1)
    x = x[None] / 127.5 - 1
    maskim = _pil(_mask().expand(-1, 3, -1, -1) * 2 - 1).convert("L")
    kw = dict(
        prompt=prompt,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=[torch.Generator().manual_seed(seed)],
        output_type="pt",
        height=H,
        width=W,
    )
    req = dict(prompts=[prompt], negative_prompt=negative, steps=steps, cfg=cfg, seeds=[seed])
    if mode in ("txt2img", "euler_a"):
        if mode == "euler_a":  # per-step noise from each image's generator
            parts["scheduler"] = diffusers.EulerAncestralDiscreteScheduler.from_config(
                parts["scheduler"].config
            )
            req["sampler"] = "euler_ancestral"
        pipe = diffusers.StableDiffusionPipeline(**parts)
        kw.update(
            num_images_per_prompt=2,
            generator=[torch.Generator().manual_seed(s) for s in (seed, seed + 5)],
        )
        req.update(n=2, seeds=[seed, seed + 5])
    elif mode == "img2img":
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**parts)
        kw.update(image=init, strength=0.6)
        del kw["height"], kw["width"]
        req.update(init_image=x, strength=0.6)
    else:
        pipe = diffusers.StableDiffusionInpaintPipeline(**parts)
        kw.update(image=init, mask_image=maskim, strength=1.0)
        req.update(init_image=x, mask=_mask(), strength=1.0)
    with torch.no_grad():
        want = pipe(**kw).images
    got = (generate(model, _req(**req)) / 2 + 0.5).clamp(0, 1)
    assert got.std() > 0.1  # not a flat image
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=0)
