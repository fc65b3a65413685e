"""diffusers pipeline folders: read, write, round trips and errors (diffusers / transformers are
test-only references).

Tiny Stable Diffusion pipelines are built here with random weights (SD 1.x style: conv
projections, a head count, quick GELU, eps; SD 2.x style: linear projections, 64-channel
heads, GELU, v-prediction, "!" padding; a 9-channel inpainting U-Net), saved with
``save_pretrained`` and read with :func:`load_diffusers_folder`: every component must give
diffusers' / transformers' outputs and an Euler image must match diffusers' pipeline.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import jitter
from noisecraft.diffusion import NoiseSchedule
from noisecraft.errors import CheckpointError, NoisecraftError, OutputExistsError
from noisecraft.io.formats.diffusers_folder import (
    load_diffusers_folder,
    save_diffusers_folder,
    schedule_from_diffusers,
    schedule_to_diffusers,
)
from noisecraft.models.tokenizer import write_vocab_files
from noisecraft.pipelines import GenerateRequest, generate
from test_latent_pipeline import UNET, VAE, small_tokenizer, tiny_model

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

H, W = 48, 64  # latents 6x8: the deepest U-Net level stays 3x4 (notes/diffusers-parity.md)
WIDTH = 32
STYLES = ("sd1", "sd2", "inpaint")


def _build_pipeline(style: str, tmp):
    """A tiny diffusers SD pipeline of the given style (random weights)."""
    tok = small_tokenizer()
    write_vocab_files(tok, tmp / "vocab")
    pad = {"pad_token": "!"} if style == "sd2" else {}  # SD 2.x (OpenCLIP) pads with id 0
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        str(tmp / "vocab"), model_max_length=77, **pad
    )
    torch.manual_seed(0)
    if style == "sd2":
        unet_kw = dict(
            block_out_channels=(64, 128),
            attention_head_dim=[1, 2],  # per-level head counts of 64-channel heads
            use_linear_projection=True,
            norm_num_groups=32,
        )
    else:
        unet_kw = dict(block_out_channels=(16, 32), attention_head_dim=2, norm_num_groups=8)
    unet = diffusers.UNet2DConditionModel(
        in_channels=9 if style == "inpaint" else 4,
        out_channels=4,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH,
        sample_size=8,
        **unet_kw,
    )
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    )
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=tok.vocab_size,
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_act="gelu" if style == "sd2" else "quick_gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        prediction_type="v_prediction" if style == "sd2" else "epsilon",
    )
    cls = (
        diffusers.StableDiffusionInpaintPipeline
        if style == "inpaint"
        else diffusers.StableDiffusionPipeline
    )
    return cls(
        unet=jitter(unet, 1),
        vae=jitter(vae, 2, std=0.02),
        text_encoder=jitter(text_encoder, 3),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """style -> (diffusers pipeline, its save_pretrained folder, our model read from it)."""
    out = {}
    for style in STYLES:
        tmp = tmp_path_factory.mktemp(style)
        pipe = _build_pipeline(style, tmp)
        pipe.save_pretrained(str(tmp / "model"))
        out[style] = (pipe, tmp / "model", load_diffusers_folder(tmp / "model"))
    return out


def _ids(pipe, prompts):
    return pipe.tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def _assert_components_match(model, pipe):
    """Tokenizer ids, text encoder, U-Net and VAE outputs equal diffusers' / transformers'."""
    prompts = ["the cat", "a dog, the dog"]
    ids = _ids(pipe, prompts)
    assert torch.equal(model.tokenizer(prompts), ids)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ctx = pipe.text_encoder(ids).last_hidden_state
        torch.testing.assert_close(
            model.text_encoder(ids).last_hidden_state, ctx, atol=1e-4, rtol=0
        )
        x = torch.randn(2, pipe.unet.config.in_channels, H // 8, W // 8, generator=g)
        t = torch.tensor([10.0, 613.5])
        want = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        assert want.std() > 0.05
        torch.testing.assert_close(model.unet(x, t, context=ctx), want, atol=1e-4, rtol=0)
        z = torch.randn(1, 4, H // 8, W // 8, generator=g)
        torch.testing.assert_close(
            model.vae.decode(z), pipe.vae.decode(z).sample, atol=1e-4, rtol=0
        )
        img = torch.rand(1, 3, H, W, generator=g) * 2 - 1
        torch.testing.assert_close(
            model.vae.encode(img).mean, pipe.vae.encode(img).latent_dist.mean, atol=1e-4, rtol=0
        )
    assert model.vae.config.scaling_factor == pipe.vae.config.scaling_factor


# ---------------------------------------------------------------------------- reading


@pytest.mark.parametrize("style", STYLES)
def test_read_folder_matches_diffusers(saved, style):
    pipe, folder, model = saved[style]
    _assert_components_match(model, pipe)
    u = model.unet.config
    if style == "sd2":
        assert (u.head_channels, u.use_linear_projection) == (64, True)
        assert model.prediction == "v" and model.text_encoder.config.activation == "gelu"
        assert model.tokenizer.pad_token_id == 0
    else:
        assert (u.num_heads, u.head_channels, u.use_linear_projection) == (2, -1, False)
        assert model.prediction == "eps" and model.text_encoder.config.activation == "quick_gelu"
    assert model.inpaint_unet == (style == "inpaint")
    assert model.image_size == 8 * 8  # sample_size times the VAE's factor, as diffusers' default
    # the schedule is diffusers' (float32 there, float64 here)
    torch.testing.assert_close(
        model.schedule.alphas_cumprod.float(), pipe.scheduler.alphas_cumprod, atol=1e-6, rtol=0
    )
    sched = model.info.diffusion["scheduler"]
    assert sched["class_name"] == "EulerDiscreteScheduler"
    assert (sched["timestep_spacing"], sched["steps_offset"]) == ("linspace", 1)
    assert sched["use_karras_sigmas"] is False
    assert sched["config"]["_class_name"] == "EulerDiscreteScheduler"
    # transformers 5 writes text-encoder keys without "text_model." (published files have it)
    assert not any(
        k.startswith("text_model.") for k in load_file(folder / "text_encoder/model.safetensors")
    )


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_euler_image_equals_diffusers_pipeline(saved, style):
    """Same folder, prompt, seed and Euler scheduler: the same image (diffusers' CPU noise)."""
    pipe, _, model = saved[style]
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
    req = GenerateRequest(
        n=1,
        prompts=[prompt],
        negative_prompt=negative,
        steps=steps,
        cfg=cfg,
        seeds=[seed],
        sampler="euler",
        height=H,
        width=W,
    )
    got = (generate(model, req) / 2 + 0.5).clamp(0, 1)
    assert got.std() > 0.05  # not a flat image
    assert (got - want.float()).abs().max() <= 2 / 255


def _assert_same_weights(a, b, *, transform=lambda t: t):
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == torch.float32
            assert torch.equal(sa[k], transform(sb[k])), (part, k)


def test_bin_fp16_variant_and_sharded_weights(saved, tmp_path):
    pipe, folder, model = saved["sd1"]
    # .bin weights (transformers 5 only writes safetensors: the text encoder's pytorch_model.bin
    # is written as transformers 4 did, with the "text_model." prefix)
    bin_dir = tmp_path / "bin"
    pipe.unet.save_pretrained(str(bin_dir / "unet"), safe_serialization=False)
    pipe.vae.save_pretrained(str(bin_dir / "vae"), safe_serialization=False)
    (bin_dir / "text_encoder").mkdir()
    shutil.copy(folder / "text_encoder/config.json", bin_dir / "text_encoder/config.json")
    te = {f"text_model.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    torch.save(te, bin_dir / "text_encoder/pytorch_model.bin")
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(folder / part, bin_dir / part)
    shutil.copy(folder / "model_index.json", bin_dir)
    assert (bin_dir / "unet/diffusion_pytorch_model.bin").is_file()
    _assert_same_weights(load_diffusers_folder(bin_dir), model)

    # variant="fp16": half-precision files, widened to float32
    half = copy.deepcopy(pipe).to(torch.float16)
    half.save_pretrained(str(tmp_path / "fp16"), variant="fp16")
    assert (tmp_path / "fp16/unet/diffusion_pytorch_model.fp16.safetensors").is_file()
    m16 = load_diffusers_folder(tmp_path / "fp16", variant="fp16")
    _assert_same_weights(m16, model, transform=lambda t: t.half().float())
    with pytest.raises(CheckpointError, match="pass the matching variant"):
        load_diffusers_folder(tmp_path / "fp16")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bf16\.safetensors"):
        load_diffusers_folder(folder, variant="bf16")

    # sharded weights with an index (fp16 variant index too)
    shutil.rmtree(tmp_path / "fp16/unet")
    half.unet.save_pretrained(str(tmp_path / "fp16/unet"), variant="fp16", max_shard_size="50KB")
    assert (tmp_path / "fp16/unet/diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    sharded = load_diffusers_folder(tmp_path / "fp16", variant="fp16")
    _assert_same_weights(sharded, m16)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("style", ["sd1", "sd2", "inpaint"])
def test_diffusers_ours_diffusers_round_trip(saved, style, tmp_path):
    """folder -> ours -> save_diffusers_folder -> diffusers: the same weights, configs that
    build the same model, and (txt2img) the same image from diffusers' own pipeline."""
    pipe, folder, model = saved[style]
    out = save_diffusers_folder(model, tmp_path / "out")
    index = json.loads((out / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    assert cls is type(pipe)
    back = cls.from_pretrained(str(out))
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, part).state_dict(), getattr(back, part).state_dict()
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
    for key in ("attention_head_dim", "use_linear_projection", "in_channels", "block_out_channels"):
        a, b = back.unet.config[key], pipe.unet.config[key]
        assert (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)
    assert type(back.scheduler) is type(pipe.scheduler)
    assert back.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    for s in (back.scheduler, pipe.scheduler):
        s.set_timesteps(7)
    torch.testing.assert_close(back.scheduler.sigmas, pipe.scheduler.sigmas)
    torch.testing.assert_close(back.scheduler.timesteps, pipe.scheduler.timesteps)
    assert torch.equal(_ids(back, ["the dog"]), _ids(pipe, ["the dog"]))
    if style == "inpaint":
        return
    kw = dict(
        prompt="the cat",
        num_inference_steps=3,
        guidance_scale=4.0,
        output_type="pt",
        height=H,
        width=W,
    )
    with torch.no_grad():
        want = pipe(**kw, generator=torch.Generator().manual_seed(3)).images
        got = back(**kw, generator=torch.Generator().manual_seed(3)).images
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def _sd2_style_model():
    unet = dataclasses.replace(
        UNET,
        model_channels=64,
        num_heads=-1,
        head_channels=64,
        use_linear_projection=True,
        norm_groups=32,
    )
    model = tiny_model(unet, prediction="v")
    te = model.text_encoder
    from noisecraft.models.text_encoder import CLIPTextEncoder

    gelu = CLIPTextEncoder(dataclasses.replace(te.config, activation="gelu"))
    gelu.load_state_dict(te.state_dict())
    schedule = NoiseSchedule.scaled_linear().rescale_zero_terminal_snr()
    return model.replace(text_encoder=gelu.eval(), schedule=schedule)


@pytest.mark.parametrize("which", ["sd1", "sd2", "vae-f4"])
def test_ours_folder_ours_is_bit_exact(which, tmp_path):
    if which == "sd2":
        model = _sd2_style_model()
    elif which == "vae-f4":  # 3 VAE levels: image_size = sample_size * 4, not * 8
        model = tiny_model(vae=dataclasses.replace(VAE, channel_mult=(1, 2, 2))).replace(
            image_size=96
        )
    else:
        model = tiny_model()
    save_diffusers_folder(model, tmp_path / "m")
    # published-style keys: the text encoder is written with the "text_model." prefix
    te_keys = load_file(tmp_path / "m/text_encoder/model.safetensors")
    assert all(k.startswith("text_model.") for k in te_keys)
    back = load_diffusers_folder(tmp_path / "m")
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(model, part), getattr(back, part)
        assert a.config == b.config, part
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    assert torch.equal(back.schedule.betas, model.schedule.betas)
    assert back.schedule.to_config() == model.schedule.to_config()
    assert (back.prediction, back.image_size) == (model.prediction, model.image_size)
    a, b = model.tokenizer, back.tokenizer
    assert dict(a.vocab) == dict(b.vocab) and a.merges == b.merges
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id, a.context_length, a.cleanup) == (
        b.bos_token_id,
        b.eos_token_id,
        b.pad_token_id,
        b.context_length,
        b.cleanup,
    )
    # no default scheduler in the model's info: Euler with linspace spacing is written
    sched = json.loads((tmp_path / "m/scheduler/scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler"
    assert sched["timestep_spacing"] == "linspace"


def test_clip_skip_is_written_as_fewer_layers(tmp_path):
    """diffusers conditions on the last layer: clip skip k keeps layers - k + 1 layers."""
    model = tiny_model(clip_skip=2)
    save_diffusers_folder(model, tmp_path / "m")
    back = load_diffusers_folder(tmp_path / "m")
    assert back.text_encoder.config.layers == 1 and back.clip_skip is None
    prompts = ["the cat", "a dog"]
    torch.testing.assert_close(back.encode_prompt(prompts), model.encode_prompt(prompts))
    plain = tiny_model()
    assert (plain.encode_prompt(prompts) - model.encode_prompt(prompts)).abs().max() > 1e-3


def test_scheduler_class_and_options_are_written_back(saved, tmp_path):
    """A model read from a folder keeps its scheduler (class, options); the schedule keys
    are the model's own."""
    _, folder, model = saved["sd1"]
    cfg = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    cfg.update(_class_name="DDIMScheduler", timestep_spacing="leading", clip_sample=False)
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    (edited / "scheduler/scheduler_config.json").write_text(json.dumps(cfg))
    m = load_diffusers_folder(edited, prediction="v")
    assert m.prediction == "v"
    assert m.info.diffusion["scheduler"]["class_name"] == "DDIMScheduler"
    save_diffusers_folder(m, tmp_path / "out")
    written = json.loads((tmp_path / "out/scheduler/scheduler_config.json").read_text())
    assert written["_class_name"] == "DDIMScheduler"
    assert (written["timestep_spacing"], written["clip_sample"]) == ("leading", False)
    assert written["prediction_type"] == "v_prediction"
    index = json.loads((tmp_path / "out/model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]


@pytest.mark.parametrize(
    "schedule",
    [
        NoiseSchedule.scaled_linear(),
        NoiseSchedule.linear(),
        NoiseSchedule.cosine(),
        NoiseSchedule.scaled_linear().rescale_zero_terminal_snr(),
        NoiseSchedule.cosine(s=0.02),  # not diffusers' cosine: written as trained_betas
        NoiseSchedule.sigmoid(),
    ],
    ids=["scaled_linear", "linear", "cosine", "zero-snr", "cosine-s", "sigmoid"],
)
def test_schedule_round_trip_and_diffusers_betas(schedule):
    cfg = schedule_to_diffusers(schedule, "eps")
    back, prediction = schedule_from_diffusers(json.loads(json.dumps(cfg)))
    assert prediction == "eps" and torch.equal(back.betas, schedule.betas)
    ref = diffusers.DDPMScheduler(**cfg)  # diffusers' betas of the same config (float32)
    torch.testing.assert_close(
        schedule.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6, rtol=1e-5
    )


# ---------------------------------------------------------------------------- errors


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, NoisecraftError)
    return msg


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_part(saved, tmp_path, part):
    dst = _copy(saved["sd1"][1], tmp_path)
    shutil.rmtree(dst / part)
    with pytest.raises(CheckpointError) as e:
        load_diffusers_folder(dst)
    assert _one_line(e) == (
        f"{dst / part} not found; a diffusers folder needs unet/, vae/, text_encoder/, "
        "tokenizer/ (and scheduler/)"
    )


def test_missing_weights_config_and_folder(saved, tmp_path):
    dst = _copy(saved["sd1"][1], tmp_path)
    (dst / "unet/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_diffusers_folder(dst)
    assert _one_line(e).startswith(f"{dst / 'unet/diffusion_pytorch_model.safetensors'} not found")
    (dst / "vae/config.json").unlink()
    with pytest.raises(CheckpointError, match="vae/config.json not found"):
        load_diffusers_folder(dst)
    with pytest.raises(CheckpointError) as e:
        load_diffusers_folder(tmp_path / "nowhere")
    assert "nowhere not found" in _one_line(e)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        load_diffusers_folder(tmp_path / "file")
    (dst / "text_encoder/model.safetensors").write_bytes(b"not safetensors")
    shutil.copytree(saved["sd1"][1] / "vae", dst / "vae", dirs_exist_ok=True)
    shutil.copy(
        saved["sd1"][1] / "unet/diffusion_pytorch_model.safetensors",
        dst / "unet/diffusion_pytorch_model.safetensors",
    )
    with pytest.raises(CheckpointError) as e:
        load_diffusers_folder(dst)
    assert "text_encoder/model.safetensors could not be read" in _one_line(e)


@pytest.mark.parametrize(
    "name", ["StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"]
)
def test_unsupported_pipelines(saved, tmp_path, name):
    dst = _copy(saved["sd1"][1], tmp_path)
    index = json.loads((dst / "model_index.json").read_text())
    (dst / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))
    with pytest.raises(CheckpointError) as e:
        load_diffusers_folder(dst)
    msg = _one_line(e)
    assert msg.startswith(f"{dst / 'model_index.json'}: pipeline {name}")
    assert "not supported yet" in msg


def test_unsupported_unet_config_names_the_folder_and_field(saved, tmp_path):
    dst = _copy(saved["sd1"][1], tmp_path)
    cfg = json.loads((dst / "unet/config.json").read_text())
    cfg["addition_embed_type"] = "text_time"
    (dst / "unet/config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_diffusers_folder(dst)
    msg = _one_line(e)
    assert msg.startswith(f"{dst / 'unet/config.json'}: U-Net addition_embed_type='text_time'")
    assert "SDXL" in msg


def test_save_refuses_existing_folder_and_replaces_with_overwrite(tmp_path):
    model = tiny_model()
    target = tmp_path / "m"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError) as e:
        save_diffusers_folder(model, target)
    assert "exists" in _one_line(e) and (target / "mine.txt").read_text() == "keep"
    save_diffusers_folder(model, target, overwrite=True)
    assert not (target / "mine.txt").exists() and (target / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folders left
    # a model diffusers cannot express fails before anything is written
    bad = tiny_model(dataclasses.replace(UNET, resblock_updown=True))
    with pytest.raises(NoisecraftError, match="resblock_updown"):
        save_diffusers_folder(bad, tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
