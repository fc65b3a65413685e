"""The TAESD-like tiny decoder: shapes, TAESD's layout, config and checkpoint round trips, the
``tiny_decoder`` training task, its use in generate() / the CLI, and the shipped decoder's
digit accuracy on the mini Stable Diffusion."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_config
from noisecraft.api.shipped import ASSETS, resolve_model
from noisecraft.cli.main import main
from noisecraft.errors import CheckpointError, ConfigError, OutputExistsError, UnknownNameError
from noisecraft.io.checkpoint import read_info
from noisecraft.io.native import (
    load_latent_diffusion,
    load_tiny_decoder,
    save_model,
    save_tiny_decoder,
)
from noisecraft.models.tiny_decoder import TinyDecoder, TinyDecoderConfig
from noisecraft.models.vae import AutoencoderKL, VAEConfig
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.training.config import DistillConfig, LatentConfig, TaskConfig, load_config
from noisecraft.training.tasks.tiny_decoder import gradient_l1
from noisecraft.training.tasks.vae import load_latent_vae, save_vae
from noisecraft.training.trainer import Trainer
from test_latent_pipeline import tiny_model

SHIPPED = ASSETS / "mnist_text_tiny_decoder.safetensors"
TINY = TinyDecoderConfig(
    latent_channels=2, width=8, upsamplings=1, blocks_per_level=1, out_channels=1
)
#: digits at 8x8 -> 2 x 4 x 4 latents (as tests/test_tasks.py's tiny VAE)
TEACHER = VAEConfig(
    in_channels=1,
    out_channels=1,
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    z_channels=2,
    norm_groups=4,
    scaling_factor=0.5,
)


def test_shapes_range_and_taesd_layout():
    dec = TinyDecoder(TinyDecoderConfig(latent_channels=4, width=8, upsamplings=3, out_channels=3))
    out = dec.decode(10 * torch.randn(2, 4, 3, 5))
    assert out.shape == (2, 3, 24, 40)
    assert out.abs().max() <= 1
    # TAESD's SD decoder (taesd.py Decoder): ~1.2 M parameters, keys of its nn.Sequential
    sd = TinyDecoder(TinyDecoderConfig.taesd()).state_dict()
    n = sum(v.numel() for v in sd.values())
    assert 1.1e6 < n < 1.3e6, n
    for key, shape in {
        "1.weight": (64, 4, 3, 3),
        "3.conv.0.weight": (64, 64, 3, 3),
        "3.conv.4.bias": (64,),
        "7.weight": (64, 64, 3, 3),  # conv after Upsample, no bias
        "18.conv.2.weight": (64, 64, 3, 3),
        "19.weight": (3, 64, 3, 3),
    }.items():
        assert sd[key].shape == shape, key
    assert "7.bias" not in sd and len([k for k in sd if k.endswith("skip.weight")]) == 0
    with pytest.raises(ConfigError, match="latents"):
        dec.decode(torch.zeros(1, 3, 4, 4))


def test_block_is_relu_of_convs_plus_skip():
    dec = TinyDecoder(TINY)
    block = dec[3]
    x = torch.randn(1, 8, 5, 5)
    c = block.conv
    ref = torch.relu(c[4](torch.relu(c[2](torch.relu(c[0](x))))) + x)
    torch.testing.assert_close(block(x), ref)
    torch.testing.assert_close(dec[0](torch.tensor([30.0])), 3 * torch.tanh(torch.tensor([10.0])))


def test_config_round_trip_and_errors():
    cfg = TinyDecoderConfig(latent_channels=16, width=24, upsamplings=2, blocks_per_level=2)
    assert TinyDecoderConfig.from_dict(cfg.to_dict()) == cfg
    assert TinyDecoderConfig.for_factor(8) == TinyDecoderConfig(upsamplings=3)
    assert TinyDecoderConfig.for_factor(4).upsample_factor == 4
    with pytest.raises(ConfigError, match="did you mean 'width'"):
        TinyDecoderConfig.from_dict({"widht": 3})
    with pytest.raises(ConfigError, match="width"):
        TinyDecoderConfig(width=0)
    with pytest.raises(ConfigError, match="power-of-two"):
        TinyDecoderConfig.for_factor(6)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    dec = TinyDecoder(TINY).eval()
    z = torch.randn(3, 2, 4, 4)
    path = save_tiny_decoder(dec, tmp_path / "td.safetensors", training={"step": 1})
    info = read_info(path)
    assert info.kind == "tiny_decoder" and info.training == {"step": 1}
    back = load_tiny_decoder(path)
    assert back.config == TINY and not back.training
    torch.testing.assert_close(back.decode(z), dec.decode(z), rtol=0, atol=0)
    half = save_tiny_decoder(dec, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    loaded = load_tiny_decoder(half)
    assert loaded[1].weight.dtype == torch.float32
    torch.testing.assert_close(loaded.decode(z), dec.decode(z), rtol=0, atol=5e-3)
    with pytest.raises(OutputExistsError, match="pass overwrite to replace"):
        save_tiny_decoder(dec, path)
    save_vae(AutoencoderKL(TEACHER), tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="'vae' model, but a 'tiny_decoder'"):
        load_tiny_decoder(tmp_path / "vae.safetensors")


def test_gradient_loss_is_zero_for_a_shift_and_positive_for_an_edge():
    a = torch.randn(2, 1, 6, 6)
    assert gradient_l1(a, a + 0.3).abs().max() < 1e-6
    b = a.clone()
    b[..., 3:] += 1
    assert (gradient_l1(a, b) > 0).all()


# ---------------------------------------------------------------------------- the task


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "vae.safetensors"
    save_vae(AutoencoderKL(TEACHER), path)
    return path


def distill_config(run_dir, teacher, **train_kw):
    cfg = tiny_config(run_dir, **train_kw)
    return dataclasses.replace(
        cfg,
        task=TaskConfig("tiny_decoder"),
        latent=LatentConfig(vae=str(teacher)),
        tiny_decoder=TINY,
        distill=DistillConfig(gradient_weight=0.5, latent_noise=0.05),
    )


def test_task_distils_the_teacher_and_its_loss_goes_down(tmp_path, teacher_file):
    cfg = distill_config(tmp_path / "run", teacher_file, max_steps=40, lr=3e-3, warmup_steps=5)
    trainer = Trainer(cfg)
    task = trainer.task
    teacher = load_latent_vae(str(teacher_file), torch.device("cpu"), in_model=True)
    x = trainer.dataset.images[:4]
    z = teacher.encode_latents(x, sample=False)
    torch.testing.assert_close(task.latents[:4], z)
    torch.testing.assert_close(task.targets[:4], teacher.decode_latents(z))  # distillation
    losses = trainer.train().losses
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses  # measured 0.72
    saved = load_tiny_decoder(tmp_path / "run" / "model.safetensors")
    assert saved.config == TINY
    assert read_info(tmp_path / "run" / "model.safetensors").training["teacher"] == str(
        teacher_file
    )


def test_task_resumes_exactly(tmp_path, teacher_file):
    full = Trainer(distill_config(tmp_path / "a", teacher_file, max_steps=4)).train().losses
    Trainer(distill_config(tmp_path / "b", teacher_file, max_steps=4)).train(max_steps=2)
    resumed = Trainer(distill_config(tmp_path / "b", teacher_file, max_steps=4))
    assert resumed.step == 2
    assert resumed.train().losses == pytest.approx(full[2:], rel=1e-5)


def test_teacher_from_a_latent_diffusion_file_and_config_errors(tmp_path, teacher_file):
    ld = tiny_model()
    save_model(ld, tmp_path / "ld.safetensors")
    vae = load_latent_vae(str(tmp_path / "ld.safetensors"), torch.device("cpu"), in_model=True)
    for (k, v), (k2, v2) in zip(vae.state_dict().items(), ld.vae.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    base = distill_config(tmp_path / "r", teacher_file)
    with pytest.raises(ConfigError, match="latent_channels / out_channels"):
        Trainer(
            dataclasses.replace(base, tiny_decoder=dataclasses.replace(TINY, latent_channels=4))
        )
    with pytest.raises(ConfigError, match="upsamplings = 1"):
        Trainer(dataclasses.replace(base, tiny_decoder=dataclasses.replace(TINY, upsamplings=2)))
    with pytest.raises(UnknownNameError, match="distill.target 'vea'; did you mean 'vae'"):
        Trainer(dataclasses.replace(base, distill=DistillConfig(target="vea")))
    with pytest.raises(CheckpointError, match="not found"):
        Trainer(dataclasses.replace(base, latent=LatentConfig(vae=str(tmp_path / "no.st"))))
    save_tiny_decoder(TinyDecoder(TINY), tmp_path / "td.safetensors")
    with pytest.raises(CheckpointError, match="'tiny_decoder' checkpoint"):
        Trainer(
            dataclasses.replace(base, latent=LatentConfig(vae=str(tmp_path / "td.safetensors")))
        )


def test_images_target_is_the_dataset(tmp_path, teacher_file):
    cfg = distill_config(tmp_path / "run", teacher_file)
    cfg = dataclasses.replace(cfg, distill=DistillConfig(target="images"))
    trainer = Trainer(cfg)
    torch.testing.assert_close(trainer.task.targets, trainer.dataset.images)


def test_shipped_recipe_round_trips_and_fits_the_shipped_model():
    from noisecraft.training.config import ExperimentConfig

    cfg = load_config("configs/mnist_tiny_decoder.toml")
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.task.name == "tiny_decoder"
    vae = load_latent_diffusion(resolve_model("mnist-text")).vae.config
    t = cfg.tiny_decoder
    assert (
        (t.latent_channels, t.upsample_factor, t.out_channels)
        == (4, 4, 1)
        == (
            vae.z_channels,
            vae.downsample_factor,
            vae.out_channels,
        )
    )


# ---------------------------------------------------------------------------- use


SD_TINY = TinyDecoderConfig(latent_channels=4, width=8, upsamplings=3, blocks_per_level=1)


def _req(**kw):
    base = dict(n=2, prompts=["a cat"], steps=2, sampler="euler", height=48, width=64, cfg=3.0)
    return GenerateRequest(**{**base, **kw})


def test_generate_fast_decode_and_tiny_previews():
    torch.manual_seed(1)
    td = TinyDecoder(SD_TINY).eval().requires_grad_(False)
    model = tiny_model().replace(tiny_decoder=td)
    latents = generate(model, _req(), decode=False)
    fast = generate(model, _req(fast_decode=True))
    torch.testing.assert_close(fast, td.decode(latents))
    slow = generate(model, _req())
    assert fast.shape == slow.shape and not torch.allclose(fast, slow)
    previews = []
    generate(
        model,
        _req(),
        callback=lambda d: previews.append(d.get("preview")),
        preview_every=1,
        preview="tiny",
    )
    assert previews[-1].shape == (2, 3, 48, 64)
    with pytest.raises(ConfigError, match="fast_decode needs a model with a tiny decoder"):
        generate(tiny_model(), _req(fast_decode=True))
    bad = TinyDecoder(dataclasses.replace(SD_TINY, upsamplings=2))
    with pytest.raises(ConfigError, match="does not fit this VAE"):
        model.replace(tiny_decoder=bad)


def test_cli_fast_decode(tmp_path, capsys):
    torch.manual_seed(1)
    save_model(tiny_model(), tmp_path / "m.safetensors")
    save_tiny_decoder(TinyDecoder(SD_TINY), tmp_path / "td.safetensors")
    common = ["generate", "a cat", "--steps", "2", "--sampler", "euler", "--size", "64x48"]
    model = ["--model", str(tmp_path / "m.safetensors")]
    rc = main([*common, *model, "--fast-decode", "--out", str(tmp_path / "a.png")])
    assert rc == 2 and "--fast-decode needs --tiny-decoder" in capsys.readouterr().err
    td = ["--tiny-decoder", str(tmp_path / "td.safetensors")]
    rc = main([*common, *model, "--fast-decode", *td, "--out", str(tmp_path / "a.png")])
    assert rc == 0 and (tmp_path / "a.png").is_file()


# ---------------------------------------------------------------------------- shipped


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped tiny decoder")
def test_shipped_tiny_decoder_keeps_digit_accuracy():
    """tests/test_shipped_text_model.py's 100 prompts (DPM++ 2M, Karras, 20 steps, CFG 5),
    decoded by the shipped tiny decoder instead of the VAE: the MNIST classifier still reads
    the digit. Measured here: 100/100, PSNR of tiny vs VAE decode 30.5 dB; on the linspace
    grid of bench/tiny_decoder.py --quality (docs/performance.md "Tiny decoder"): 100/100
    with the VAE and with the tiny decoder, 30.4 dB (100 and 1000 images)."""
    from noisecraft.metrics.features import mnist_extractor
    from noisecraft.training.captions import DIGIT_WORDS

    model = load_latent_diffusion(resolve_model("mnist-text"))
    model = model.replace(tiny_decoder=load_tiny_decoder(SHIPPED))
    digits = [d for d in range(10) for _ in range(10)]
    prompts = [f"a handwritten {DIGIT_WORDS[d]}" for d in digits]
    req = GenerateRequest(n=100, prompts=prompts, sampler="dpmpp_2m", steps=20, cfg=5.0, seed=0)
    latents = generate(model, req, decode=False)
    images = model.tiny_decode(latents)
    predicted = mnist_extractor().logits(images[..., 2:30, 2:30]).argmax(1)
    acc = (predicted == torch.tensor(digits)).float().mean().item()
    assert acc >= 0.97, acc
    vae_images = model.decode(latents).clamp(-1, 1)
    psnr = 10 * torch.log10(4 / (images - vae_images).pow(2).mean())
    assert psnr >= 27, psnr


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped tiny decoder")
def test_cli_fast_decode_uses_the_shipped_decoder_for_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "three.png"
    rc = main(["generate", "a handwritten 3", "--steps", "4", "--fast-decode", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.is_file()
