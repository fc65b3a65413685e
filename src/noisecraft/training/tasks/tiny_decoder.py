"""Distil a trained VAE's decoder into a TAESD-like :class:`TinyDecoder`.

TAESD (madebyollin/taesd) is trained to reproduce the SD VAE decoder's images from its
latents, at a small fraction of its cost. This task does the same at toy scale:

* ``[latent] vae``: the teacher -- a native ``"vae"`` checkpoint, or a ``"latent_diffusion"``
  file (e.g. the shipped ``assets/mnist_text.safetensors``), whose VAE is taken. The dataset
  (``data.limit`` images) is encoded ONCE (posterior mode or one sample drawn with
  ``train.seed``, as in the ``text_latent`` task) and scaled with the teacher's
  ``scaling_factor``: the tiny decoder sees the same latents as the teacher's
  ``decode_latents`` and the diffusion model.
* ``[distill] target``: ``"vae"`` -- the teacher decoder's own images of those latents,
  computed once and cached (distillation), or ``"images"`` -- the dataset's images.
* Loss: per-pixel L1 to the target, plus ``gradient_weight`` times the L1 of the
  difference of horizontal / vertical finite differences (an edge term; no LPIPS, which would
  need pretrained network weights). ``latent_noise`` adds Gaussian noise of that std to the
  input latents (drawn from the step's generator, so a resumed run repeats the same losses).

The saved model is a native checkpoint of kind ``"tiny_decoder"``
(:func:`~noisecraft.models.tiny_decoder.save_tiny_decoder`). The sample grid shows, for 8
latents, the target above the tiny decoder's image (4 such pairs of rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from noisecraft.errors import ConfigError, unknown_name
from noisecraft.io.native import save_tiny_decoder
from noisecraft.models.tiny_decoder import TinyDecoder
from noisecraft.training.config import ExperimentConfig
from noisecraft.training.data import ImageDataset, batch_indices
from noisecraft.training.tasks.base import Batch, TaskLoss
from noisecraft.training.tasks.vae import load_latent_vae

TARGETS = ("vae", "images")
POSTERIORS = ("mode", "sample")


def gradient_l1(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample mean L1 between the horizontal and vertical finite differences of a and b."""
    dx = (a.diff(dim=-1) - b.diff(dim=-1)).abs().flatten(1).mean(1)
    dy = (a.diff(dim=-2) - b.diff(dim=-2)).abs().flatten(1).mean(1)
    return 0.5 * (dx + dy)


class TinyDecoderTask:
    """Train a :class:`TinyDecoder` on a teacher VAE's latents (see the module docstring)."""

    name = "tiny_decoder"
    resume_sections = ("latent", "tiny_decoder", "distill")
    log_keys = ("l1", "grad")

    def __init__(self, cfg: ExperimentConfig, dataset: ImageDataset, device: torch.device):
        self.cfg = cfg
        self.dataset = dataset
        self.device = device
        self._check_config()
        self.model = TinyDecoder(cfg.tiny_decoder)  # first draw from the seeded global RNG
        self.teacher = load_latent_vae(cfg.latent.vae, device, in_model=True)
        self._check_teacher()
        self.latents, self.targets = self.cache(dataset.images)

    # ------------------------------------------------------------------ checks
    def _check_config(self) -> None:
        cfg = self.cfg
        if cfg.distill.target not in TARGETS:
            raise unknown_name("distill.target", cfg.distill.target, TARGETS)
        if cfg.latent.posterior not in POSTERIORS:
            raise unknown_name("latent.posterior", cfg.latent.posterior, POSTERIORS)
        if cfg.latent.encode_batch_size < 1:
            raise ConfigError("latent.encode_batch_size must be >= 1")
        if cfg.distill.gradient_weight < 0 or cfg.distill.latent_noise < 0:
            raise ConfigError("distill.gradient_weight and distill.latent_noise must be >= 0")
        if cfg.data.flip:
            raise ConfigError(
                "the tiny_decoder task caches the latents of unflipped images; "
                "set data.flip = false"
            )

    def _check_teacher(self) -> None:
        v, t = self.teacher.config, self.cfg.tiny_decoder
        c, size = self.dataset.images.shape[1], self.dataset.images.shape[-1]
        if v.in_channels != c:
            raise ConfigError(
                f"the VAE in latent.vae takes {v.in_channels}-channel images but the data has "
                f"{c}; set data.channels = {v.in_channels}"
            )
        if size % v.downsample_factor:
            raise ConfigError(
                f"data.image_size = {size} is not a multiple of the VAE's factor "
                f"{v.downsample_factor}"
            )
        if t.latent_channels != v.z_channels or t.out_channels != v.out_channels:
            raise ConfigError(
                f"tiny_decoder.latent_channels / out_channels = {t.latent_channels} / "
                f"{t.out_channels} but the VAE has {v.z_channels} latent and {v.out_channels} "
                f"image channels; set them to {v.z_channels} / {v.out_channels}"
            )
        if t.upsample_factor != v.downsample_factor:
            raise ConfigError(
                f"tiny_decoder.upsamplings = {t.upsamplings} gives factor {t.upsample_factor} "
                f"but the VAE's factor is {v.downsample_factor}; set upsamplings = "
                f"{v.downsample_factor.bit_length() - 1}"
            )

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def cache(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled latents of ``images`` and their targets (teacher decode or the images)."""
        lc = self.cfg.latent
        sample = lc.posterior == "sample"
        g = torch.Generator().manual_seed(self.cfg.train.seed) if sample else None
        latents, targets = [], []
        for i in range(0, len(images), lc.encode_batch_size):
            x = images[i : i + lc.encode_batch_size].to(self.device)
            z = self.teacher.encode_latents(x, g, sample=sample)
            latents.append(z.float().cpu())
            if self.cfg.distill.target == "vae":
                targets.append(self.teacher.decode_latents(z).float().cpu())
        latents_t = torch.cat(latents)
        targets_t = torch.cat(targets) if targets else images.float().cpu()
        return latents_t, targets_t

    # ------------------------------------------------------------------ one step
    def draw(self, step: int, generator: torch.Generator) -> Batch:
        """Latents (with their input noise) and targets of global step ``step``."""
        tc = self.cfg.train
        idx = batch_indices(len(self.latents), tc.batch_size, step, tc.seed)
        z = self.latents[idx]
        noise = torch.randn(z.shape, generator=generator)
        return {"z": z + self.cfg.distill.latent_noise * noise, "target": self.targets[idx]}

    def loss(self, net: nn.Module, batch: Batch) -> TaskLoss:
        out = net(batch["z"])
        target = batch["target"]
        l1 = (out - target).abs().flatten(1).mean(1)
        w = self.cfg.distill.gradient_weight
        grad = gradient_l1(out, target) if w else torch.zeros_like(l1)
        per_sample = l1 + w * grad
        return TaskLoss(per_sample.mean(), per_sample, {"l1": l1, "grad": grad})

    def after_step(self, batch: Batch, losses: Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ outputs
    def save_model(self, model: nn.Module, path: Path, training: dict[str, Any]) -> None:
        training = {**training, "teacher": str(self.cfg.latent.vae)}
        save_tiny_decoder(model, path, training=training, overwrite=True)

    @torch.no_grad()
    def sample_grid(self, model: nn.Module) -> tuple[Tensor, int]:
        """4 pairs of rows: 8 targets above the tiny decoder's images of the same latents."""
        n = len(self.latents)
        idx = torch.linspace(0, n - 1, min(32, n)).long()
        was_training = model.training
        model.eval()
        out = model.decode(self.latents[idx].to(self.device)).float().cpu()
        model.train(was_training)
        target = self.targets[idx].clamp(-1, 1)
        rows = []
        for i in range(0, len(idx), 8):
            rows += [target[i : i + 8], out[i : i + 8]]
        return torch.cat(rows), 8


__all__ = ["TinyDecoderTask", "gradient_l1"]
