"""Latent consistency distillation of a trained text-to-image model (Luo et al. 2023).

LCM (Alg. 1 of the paper, "Latent Consistency Distillation") trains a student ``f`` that maps
any point of the teacher's guided probability-flow ODE to the ODE's origin in one evaluation,
so that 1-4 steps of :func:`~noisecraft.samplers.lcm.sample_lcm` replace 20-50 solver steps:

* a training latent ``z0`` (the teacher's VAE, posterior mode, cached once) and a caption of its
  label (:mod:`noisecraft.training.captions`, never dropped) are noised to ``t_{n+k}``, a
  timestep of the ``original_steps``-point DDIM grid (``k = T // original_steps``:
  ``k - 1, 2k - 1, ..., T - 1``; the index n is uniform), ``x = sqrt(abar) z0 + sqrt(1 - abar) e``;
* the frozen teacher takes ONE DDIM step (Song et al. 2021 eq. 12, eta 0) from ``t_{n+k}`` to
  ``t_n = t_{n+k} - k`` (clamped at 0) with classifier-free guidance ``g`` (``u + g (c - u)``,
  eq. 12 of the LCM paper with ``w = g - 1``) -- the "skipping-step" ODE solver of eq. 10;
* the consistency loss compares the student at ``(x_{t_{n+k}}, t_{n+k})`` with the target
  network at ``(x_{t_n}, t_n)`` (no gradient), both in the parametrisation
  ``f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t)``
  (:func:`~noisecraft.diffusion.consistency.boundary_scalings`, timestep_scaling 10, so that
  ``f(x, 0) = x``), with the pseudo-Huber distance ``sqrt(d^2 + c^2) - c`` (``huber_c``);
* the target network is an EMA of the student (``target_decay``, 0.95 in the paper), updated
  after each optimizer step; with ``target_decay = 0`` it is the student itself (no gradient),
  as in the LCM-LoRA recipe.

The guidance scale is drawn per sample in ``[guidance_min, guidance_max]`` and baked in: the
student has no w-embedding, so it is sampled with CFG 1 (one U-Net row per step).

Every random number of step ``s`` (batch, caption choice, grid index, noise, guidance) comes
from the step's generator, and the target network is in the task's checkpoint state, so a
resumed run repeats the same losses. The student starts as a copy of the teacher's U-Net.

Outputs: ``model.safetensors``, the teacher with the student's U-Net (kind
``latent_diffusion``: samples with ``sampler="lcm", cfg=1``), and ``unet_fp16.safetensors``,
the student's U-Net alone in float16 (what ships as the LCM adapter of the mini SD).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from noisecraft.diffusion.consistency import boundary_scalings, lcm_origin_timesteps
from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.atomic import atomic_path
from noisecraft.io.checkpoint import read_info
from noisecraft.io.native import load_latent_diffusion, save_model
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.unet import UNet
from noisecraft.pipelines.generate import GenerateRequest, generate
from noisecraft.training import captions
from noisecraft.training.config import ExperimentConfig
from noisecraft.training.data import ImageDataset, batch_indices
from noisecraft.training.tasks.base import Batch, TaskLoss

STUDENT_FILE = "unet_fp16.safetensors"


class ContextUNet(nn.Module):
    """``unet(x, t, context=contexts[rows])``: a U-Net fed precomputed text features."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self.unet(x, t, context=context)


def load_teacher(path: str, device: torch.device) -> LatentDiffusion:
    """The frozen teacher: a native ``latent_diffusion`` file predicting eps."""
    if not path:
        raise ConfigError("lcm.teacher is empty; give the path of a latent_diffusion model file")
    if not Path(path).is_file():
        raise ConfigError(f"lcm.teacher {path} does not exist; give a latent_diffusion model file")
    kind = read_info(path).kind
    if kind != "latent_diffusion":
        raise CheckpointError(f"lcm.teacher {path} holds a '{kind}' model; give a latent_diffusion")
    teacher = load_latent_diffusion(path, device)
    if teacher.prediction != "eps":
        raise ConfigError(
            f"lcm.teacher predicts {teacher.prediction}; only eps teachers are distilled"
        )
    for part in (teacher.unet, teacher.vae, teacher.text_encoder):
        part.eval().requires_grad_(False)
    return teacher


def x0_from_eps(x: Tensor, eps: Tensor, abar: Tensor) -> Tensor:
    """x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) (DDPM eq. 15), ``abar`` of shape (B,)."""
    a = abar.view(-1, 1, 1, 1)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def consistency_output(x: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0 (LCM paper eq. 9)."""
    c_skip, c_out = (c.to(x.dtype).view(-1, 1, 1, 1) for c in boundary_scalings(t))
    return c_skip * x + c_out * x0


class LCMDistillTask:
    """Distil a latent consistency student (see the module docstring)."""

    name = "lcm_distill"
    resume_sections = ("lcm",)
    log_keys: tuple[str, ...] = ()

    def __init__(self, cfg: ExperimentConfig, dataset: ImageDataset, device: torch.device):
        self.cfg = cfg
        self.dataset = dataset
        self.device = device
        if dataset.labels is None:
            raise ConfigError(
                "lcm_distill makes captions from class labels; set data.class_conditional = true"
            )
        self.teacher = load_teacher(cfg.lcm.teacher, device)
        self.model = ContextUNet(copy.deepcopy(self.teacher.unet).requires_grad_(True)).train()
        self.target = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.schedule = self.teacher.schedule
        T = self.schedule.num_steps
        self.grid = lcm_origin_timesteps(T, cfg.lcm.original_steps)
        self.skip = T // cfg.lcm.original_steps
        self.abar = self.schedule.alphas_cumprod.float()
        self._build_captions()
        self.latents = self._encode(dataset.images)

    # ------------------------------------------------------------------ data
    def _build_captions(self) -> None:
        table = captions.caption_table(self.dataset.class_names)
        texts = [captions.EMPTY] + [c for row in table for c in row]
        with torch.no_grad():
            self.contexts = self.teacher.encode_prompt(texts).float().cpu()  # row 0: ""
        self.caption_counts = torch.tensor([len(row) for row in table])
        self.caption_start = 1 + torch.cumsum(self.caption_counts, 0) - self.caption_counts

    @torch.no_grad()
    def _encode(self, images: Tensor) -> Tensor:
        """The teacher VAE's scaled posterior modes of ``images`` (on the CPU)."""
        size = self.teacher.image_size
        if images.shape[-1] != size:
            raise ConfigError(
                f"data.image_size = {images.shape[-1]} but the teacher makes {size}px images; "
                f"set data.image_size = {size}"
            )
        out = []
        for i in range(0, len(images), 256):
            x = images[i : i + 256].to(self.device)
            out.append(self.teacher.vae.encode_latents(x, None, sample=False).float().cpu())
        return torch.cat(out)

    def draw(self, step: int, generator: torch.Generator) -> Batch:
        """Latents, caption rows, grid timesteps, noise and guidance of global step ``step``."""
        tc, lc, g = self.cfg.train, self.cfg.lcm, generator
        idx = batch_indices(len(self.dataset), tc.batch_size, step, tc.seed)
        labels = self.dataset.labels[idx]
        choice = captions.draw_caption_choices(labels, self.caption_counts, g)
        rows = self.caption_start[labels] + choice
        n = torch.randint(0, len(self.grid), (len(idx),), generator=g)
        z0 = self.latents[idx]
        noise = torch.randn(z0.shape, generator=g)
        u = torch.rand(len(idx), generator=g)
        guidance = lc.guidance_min + (lc.guidance_max - lc.guidance_min) * u
        return {"z0": z0, "rows": rows, "t": self.grid[n], "noise": noise, "guidance": guidance}

    # ------------------------------------------------------------------ one step
    def loss(self, net: nn.Module, batch: Batch) -> TaskLoss:
        z0, noise, t = batch["z0"], batch["noise"], batch["t"]
        dev = z0.device
        abar = self.abar.to(dev)
        t_prev = (t - self.skip).clamp(min=0)
        a_t, a_p = abar[t], abar[t_prev]
        x_t = a_t.sqrt().view(-1, 1, 1, 1) * z0 + (1 - a_t).sqrt().view(-1, 1, 1, 1) * noise
        ctx = self.contexts.to(dev)[batch["rows"]]
        student = consistency_output(x_t, x0_from_eps(x_t, net(x_t, t, ctx), a_t), t)
        with torch.no_grad():
            x_prev = self._teacher_ddim_step(x_t, t, ctx, batch["guidance"], a_t, a_p)
            eps = self.target(x_prev, t_prev, ctx)
            target = consistency_output(x_prev, x0_from_eps(x_prev, eps, a_p), t_prev)
        c = self.cfg.lcm.huber_c
        d2 = (student.float() - target.float()) ** 2
        per = ((d2 + c * c).sqrt() - c) if c > 0 else d2
        per_sample = per.flatten(1).mean(1)
        return TaskLoss(per_sample.mean(), per_sample)

    def _teacher_ddim_step(
        self, x: Tensor, t: Tensor, ctx: Tensor, g: Tensor, a_t: Tensor, a_p: Tensor
    ) -> Tensor:
        """One guided DDIM step of the teacher from ``t`` to ``t - k``."""
        uncond = self.contexts[:1].to(x.device).expand_as(ctx)
        eps_c, eps_u = self.teacher.unet(
            torch.cat([x, x]), torch.cat([t, t]), context=torch.cat([ctx, uncond])
        ).chunk(2)
        eps = eps_u + g.to(x.dtype).view(-1, 1, 1, 1) * (eps_c - eps_u)
        x0 = x0_from_eps(x, eps, a_t)
        a = a_p.view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    @torch.no_grad()
    def after_step(self, batch: Batch, losses: Tensor) -> None:
        """target <- decay * target + (1 - decay) * student (decay 0: a copy)."""
        d = self.cfg.lcm.target_decay
        for p_t, p in zip(self.target.parameters(), self.model.parameters(), strict=True):
            p_t.lerp_(p.detach(), 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "target" in state:
            self.target.load_state_dict(state["target"])

    # ------------------------------------------------------------------ outputs
    def pipeline(self, model: nn.Module) -> LatentDiffusion:
        """The teacher with ``model``'s U-Net."""
        return dataclasses.replace(self.teacher, unet=model.unet)

    def save_model(self, model: nn.Module, path: Path, training: dict[str, Any]) -> None:
        save_model(self.pipeline(model), path, training=training, overwrite=True)
        save_student(model.unet, Path(path).with_name(STUDENT_FILE), self.cfg.lcm.teacher)

    def sample_grid(self, model: nn.Module) -> tuple[Tensor, int]:
        """One row per class, 8 images each, 4 LCM steps at CFG 1."""
        names = self.dataset.class_names[:10]
        prompts = [captions.grid_prompt(n) for n in names for _ in range(8)]
        req = GenerateRequest(n=len(prompts), sampler="lcm", steps=4, cfg=1.0, prompts=prompts)
        return generate(self.pipeline(model), req), 8


def save_student(unet: nn.Module, path: Path, teacher: str) -> None:
    """The student U-Net's weights in float16 (its config is the teacher's)."""
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    with atomic_path(Path(path)) as tmp:  # as every file of a run: a kill leaves no half file
        save_file(tensors, str(tmp), metadata={"kind": "lcm_unet", "teacher": Path(teacher).name})


__all__ = ["ContextUNet", "LCMDistillTask", "STUDENT_FILE", "load_teacher", "save_student"]
