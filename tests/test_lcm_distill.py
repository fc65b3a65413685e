"""The lcm_distill task (latent consistency distillation) on a tiny random teacher: its
teacher solver against the project's DDIM sampler, the boundary condition, that the student
learns, exact resume, the saved student and the one-line errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import tiny_config
from helpers import jitter
from noisecraft.adapters.lcm_student import apply_lcm_student
from noisecraft.diffusion import NoiseSchedule
from noisecraft.diffusion.consistency import boundary_scalings
from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.checkpoint import read_info
from noisecraft.io.native import load_latent_diffusion, save_model
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.text_encoder import CLIPTextEncoder
from noisecraft.models.tokenizer import CLIPTokenizer
from noisecraft.models.unet import UNet
from noisecraft.models.vae import AutoencoderKL
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.samplers import sample_ddim
from noisecraft.training.config import LCMConfig, TaskConfig, load_config
from noisecraft.training.tasks.lcm_distill import STUDENT_FILE, consistency_output
from noisecraft.training.trainer import Trainer
from test_tasks import TINY_LATENT_UNET, TINY_TEXT, TINY_VAE


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A random 8x8 text-to-image model (2 x 4 x 4 latents), saved as a native file."""
    torch.manual_seed(0)
    model = LatentDiffusion(
        unet=jitter(UNet(TINY_LATENT_UNET), 1, freeze=False),
        vae=AutoencoderKL(dataclasses.replace(TINY_VAE, scaling_factor=0.5)),
        text_encoder=CLIPTextEncoder(TINY_TEXT),
        tokenizer=CLIPTokenizer.default(),
        schedule=NoiseSchedule.scaled_linear(),
        image_size=8,
        sample_posterior=False,
    )
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(model, path)
    return path


def lcm_config(run_dir, teacher, **train_kw):
    cfg = tiny_config(run_dir, **train_kw)
    return dataclasses.replace(
        cfg,
        task=TaskConfig("lcm_distill"),
        lcm=LCMConfig(teacher=str(teacher), guidance_min=2.0, guidance_max=4.0),
    )


def test_teacher_step_is_one_guided_ddim_step_and_t0_is_the_boundary(tmp_path, teacher_file):
    task = Trainer(lcm_config(tmp_path / "run", teacher_file)).task
    batch = task.draw(0, torch.Generator().manual_seed(1))
    z0, noise = batch["z0"], batch["noise"]
    t = torch.full((len(z0),), 519)
    g = batch["guidance"]
    ctx = task.contexts[batch["rows"]]
    a_t, a_p = task.abar[t], task.abar[t - 20]
    x = a_t.sqrt().view(-1, 1, 1, 1) * z0 + (1 - a_t).sqrt().view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        got = task._teacher_ddim_step(x, t, ctx, g, a_t, a_p)
    # the same step by sample_ddim on the guided denoiser, in the VE view x / sqrt(abar)
    sch = task.schedule
    sigmas = torch.stack([sch.sigmas[519], sch.sigmas[499], torch.tensor(0.0, dtype=torch.float64)])
    den = task.teacher.denoiser("lcm")
    uncond = task.contexts[:1].expand_as(ctx)

    def guided(x, sigma):
        c = den(x, sigma, context=ctx)
        u = den(x, sigma, context=uncond)
        return u + g.view(-1, 1, 1, 1) * (c - u)

    seen = []
    sample_ddim(guided, x / a_t.sqrt().view(-1, 1, 1, 1), sigmas.float(), callback=seen.append)
    want = seen[1]["x"] * a_p.sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
    assert (got - x).abs().max() > 1e-2  # it moved
    # f(x, 0) = x: the target of the smallest grid timestep (19 -> 0) is the teacher's point
    c_skip, c_out = boundary_scalings(torch.tensor([0, 19, 259]))
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)
    assert c_skip[1] == pytest.approx(0.25 / (190**2 + 0.25)) and c_out[2] > 1 - 1e-7
    torch.testing.assert_close(consistency_output(x, torch.zeros_like(x), torch.zeros(len(x))), x)


def test_student_learns_the_consistency_target(tmp_path, teacher_file):
    """With the target network held fixed, Adam steps on one batch lower its loss."""
    task = Trainer(lcm_config(tmp_path / "run", teacher_file)).task
    batch = task.draw(0, torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(task.model.parameters(), lr=1e-4)
    losses = []
    for _ in range(20):
        out = task.loss(task.model, batch)
        losses.append(out.loss.item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0], losses
    # the teacher and the target network did not move
    assert all(p.grad is None for p in task.teacher.unet.parameters())
    assert all(not p.requires_grad for p in task.target.parameters())


def test_resumes_exactly_and_saves_a_student_that_samples(tmp_path, teacher_file):
    full = Trainer(lcm_config(tmp_path / "a", teacher_file))
    ref = full.train().losses
    assert len(ref) == 6 and all(math.isfinite(x) for x in ref)
    first = Trainer(lcm_config(tmp_path / "b", teacher_file))
    part1 = first.train(max_steps=3).losses
    del first
    resumed = Trainer(lcm_config(tmp_path / "b", teacher_file))
    assert resumed.step == 3
    assert part1 + resumed.train().losses == ref  # bit-identical
    for k, v in full.task.target.state_dict().items():  # the target network's state resumed
        assert torch.equal(v, resumed.task.target.state_dict()[k]), k
    # the target is an EMA of the student: it moved, and not all the way
    teacher = full.task.teacher.unet.state_dict()
    target = full.task.target.unet.state_dict()
    student = full.model.unet.state_dict()
    k = next(k for k in student if not torch.equal(student[k], teacher[k]))
    assert not torch.equal(target[k], teacher[k]) and not torch.equal(target[k], student[k])

    run = tmp_path / "a"
    assert read_info(run / "model.safetensors").kind == "latent_diffusion"
    saved = load_latent_diffusion(run / "model.safetensors")
    for name, v in saved.unet.state_dict().items():
        assert torch.equal(v, full.ema.model.unet.state_dict()[name]), name
    base = load_latent_diffusion(teacher_file)
    student_model = apply_lcm_student(base, run / STUDENT_FILE)
    assert student_model.unet is not base.unet and student_model.vae is base.vae
    for name, v in student_model.unet.state_dict().items():
        torch.testing.assert_close(v, saved.unet.state_dict()[name].half().float())
    req = GenerateRequest(n=2, prompts=["a handwritten 7"], sampler="LCM", steps=2, cfg=1.0)
    images = generate(student_model, req)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    with pytest.raises(CheckpointError, match="not an LCM student") as e:
        apply_lcm_student(base, teacher_file)
    assert "\n" not in str(e.value)


def test_config_errors_are_one_line(tmp_path, teacher_file):
    for lcm, match in (
        (LCMConfig(), "lcm.teacher is empty"),
        (LCMConfig(teacher=str(tmp_path / "none.safetensors")), "does not exist"),
    ):
        cfg = dataclasses.replace(lcm_config(tmp_path / "run", teacher_file), lcm=lcm)
        with pytest.raises(ConfigError, match=match) as e:
            Trainer(cfg)
        assert "\n" not in str(e.value)
    cfg = lcm_config(tmp_path / "run", teacher_file)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=16))
    with pytest.raises(ConfigError, match="set data.image_size = 8"):
        Trainer(cfg)
    with pytest.raises(ConfigError, match="guidance_max"):
        LCMConfig(guidance_min=3.0, guidance_max=2.0)
    with pytest.raises(ConfigError, match="target_decay"):
        LCMConfig(target_decay=1.0)


def test_shipped_recipe_round_trips():
    cfg = load_config("configs/mnist_text_lcm.toml")
    assert cfg.task.name == "lcm_distill" and cfg.lcm.original_steps == 50
    assert cfg.lcm.teacher.endswith("assets/mnist_text.safetensors")
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
