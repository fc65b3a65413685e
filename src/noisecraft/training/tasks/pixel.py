"""Pixel-space diffusion (Ho et al. 2020): a U-Net denoises the images themselves.

The objective is :func:`noisecraft.diffusion.training_losses` (eps / v / x0 targets,
min-SNR weighting, improved-DDPM hybrid loss) at timesteps from the configured sampler
(uniform, or importance sampling by the loss second moment); class labels are dropped to
the null class with ``train.cond_drop_prob`` for classifier-free guidance. The saved model
is a :class:`~noisecraft.models.pixel_diffusion.PixelDiffusion` (checkpoint kind ``"unet"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from noisecraft.diffusion import training_losses
from noisecraft.diffusion.timestep_sampling import make_timestep_sampler
from noisecraft.errors import ConfigError
from noisecraft.io.native import save_model
from noisecraft.models.pixel_diffusion import PixelDiffusion
from noisecraft.models.unet import UNet
from noisecraft.pipelines.generate import GenerateRequest, generate
from noisecraft.training.config import ExperimentConfig
from noisecraft.training.data import ImageDataset, batch_indices
from noisecraft.training.tasks.base import (
    Batch,
    TaskLoss,
    TimestepSamplerState,
    build_schedule,
    draw_timesteps_and_noise,
    objective_config,
)


class PixelTask(TimestepSamplerState):
    """Train a (class-conditional) pixel-space U-Net diffusion model."""

    name = "pixel"
    resume_sections = ("model", "diffusion")
    log_keys: tuple[str, ...] = ()

    def __init__(self, cfg: ExperimentConfig, dataset: ImageDataset, device: torch.device):
        self.cfg = cfg
        self.dataset = dataset
        self.device = device
        self._check_model_vs_data()
        self.model: UNet = UNet(cfg.model)  # first draw from the seeded global RNG
        self.schedule = build_schedule(cfg)
        self.objective = objective_config(cfg)
        self.t_sampler = make_timestep_sampler(
            cfg.diffusion.timestep_sampler, cfg.diffusion.num_steps
        )

    def _check_model_vs_data(self) -> None:
        m, ds = self.cfg.model, self.dataset
        if m.in_channels != ds.images.shape[1]:
            raise ConfigError(
                f"model.in_channels = {m.in_channels} but the data has "
                f"{ds.images.shape[1]} channel(s)"
            )
        if ds.labels is not None and m.num_classes is not None and m.num_classes < ds.num_classes:
            raise ConfigError(
                f"model.num_classes = {m.num_classes} but the data has {ds.num_classes} classes"
            )
        if ds.labels is None and m.num_classes is not None:
            raise ConfigError(
                "model.num_classes is set but the data has no labels; "
                "remove model.num_classes or set data.class_conditional = true"
            )

    # ------------------------------------------------------------------ one step
    def draw(self, step: int, generator: torch.Generator) -> Batch:
        """Images, flips, dropped labels, timesteps, weights and noise of global step ``step``."""
        tc, ds, g = self.cfg.train, self.dataset, generator
        idx = batch_indices(len(ds), tc.batch_size, step, tc.seed)
        x0 = ds.images[idx]
        if self.cfg.data.flip:
            flip = torch.rand(len(idx), generator=g) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        batch: Batch = {"x0": x0}
        if ds.labels is not None and self.cfg.model.num_classes is not None:
            labels = ds.labels[idx].clone()
            drop = torch.rand(len(idx), generator=g) < tc.cond_drop_prob
            labels[drop] = self.model.null_class
            batch["class_labels"] = labels
        batch.update(
            draw_timesteps_and_noise(self.t_sampler, x0.shape, g, self.cfg.diffusion.offset_noise)
        )
        return batch

    def loss(self, net: nn.Module, batch: Batch) -> TaskLoss:
        kwargs = {"class_labels": batch["class_labels"]} if "class_labels" in batch else {}
        out = training_losses(
            net,
            self.schedule,
            batch["x0"],
            batch["t"],
            config=self.objective,
            noise=batch["noise"],
            model_kwargs=kwargs,
        )
        return TaskLoss((out["loss"] * batch["weights"]).mean(), out["loss"])

    # ------------------------------------------------------------------ outputs
    def pipeline(self, model: nn.Module) -> PixelDiffusion:
        """``model`` (the EMA U-Net) as a sampling-ready :class:`PixelDiffusion`."""
        return PixelDiffusion(
            unet=model,
            schedule=self.schedule,
            prediction=self.cfg.diffusion.prediction,
            learned_variance=self.cfg.diffusion.learned_variance,
            image_size=self.cfg.data.image_size,
        )

    def save_model(self, model: nn.Module, path: Path, training: dict[str, Any]) -> None:
        save_model(self.pipeline(model), path, training=training, overwrite=True)

    def sample_grid(self, model: nn.Module) -> tuple[Tensor, int]:
        """One row per class (up to 10 classes x 8), or 64 unconditional samples."""
        rc = self.cfg.run
        k = self.cfg.model.num_classes
        if k:
            classes = [c for c in range(min(k, 10)) for _ in range(8)]
            req = GenerateRequest(
                n=len(classes),
                sampler=rc.sample_sampler,
                steps=rc.sample_steps,
                cfg=rc.sample_cfg,
                classes=classes,
                seed=0,
            )
        else:
            req = GenerateRequest(n=64, sampler=rc.sample_sampler, steps=rc.sample_steps, seed=0)
        return generate(self.pipeline(model), req), 8
