"""Original SD 1.x / 2.x single files: tiny random-weight models written in the CompVis /
A1111 layout, read back bit-exactly, read by diffusers' ``from_single_file`` (test-only
reference) with the same outputs, EMA selection, format detection, ``--vae`` replacement,
fp16 files and the v-prediction probe."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from helpers import jitter
from noisecraft.diffusion import NoiseSchedule
from noisecraft.errors import CheckpointError, ConfigError, OutputExistsError, UnknownNameError
from noisecraft.io.checkpoint import CheckpointInfo, save_checkpoint
from noisecraft.io.formats.single_file import (
    SingleFileInfo,
    detect_architecture,
    ema_key,
    load_single_file,
    load_vae_file,
    openclip_layout_fits,
    probe_prediction,
    save_single_file,
    split_ldm_state_dict,
)
from noisecraft.io.native import save_model
from noisecraft.io.safe_read import read_checkpoint
from noisecraft.models import LatentDiffusion
from noisecraft.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from noisecraft.models.tokenizer import CLIPTokenizer, write_vocab_files
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.models.vae import AutoencoderKL, VAEConfig
from noisecraft.pipelines import GenerateRequest, generate
from test_latent_pipeline import VAE as MINI_VAE  # the mini SD of the latent pipeline tests
from test_latent_pipeline import tiny_model

# Tiny models that follow SD's conventions (what shapes cannot tell): SD 1.x U-Nets have 8
# heads, SD 2.x 64 channels per head and linear projections; text heads are width // 64;
# GroupNorm has 32 groups. The vocabulary is CLIP's (the single file has no tokenizer).
SD1_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_levels=(0, 1),
    num_heads=8,
    norm_groups=32,
    context_dim=64,
)
SD2_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=64,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(0, 1),
    num_heads=-1,
    head_channels=64,
    norm_groups=32,
    context_dim=64,
    transformer_depth=2,
    use_linear_projection=True,
)
SD1_TEXT = TextEncoderConfig(width=64, layers=2, heads=1, intermediate_size=128)
SD2_TEXT = TextEncoderConfig(
    width=64, layers=3, heads=1, intermediate_size=256, activation="gelu", clip_skip=2
)
VAE = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
H, W = 32, 48  # latents 16 x 24 (VAE f = 2); the deepest U-Net level stays 4 x 6


def tiny(family: str, *, unet: UNetConfig | None = None, seed: int = 0, **kw) -> LatentDiffusion:
    sd2 = family == "sd2"
    unet = unet or (SD2_UNET if sd2 else SD1_UNET)
    return LatentDiffusion(
        unet=jitter(UNet(unet), seed + 1),
        vae=jitter(AutoencoderKL(VAE), seed + 2, std=0.02),
        text_encoder=jitter(CLIPTextEncoder(SD2_TEXT if sd2 else SD1_TEXT), seed + 3),
        tokenizer=CLIPTokenizer.default(pad_token_id=0 if sd2 else None),
        schedule=NoiseSchedule.scaled_linear(),
        prediction=kw.pop("prediction", "v" if sd2 else "eps"),
        **kw,
    )


@pytest.fixture(scope="module")
def models() -> dict[str, LatentDiffusion]:
    return {"sd1": tiny("sd1"), "sd2": tiny("sd2")}


@pytest.fixture(scope="module")
def files(models, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("single")
    return {k: save_single_file(m, folder / f"{k}.safetensors") for k, m in models.items()}


def _foreign(path, dst, extra: dict | None = None):
    """The same tensors without our metadata (as another tool would write them)."""
    tensors, _ = read_checkpoint(path)
    save_file({**tensors, **(extra or {})}, str(dst))
    return dst


def _outputs(model: LatentDiffusion) -> dict[str, torch.Tensor]:
    """U-Net, VAE and text-encoder outputs on fixed inputs."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn((1, 4, H // 2, W // 2), generator=g)
    ctx = model.encode_prompt(["a photo of a cat"])
    return {
        "context": ctx,
        "unet": model.unet(z, torch.tensor([321.0]), context=ctx),
        "vae": model.vae.decode(z),
    }


def _assert_same(want: LatentDiffusion, got: LatentDiffusion) -> None:
    """Bit-identical weights; outputs equal to float rounding (mmap'd tensors may take other
    kernel paths than freshly allocated ones)."""
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(want, name).state_dict(), getattr(got, name).state_dict()
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{name}.{k}"
    out_want, out_got = _outputs(want), _outputs(got)
    for k in out_want:
        torch.testing.assert_close(out_got[k], out_want[k], rtol=1e-5, atol=1e-5)


def _assert_same_file(a, b):
    ta, _ = read_checkpoint(a)
    tb, _ = read_checkpoint(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_round_trip_is_bit_exact(family, models, files, tmp_path):
    model, path = models[family], files[family]
    tensors, _ = read_checkpoint(path)
    if family == "sd1":
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in tensors
    else:  # OpenCLIP names, q/k/v packed into in_proj
        assert tensors["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape
        assert not any("text_model" in k for k in tensors)
    loaded = load_single_file(path)
    _assert_same(model, loaded)
    assert loaded.prediction == model.prediction
    again = save_single_file(loaded, tmp_path / "again.safetensors")
    _assert_same_file(path, again)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_shapes_alone_give_the_configs(family, models, files, tmp_path):
    """Without our metadata (a file from elsewhere) every config is inferred from shapes."""
    model = models[family]
    unused = {  # OpenCLIP tensors SD never uses: kept and written back
        "cond_stage_model.model.text_projection": torch.randn(64, 32),
        "cond_stage_model.model.logit_scale": torch.tensor(4.6052),
    }
    extra = unused if family == "sd2" else None
    foreign = _foreign(files[family], tmp_path / "foreign.safetensors", extra)
    detected = detect_architecture(read_checkpoint(foreign)[0])
    assert detected.family == family and not detected.inpainting and not detected.ema
    assert detected.unet == model.unet.config
    assert detected.vae == model.vae.config
    assert detected.text_encoder == model.text_encoder.config
    loaded = load_single_file(foreign, prediction=model.prediction)
    assert loaded.tokenizer.pad_token_id == (0 if family == "sd2" else 49407)
    _assert_same(model, loaded)
    _assert_same_file(foreign, save_single_file(loaded, tmp_path / "again.safetensors"))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_ckpt_loads_like_safetensors(family, models, files, tmp_path):
    tensors, _ = read_checkpoint(files[family])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 1}, ckpt)
    loaded = load_single_file(ckpt, prediction=models[family].prediction)
    _assert_same(models[family], loaded)
    _assert_same_file(files[family], save_single_file(loaded, tmp_path / "out.safetensors"))


def test_wild_sd1_keys_survive(models, files, tmp_path):
    """Schedule buffers, position_ids, EMA counters and the pre-``text_model.`` CLIP layout
    (cond_stage_model.transformer.*) come back unchanged; the file's betas give the schedule."""
    tensors, _ = read_checkpoint(files["sd1"])
    flat = {k.replace("transformer.text_model.", "transformer."): v for k, v in tensors.items()}
    betas = NoiseSchedule.scaled_linear().betas.float()
    extra = {
        "betas": betas,
        "alphas_cumprod": torch.cumprod(1 - betas, 0),
        "cond_stage_model.transformer.embeddings.position_ids": torch.arange(77)[None],
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(470000, dtype=torch.int32),
    }
    path = tmp_path / "wild.safetensors"
    save_file({**flat, **extra}, str(path))
    loaded = load_single_file(path)
    assert loaded.schedule.name == "scaled_linear"  # the stored betas are SD's
    assert isinstance(loaded.info, SingleFileInfo) and loaded.info.text_layout == "clip_flat"
    _assert_same_file(path, save_single_file(loaded, tmp_path / "out.safetensors"))
    # other betas: the file's schedule is used
    custom = tmp_path / "custom.safetensors"
    save_file({**flat, "betas": torch.linspace(1e-4, 0.02, 1000)}, str(custom))
    schedule = load_single_file(custom).schedule
    torch.testing.assert_close(schedule.betas, torch.linspace(1e-4, 0.02, 1000).double())


def test_model_off_the_sd_conventions_round_trips_through_metadata(tmp_path):
    """A mini SD trained here (4 U-Net heads, a small custom vocabulary, 8 GroupNorm groups)
    keeps its configs and tokenizer in the file's metadata; without it the shapes alone
    cannot describe it."""
    model = tiny_model()
    path = save_single_file(model, tmp_path / "mini.safetensors")
    loaded = load_single_file(path)
    assert loaded.unet.config == model.unet.config
    assert loaded.text_encoder.config == model.text_encoder.config
    assert loaded.tokenizer.vocab_size == model.tokenizer.vocab_size
    torch.testing.assert_close(loaded.encode_prompt(["the cat"]), model.encode_prompt(["the cat"]))
    with pytest.raises(CheckpointError, match="cannot infer the text encoder's heads"):
        load_single_file(_foreign(path, tmp_path / "bare.safetensors"))


def test_save_refuses_to_overwrite_and_pickles(models, files, tmp_path):
    with pytest.raises(OutputExistsError):
        save_single_file(models["sd1"], files["sd1"])
    with pytest.raises(ConfigError, match=r"\.safetensors"):
        save_single_file(models["sd1"], tmp_path / "model.ckpt")
    save_single_file(models["sd2"], files["sd1"], overwrite=True)
    assert load_single_file(files["sd1"]).text_encoder.config == SD2_TEXT
    save_single_file(models["sd1"], files["sd1"], overwrite=True)
    assert [p.name for p in files["sd1"].parent.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------- diffusers


def _diffusers_config_folder(model: LatentDiffusion, folder):
    """A diffusers pipeline folder with our tiny model's configs (weights irrelevant), for
    ``from_single_file(config=...)`` offline. SD 2.x text encoders get one layer fewer,
    as diffusers' SD 2 folders (the penultimate layer is their last)."""
    import transformers
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    u, v, t = model.unet.config, model.vae.config, model.text_encoder.config
    levels = range(len(u.channel_mult))
    channels = tuple(u.model_channels * m for m in u.channel_mult)
    attn = u.attention_levels
    unet = UNet2DConditionModel(
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        layers_per_block=u.num_res_blocks,
        block_out_channels=channels,
        down_block_types=tuple(
            "CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in levels
        ),
        up_block_types=tuple(
            "CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(levels)
        ),
        cross_attention_dim=u.context_dim,
        # SD 1.x configs give the head count here, SD 2.x one count per level
        attention_head_dim=(
            u.num_heads if u.head_channels == -1 else tuple(c // u.head_channels for c in channels)
        ),
        use_linear_projection=u.use_linear_projection,
        transformer_layers_per_block=u.transformer_depth,
        norm_num_groups=u.norm_groups,
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
    te = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.width,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.layers + 1 - t.clip_skip,
            num_attention_heads=t.heads,
            max_position_embeddings=t.max_positions,
            hidden_act=t.activation,
        )
    )
    write_vocab_files(model.tokenizer, folder / "tok")
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder / "tok"), model_max_length=77)
    sched = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        prediction_type="v_prediction" if model.prediction == "v" else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "config")
    return folder / "config"


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_from_single_file_reads_our_file(family, files, tmp_path):
    """diffusers' loader (its LDM and OpenCLIP converters) on the file we wrote gives the
    modules and, with Euler, the image we give."""
    from diffusers import StableDiffusionPipeline

    ours = load_single_file(files[family])
    config = _diffusers_config_folder(ours, tmp_path)
    pipe = StableDiffusionPipeline.from_single_file(
        str(files[family]),
        config=str(config),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    ids = ours.tokenizer(["a photo of a cat"])
    z = torch.randn((1, 4, H // 2, W // 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ctx = ours.text_encoder(ids).last_hidden_state
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, ctx)
        t = torch.tensor([654.0])
        want = pipe.unet(z, t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(ours.unet(z, t, context=ctx), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.vae.decode(z), pipe.vae.decode(z).sample, atol=1e-5, rtol=0)
        image = pipe(
            prompt="a photo of a cat",
            negative_prompt="a dog",
            num_inference_steps=4,
            guidance_scale=5.0,
            generator=[torch.Generator().manual_seed(3)],
            output_type="pt",
            height=H,
            width=W,
        ).images
    got = generate(
        ours,
        GenerateRequest(
            n=1,
            prompts=["a photo of a cat"],
            negative_prompt="a dog",
            steps=4,
            cfg=5.0,
            seeds=[3],
            sampler="euler",
            height=H,
            width=W,
        ),
    )
    got = (got / 2 + 0.5).clamp(0, 1)
    assert got.std() > 0.05  # not a flat image
    torch.testing.assert_close(got, image.float(), atol=2 / 255, rtol=0)


# ---------------------------------------------------------------------------- EMA


def test_ema_weights_are_used_when_present(models, files, tmp_path):
    tensors, _ = read_checkpoint(files["sd1"])
    ema_unet = jitter(UNet(SD1_UNET), 99)
    ema = {ema_key(k): v for k, v in ema_unet.state_dict().items()}
    assert ema_key("input_blocks.1.0.in_layers.0.weight") == (
        "model_ema.diffusion_modelinput_blocks10in_layers0weight"
    )  # LDM LitEma: the dots of "diffusion_model.<name>" removed
    counters = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    path = tmp_path / "ema.safetensors"
    save_file({**tensors, **ema, **counters}, str(path))
    assert detect_architecture(read_checkpoint(path)[0]).ema

    def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        return all(
            torch.equal(x, y)
            for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        )

    default = load_single_file(path)
    assert same(default.unet, ema_unet) and "EMA" in default.info.description
    assert same(load_single_file(path, ema=True).unet, ema_unet)
    raw = load_single_file(path, ema=False)
    assert same(raw.unet, models["sd1"].unet)
    # written back: the weights that were used, no EMA copies, counters kept (A1111 "emaonly")
    out, _ = read_checkpoint(save_single_file(default, tmp_path / "out.safetensors"))
    assert not any(k.startswith("model_ema.diffusion") for k in out)
    assert {"model_ema.decay", "model_ema.num_updates"} <= set(out)
    assert torch.equal(out["model.diffusion_model.out.2.weight"], ema_unet.out[2].weight)
    with pytest.raises(CheckpointError, match="has no EMA weights"):
        load_single_file(files["sd1"], ema=True)
    partial = tmp_path / "partial.safetensors"
    save_file({**tensors, **dict(list(ema.items())[:5])}, str(partial))
    with pytest.raises(CheckpointError, match="incomplete EMA weights.*ema=False"):
        load_single_file(partial)
    assert same(load_single_file(partial, ema=False).unet, models["sd1"].unet)


# ---------------------------------------------------------------------------- detection


def _t(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


OTHER_KINDS = {
    "sdxl": (
        {
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": _t(4),
            "model.diffusion_model.label_emb.0.0.weight": _t(8, 2816),
        },
        "looks like an SDXL checkpoint; SDXL is not supported yet",
    ),
    "sd3": (
        {"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": _t(6, 2)},
        "Stable Diffusion 3",
    ),
    "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": _t(4)}, "Flux"),
    "lora_kohya": (
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": _t(4, 8),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": _t(),
        },
        "is a LoRA, not a model; pass it as lora",
    ),
    "lora_peft": ({"unet.down_blocks.0.to_q.lora_A.weight": _t(4, 8)}, "is a LoRA"),
    "vae": (
        {
            "encoder.conv_in.weight": _t(8, 3, 3, 3),
            "decoder.conv_in.weight": _t(8, 4, 3, 3),
            "quant_conv.weight": _t(8, 8, 1, 1),
        },
        "is a VAE, not a whole model; pass it as vae",
    ),
    "vae_diffusers": (
        {"encoder.down_blocks.0.resnets.0.conv1.weight": _t(2), "decoder.conv_in.weight": _t(2)},
        "is a VAE",
    ),
    "text_encoder": (
        {"cond_stage_model.transformer.text_model.final_layer_norm.weight": _t(4)},
        "is a text encoder only",
    ),
    "controlnet": ({"control_model.input_hint_block.0.weight": _t(2)}, "is a ControlNet"),
    "unknown": ({"foo.weight": _t(2), "bar.bias": _t(2)}, "found keys like bar.bias, foo.weight"),
}


@pytest.mark.parametrize("kind", list(OTHER_KINDS))
def test_other_kinds_are_named(kind, tmp_path):
    tensors, expect = OTHER_KINDS[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as info:
        load_single_file(path)
    message = str(info.value)
    assert expect in message and str(path) in message and "\n" not in message


def test_missing_parts_and_unsupported_unets(files, tmp_path):
    tensors, _ = read_checkpoint(files["sd1"])
    no_text = {k: v for k, v in tensors.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(CheckpointError, match="no text encoder"):
        detect_architecture(no_text, "x")
    pix2pix = dict(tensors)
    w = tensors["model.diffusion_model.input_blocks.0.0.weight"]
    pix2pix["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, w], dim=1)
    with pytest.raises(CheckpointError, match="8 input channels is not supported"):
        detect_architecture(pix2pix, "x")


def test_inpainting_unet_is_detected(tmp_path):
    model = tiny("sd1", unet=dataclasses.replace(SD1_UNET, in_channels=9))
    path = save_single_file(model, tmp_path / "inpaint.safetensors")
    foreign = _foreign(path, tmp_path / "foreign.safetensors")
    detected = detect_architecture(read_checkpoint(foreign)[0])
    assert detected.inpainting and "inpainting" in detected.description
    loaded = load_single_file(foreign)
    assert loaded.inpaint_unet and loaded.unet.config == model.unet.config


# ---------------------------------------------------------------------------- VAE, fp16


def test_vae_file_replaces_the_checkpoints(files, tmp_path):
    other = jitter(AutoencoderKL(VAE), 42, std=0.02)
    ldm = tmp_path / "vae-ft.safetensors"  # bare LDM names, as A1111's VAE files
    save_file({**other.state_dict(), "model_ema.decay": torch.tensor(1.0)}, str(ldm))
    diffusers_named = tmp_path / "vae.ckpt"
    torch.save({"state_dict": other.to_diffusers_state_dict()}, diffusers_named)
    tensors, _ = read_checkpoint(files["sd1"])
    no_vae = tmp_path / "no_vae.safetensors"
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")}, str(no_vae)
    )
    with pytest.raises(CheckpointError, match="has no VAE.*pass a VAE file as vae"):
        load_single_file(no_vae)
    for main in (files["sd1"], no_vae):
        for vae in (ldm, diffusers_named):
            model = load_single_file(main, vae=vae)
            for k, v in other.state_dict().items():
                assert torch.equal(model.vae.state_dict()[k], v), k
            assert "VAE from" in model.info.description
    with pytest.raises(CheckpointError, match="is not a VAE"):
        load_single_file(files["sd1"], vae=no_vae)


def test_vae_file_in_noisecraft_formats_keeps_its_config(tmp_path):
    """A native VAE (4 GroupNorm groups: off SD's conventions) or the VAE inside a native
    latent_diffusion file comes with its stored config, not an inferred one."""
    vae = jitter(AutoencoderKL(MINI_VAE), 5)
    native = tmp_path / "vae.safetensors"
    save_checkpoint(native, vae.state_dict(), CheckpointInfo(kind="vae", config=MINI_VAE.to_dict()))
    whole = tmp_path / "mini.safetensors"
    mini = tiny_model()
    save_model(mini, whole)
    for path, want in ((native, vae), (whole, mini.vae)):
        got = load_vae_file(path)
        assert got.config == want.config
        for k, v in want.state_dict().items():
            assert torch.equal(got.state_dict()[k], v), k
    assert load_vae_file(native, scaling_factor=0.5).config.scaling_factor == 0.5


def test_fp16_file_computes_in_fp32_and_writes_back_fp16(models, tmp_path):
    half = save_single_file(models["sd2"], tmp_path / "half.safetensors", dtype=torch.float16)
    tensors, _ = read_checkpoint(half)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    loaded = load_single_file(half)
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float32}
    for k, v in models["sd2"].unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v.half().float()), k
    want, got = _outputs(models["sd2"]), _outputs(loaded)
    torch.testing.assert_close(got["context"], want["context"], atol=2e-2, rtol=0)
    _assert_same_file(half, save_single_file(loaded, tmp_path / "again.safetensors"))


# ---------------------------------------------------------------------------- prediction

PROBE_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=64,
    channel_mult=(1,),
    num_res_blocks=1,
    attention_levels=(0,),
    num_heads=-1,
    head_channels=64,
    norm_groups=32,
    context_dim=64,
    use_linear_projection=True,
)


def _train_high_noise(prediction: str, seed: int = 0, steps: int = 20) -> UNet:
    """A U-Net trained for ``steps`` Adam steps on t in [900, 999] with eps or v targets on
    data N(0.8, 0.5^2): enough for it to learn what it outputs at high noise."""
    torch.manual_seed(seed)
    unet = jitter(UNet(PROBE_UNET), seed).train().requires_grad_(True)
    abar = NoiseSchedule.scaled_linear().alphas_cumprod.float()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(unet.parameters(), lr=5e-3)
    ctx = torch.zeros(8, 77, 64)
    for _ in range(steps):
        x0 = 0.8 + 0.5 * torch.randn((8, 4, 4, 4), generator=g)
        eps = torch.randn((8, 4, 4, 4), generator=g)
        t = torch.randint(900, 1000, (8,), generator=g)
        a, b = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        target = eps if prediction == "eps" else a * eps - b * x0
        loss = (unet(a * x0 + b * eps, t.float(), context=ctx) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval().requires_grad_(False)


def test_sd2_prediction_is_probed_from_the_unet(tmp_path):
    """eps and v U-Nets trained briefly at high noise: the probe's slope is ~1 for eps and
    ~0 for v (for v, the output is ~ -x0's mean, far from 0 but uncorrelated with x_t)."""
    found = {}
    for prediction in ("eps", "v"):
        model = tiny("sd2", unet=PROBE_UNET, prediction=prediction)
        model = model.replace(unet=_train_high_noise(prediction))
        label, slope = probe_prediction(model.unet, model.encode_prompt([""]))
        found[prediction] = slope
        assert label == prediction
        path = tmp_path / f"{prediction}.ckpt"  # no metadata: the loader must probe
        tensors, _ = read_checkpoint(
            save_single_file(model, tmp_path / f"{prediction}.safetensors")
        )
        torch.save({"state_dict": tensors}, path)
        loaded = load_single_file(path)
        assert loaded.prediction == prediction and "U-Net probe" in loaded.info.description
        assert loaded.image_size == (768 if prediction == "v" else 512)
        assert load_single_file(path, prediction="eps").prediction == "eps"  # override wins
    assert found["eps"] > 0.7 and abs(found["v"]) < 0.2


def test_prediction_hints_and_sd1_default(files, tmp_path):
    foreign = _foreign(files["sd1"], tmp_path / "sd1.safetensors")
    assert load_single_file(foreign).prediction == "eps"
    marked = _foreign(files["sd1"], tmp_path / "vpred.safetensors", {"v_pred": torch.zeros(0)})
    assert load_single_file(marked).prediction == "v"
    with pytest.raises(ConfigError, match="'eps' or 'v'"):
        load_single_file(foreign, prediction="x0")


def test_split_is_the_inverse_of_the_layout(files):
    tensors, _ = read_checkpoint(files["sd2"])
    parts = split_ldm_state_dict(tensors)
    assert parts.text_layout == "open_clip" and not parts.ema and not parts.extras
    w = tensors["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    q, k, v = (parts.text_encoder[f"encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(torch.cat([q, k, v]), w) and q.shape == (64, 64)
    assert q.data_ptr() == w.data_ptr()  # a view: no copy of the weights


# ---------------------------------------------------------------------------- real sizes

SD15_UNET = UNetConfig.sd15()
SD21_UNET = UNetConfig.sd2()


def _meta_ldm(unet: UNetConfig, text: TextEncoderConfig, open_clip: bool) -> dict:
    """A full-size SD state dict of shapes only (meta device): no memory, no weights."""
    from noisecraft.io.formats.single_file import _native_to_openclip

    with torch.device("meta"):
        parts = (UNet(unet), AutoencoderKL(VAEConfig.sd()), CLIPTextEncoder(text))
    sd = {f"model.diffusion_model.{k}": v for k, v in parts[0].state_dict().items()}
    sd |= {f"first_stage_model.{k}": v for k, v in parts[1].state_dict().items()}
    te = parts[2].state_dict()
    if open_clip:
        sd |= {f"cond_stage_model.model.{k}": v for k, v in _native_to_openclip(te).items()}
        sd["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024, device="meta")
    else:
        sd |= {f"cond_stage_model.transformer.text_model.{k}": v for k, v in te.items()}
    return sd


@pytest.mark.parametrize(
    ("unet", "text", "open_clip", "family"),
    [
        (SD15_UNET, TextEncoderConfig.sd15(), False, "sd1"),
        (SD21_UNET, TextEncoderConfig.sd2(), True, "sd2"),  # 24 layers, penultimate
        (SD21_UNET, TextEncoderConfig.sd2(layers=23, clip_skip=1), True, "sd2"),  # diffusers'
        (dataclasses.replace(SD15_UNET, in_channels=9), TextEncoderConfig.sd15(), False, "sd1"),
    ],
    ids=["sd15", "sd21", "sd21-23-layers", "sd15-inpainting"],
)
def test_full_size_configs_are_inferred(unet, text, open_clip, family):
    """SD 1.5 / 2.1 sizes (CompVis v1-inference.yaml / v2-inference-v.yaml) from shapes."""
    detected = detect_architecture(_meta_ldm(unet, text, open_clip), "sd.safetensors")
    assert detected.family == family
    assert detected.unet == unet and detected.text_encoder == text
    assert detected.vae == VAEConfig.sd()
    assert detected.inpainting == (unet.in_channels == 9)
    assert openclip_layout_fits(text) == open_clip  # save_single_file writes the same layout
    name = "SD 2.x" if family == "sd2" else "SD 1.x"
    assert detected.description.startswith(name) and "context" in detected.description


def test_family_override_sets_what_shapes_cannot_show(tmp_path):
    """Heads per layer and the text activation are SD conventions, not shapes: a foreign file
    of an SD 1.x-style model read as "sd2" gets 64-channel heads and GELU (another model),
    read as detected (or as "sd1") it is the original."""
    unet = dataclasses.replace(SD1_UNET, model_channels=64, channel_mult=(1, 2))
    model = tiny("sd1", unet=unet)
    foreign = _foreign(
        save_single_file(model, tmp_path / "m.safetensors"), tmp_path / "f.safetensors"
    )
    as_sd1 = load_single_file(foreign)
    assert load_single_file(foreign, family="sd1").unet.config == as_sd1.unet.config
    _assert_same(model, as_sd1)
    as_sd2 = load_single_file(foreign, family="sd2")
    assert as_sd2.unet.config.head_channels == 64 and as_sd1.unet.config.num_heads == 8
    assert as_sd2.text_encoder.config.activation == "gelu"
    want, got = _outputs(as_sd1), _outputs(as_sd2)
    assert not torch.allclose(want["unet"], got["unet"], atol=1e-4)
    with pytest.raises(UnknownNameError, match="sd1, sd2"):
        load_single_file(foreign, family="sdxl")
