"""The trainer's tasks: a VAE (LDM first stage) and text-conditioned latent diffusion (second
stage) on tiny configs, captions, and the one-line errors of their configs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import tiny_config
from noisecraft.errors import CheckpointError, ConfigError, UnknownNameError
from noisecraft.io.checkpoint import CheckpointInfo, read_info, save_checkpoint
from noisecraft.io.native import load_latent_diffusion
from noisecraft.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.models.vae import AutoencoderKL, VAEConfig
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.training import captions
from noisecraft.training.config import (
    TASK_SECTIONS,
    ExperimentConfig,
    LatentConfig,
    TaskConfig,
    load_config,
)
from noisecraft.training.data import batch_indices
from noisecraft.training.tasks import TASKS
from noisecraft.training.tasks.vae import load_vae, save_vae
from noisecraft.training.trainer import Trainer

TINY_VAE = VAEConfig(
    in_channels=1,
    out_channels=1,
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    z_channels=2,
    norm_groups=4,
)
TINY_TEXT = TextEncoderConfig(width=16, layers=1, heads=2, intermediate_size=32)
TINY_LATENT_UNET = UNetConfig(
    in_channels=2,
    out_channels=2,
    model_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    num_heads=2,
    norm_groups=4,
    context_dim=16,
)


def vae_config(run_dir, **train_kw) -> ExperimentConfig:
    """sklearn digits at 8x8 -> 2 x 4 x 4 latents."""
    cfg = tiny_config(run_dir, **train_kw)
    return dataclasses.replace(
        cfg, task=TaskConfig("vae"), vae=TINY_VAE, train=dataclasses.replace(cfg.train, lr=3e-3)
    )


def text_config(run_dir, vae_path, **train_kw) -> ExperimentConfig:
    cfg = tiny_config(run_dir, **train_kw)
    return dataclasses.replace(
        cfg,
        task=TaskConfig("text_latent"),
        latent=LatentConfig(vae=str(vae_path)),
        text_encoder=TINY_TEXT,
        model=TINY_LATENT_UNET,
    )


@pytest.fixture(scope="module")
def tiny_vae_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    save_vae(AutoencoderKL(dataclasses.replace(TINY_VAE, scaling_factor=0.5)), path)
    return path


def test_vae_task_trains_and_saves_a_unit_std_scaling_factor(tmp_path):
    cfg = vae_config(tmp_path / "run", max_steps=4)
    trainer = Trainer(cfg)
    res = trainer.train()
    assert len(res.losses) == 4 and all(x > 0 for x in res.losses)
    run = tmp_path / "run"
    header = (run / "log.csv").read_text().splitlines()[0]
    assert header == "step,loss,lr,samples_per_s,elapsed_s,rec,kl"
    assert read_info(run / "model.safetensors").kind == "vae"
    vae = load_vae(run / "model.safetensors")
    for k, v in vae.state_dict().items():  # the EMA weights
        assert torch.equal(v, trainer.ema.model.vae.state_dict()[k]), k
    scale = vae.config.scaling_factor
    assert scale != TINY_VAE.scaling_factor
    # the factor is 1 / std of posterior samples of the training set (LDM's scale_by_std)
    images = trainer.dataset.images
    g = torch.Generator().manual_seed(cfg.train.seed)
    with torch.no_grad():
        z = vae.encode_latents(images, g, sample=True)
    assert z.shape == (256, 2, 4, 4)
    assert z.std().item() == pytest.approx(1.0, abs=1e-4)
    # the sample grid: originals above reconstructions
    images, nrow = trainer.task.sample_grid(trainer.ema.model)
    assert images.shape == (64, 1, 8, 8) and nrow == 8
    torch.testing.assert_close(
        images[:8], trainer.dataset.images[torch.linspace(0, 255, 32).long()[:8]]
    )


def test_vae_task_resumes_exactly(tmp_path):
    ref = Trainer(vae_config(tmp_path / "a", max_steps=4)).train().losses
    Trainer(vae_config(tmp_path / "b", max_steps=4)).train(max_steps=2)
    resumed = Trainer(vae_config(tmp_path / "b", max_steps=4))
    assert resumed.step == 2
    assert ref[:2] + resumed.train().losses == ref


def test_text_latent_resumes_exactly_and_saves_one_generating_file(tmp_path, tiny_vae_file):
    full = Trainer(text_config(tmp_path / "a", tiny_vae_file))
    ref = full.train().losses
    assert len(ref) == 6
    first = Trainer(text_config(tmp_path / "b", tiny_vae_file))
    part1 = first.train(max_steps=3).losses
    del first
    resumed = Trainer(text_config(tmp_path / "b", tiny_vae_file))
    assert resumed.step == 3
    assert part1 + resumed.train().losses == ref  # bit-identical
    for k, v in full.ema.model.state_dict().items():
        assert torch.equal(v, resumed.ema.model.state_dict()[k]), k

    # the latents are the VAE's scaled posterior modes, cached once
    task = full.task
    with torch.no_grad():
        z = load_vae(tiny_vae_file).encode_latents(full.dataset.images, sample=False)
    torch.testing.assert_close(task.latents, z)

    model = load_latent_diffusion(tmp_path / "a" / "model.safetensors")
    assert model.image_size == 8 and model.vae.config.scaling_factor == 0.5
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, full.ema.model.unet.state_dict()[k]), k
    images = generate(model, GenerateRequest(n=2, steps=2, cfg=2.0, prompts=["a handwritten 7"]))
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_text_latent_batch_has_captions_of_the_labels(tmp_path, tiny_vae_file):
    cfg = text_config(tmp_path / "run", tiny_vae_file, cond_drop_prob=0.25, batch_size=64)
    trainer = Trainer(cfg)
    task = trainer.task
    batch = task.draw(0, torch.Generator().manual_seed(1))
    assert batch["input_ids"].shape == (64, 77) and batch["z0"].shape == (64, 2, 4, 4)
    texts = task.captions_of(batch)
    labels = trainer.dataset.labels[batch_indices(len(trainer.dataset), 64, 0, cfg.train.seed)]
    table = captions.caption_table(trainer.dataset.class_names)
    dropped = 0
    for text, c in zip(texts, labels.tolist(), strict=True):
        if text == "":
            dropped += 1
        else:
            assert text in table[c], (text, c)
    assert 0 < dropped < 64


def test_captions_are_deterministic_and_cover_every_class():
    table = captions.caption_table(tuple(map(str, range(10))))
    assert len(captions.DIGIT_TEMPLATES) >= 8
    for d, row in enumerate(table):
        assert len(set(row)) == len(row) >= 8
        assert any(captions.DIGIT_WORDS[d] in c.split() for c in row)  # "seven"
        assert any(str(d) in c.split() for c in row)  # "7"
    assert "a handwritten seven" in table[7] and "the digit 7" in table[7]
    labels = torch.arange(10).repeat(50)
    a = captions.sample_captions(labels, torch.Generator().manual_seed(3), cond_drop_prob=0.1)
    b = captions.sample_captions(labels, torch.Generator().manual_seed(3), cond_drop_prob=0.1)
    c = captions.sample_captions(labels, torch.Generator().manual_seed(4), cond_drop_prob=0.1)
    assert a == b and a != c
    assert "" in a
    for d in range(10):  # every class gets captions, and several different ones
        mine = {t for t, lab in zip(a, labels.tolist(), strict=True) if lab == d and t}
        assert len(mine) >= 5 and mine <= set(table[d])
    assert captions.class_captions("cat")[0] == "a cat"


def test_unknown_task_suggests_the_closest():
    with pytest.raises(UnknownNameError, match="did you mean 'pixel'") as e:
        load_config(None, ["task.name='pixle'"])
    assert "\n" not in str(e.value)
    with pytest.raises(UnknownNameError, match="did you mean 'text_latent'"):
        load_config(None, ["task.name='text_latnet'"])
    assert set(TASKS) == set(TASK_SECTIONS)


def test_a_section_of_another_task_is_refused():
    with pytest.raises(ConfigError, match=r"\[vae\] is not used by task 'pixel'"):
        load_config(None, ["vae.base_channels=8"])
    with pytest.raises(ConfigError, match=r"\[vae\]: unknown VAE config key"):
        load_config(None, ["task.name='vae'", "vae.base_channel=8"])


def test_latent_vae_missing_or_of_another_kind_is_one_line(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="not found") as e:
        Trainer(text_config(tmp_path / "run", missing))
    assert "\n" not in str(e.value)
    unet = tmp_path / "unet.safetensors"
    save_checkpoint(unet, {"w": torch.ones(1)}, CheckpointInfo("unet", {}))
    with pytest.raises(CheckpointError, match="holds a 'unet' checkpoint, not a 'vae'") as e:
        Trainer(text_config(tmp_path / "run", unet))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="latent.vae is not set"):
        Trainer(text_config(tmp_path / "run", ""))


def test_text_latent_model_must_fit_the_vae_and_text_encoder(tmp_path, tiny_vae_file):
    cfg = text_config(tmp_path / "run", tiny_vae_file)
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, context_dim=32))
    with pytest.raises(ConfigError, match="context_dim = 32 must equal text_encoder.width = 16"):
        Trainer(bad)
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, in_channels=4))
    with pytest.raises(ConfigError, match="2 latent channels"):
        Trainer(bad)


def test_text_latent_takes_a_unet_deeper_than_its_latents_halve_evenly(tmp_path, tiny_vae_file):
    """8x8 digits -> 4x4 latents through four U-Net levels (4, 2, 1, 1): the U-Net takes any
    size, so only the VAE's factor constrains data.image_size (once "a multiple of 16")."""
    cfg = text_config(tmp_path / "run", tiny_vae_file, max_steps=1)
    deep = dataclasses.replace(cfg.model, channel_mult=(1, 2, 2, 2))
    losses = Trainer(dataclasses.replace(cfg, model=deep)).train().losses
    assert len(losses) == 1 and math.isfinite(losses[0])
    odd = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=7))
    with pytest.raises(ConfigError, match="image_size = 7 must be a multiple of 2"):
        Trainer(odd)


@pytest.mark.parametrize("name", ["mnist_vae", "mnist_text"])
def test_shipped_recipes_load_round_trip_and_fit_the_size_budget(name):
    cfg = load_config(f"configs/{name}.toml")
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.data.image_size == 32
    vae = cfg.vae if name == "mnist_vae" else load_config("configs/mnist_vae.toml").vae
    assert vae.downsample_factor == 4  # 32x32 -> 8x8 latents
    if name == "mnist_text":
        assert cfg.task.name == "text_latent"
        assert cfg.model.context_dim == cfg.text_encoder.width
        assert cfg.text_encoder.vocab_size == 49408
        params = sum(
            p.numel()
            for m in (AutoencoderKL(vae), UNet(cfg.model), CLIPTextEncoder(cfg.text_encoder))
            for p in m.parameters()
        )
        assert params * 4 <= 30e6, params  # VAE + U-Net + text encoder <= 30 MB in fp32


def test_data_pad_adds_a_background_border():
    from noisecraft.training.config import DataConfig
    from noisecraft.training.data import load_dataset

    plain = load_dataset(DataConfig(name="digits", image_size=8, limit=4))
    padded = load_dataset(DataConfig(name="digits", image_size=12, pad=2, limit=4))
    assert padded.images.shape == (4, 1, 12, 12)
    torch.testing.assert_close(padded.images[..., 2:10, 2:10], plain.images)
    assert (padded.images[..., :2, :] == -1).all() and (padded.images[..., :, -2:] == -1).all()
