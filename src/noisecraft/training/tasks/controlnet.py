"""A ControlNet for a frozen ("locked") text-to-image model, trained on hints of its own data.

ControlNet (Zhang, Rao & Agrawala 2023, sec. 3.2-3.3): the base model is locked; a trainable
copy of its U-Net's encoder (:meth:`noisecraft.models.controlnet.ControlNet.from_unet`: the
encoder's weights copied, the hint encoder's last conv and every zero convolution zero)
reads the noisy latents, the timestep, the prompt and a condition image, and its residuals
are added to the locked U-Net's skips and middle block. The objective is the base model's
own (eq. 5: eps MSE of the locked U-Net's prediction with the residuals added; gradients flow
through the locked U-Net into the ControlNet, whose parameters are the only ones trained).

* The hint of each training image is made ONCE by the pipeline's own preprocessor
  (``controlnet.preprocess``, :func:`noisecraft.pipelines.control_preprocess.make_hint`:
  canny edges by default), so training and ``generate(..., control=...)`` see the same hints.
* Captions as the text tasks draw them (:mod:`noisecraft.training.captions`); a share
  ``train.cond_drop_prob`` becomes the empty prompt. The paper replaces 50 % of the prompts
  with ``""`` so that the ControlNet learns to read the hint on its own (sec. 3.3).
* The text encoder is locked too: the features of every caption are computed once.
* Latents: the base's VAE, posterior mean, once.
* ``model.safetensors`` is the ControlNet as an original single file
  (:func:`noisecraft.io.controlnet_files.save_controlnet`, written atomically), which
  ``Control(model=...)`` / ``--controlnet`` load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from noisecraft.diffusion import ObjectiveConfig
from noisecraft.diffusion.timestep_sampling import make_timestep_sampler
from noisecraft.errors import ConfigError
from noisecraft.io.controlnet_files import save_controlnet
from noisecraft.io.native import load_latent_diffusion
from noisecraft.io.shipped import resolve_model
from noisecraft.models.controlnet import ControlNet
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.unet import UNet
from noisecraft.pipelines.control import ControlInput
from noisecraft.pipelines.control_preprocess import make_hint
from noisecraft.pipelines.generate import GenerateRequest, generate
from noisecraft.training import captions
from noisecraft.training.config import ExperimentConfig
from noisecraft.training.data import ImageDataset, batch_indices
from noisecraft.training.tasks.base import (
    Batch,
    CaptionedLatentLoss,
    TimestepSamplerState,
)


class ControlledUNet(nn.Module):
    """``unet(x, t, context, residuals of controlnet(x, t, context, hint))``: the trained
    ControlNet (a submodule) over a locked U-Net (not a submodule: neither trained nor saved)."""

    def __init__(self, controlnet: ControlNet, unet: UNet):
        super().__init__()
        self.controlnet = controlnet
        object.__setattr__(self, "unet", unet)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, hint: Tensor) -> Tensor:
        downs, mid = self.controlnet(x, t, context, hint)
        return self.unet(x, t, context=context, down_residuals=downs, mid_residual=mid)


def image_hints(images: Tensor, preprocess: str) -> Tensor:
    """(N, 1, H, W) bool hints of ``images`` (N, C, H, W) in [-1, 1], one by one through the
    pipeline's preprocessor (:func:`make_hint`, as ``Control(..., preprocess=...)`` makes
    them); the hints of the binary preprocessors are grey, so one channel is kept."""
    h, w = images.shape[-2:]
    out = torch.empty(len(images), 1, h, w, dtype=torch.bool)
    for i, x in enumerate(images):
        rgb = ((x.float() + 1) / 2).clamp(0, 1).expand(3, h, w)[None]
        out[i] = make_hint(rgb, h, w, preprocess_name=preprocess, resize="crop")[0, :1] > 0.5
    return out


class ControlNetTask(CaptionedLatentLoss, TimestepSamplerState):
    """Train a ControlNet for a locked text-to-image model (see the module docstring)."""

    name = "controlnet"
    resume_sections = ("controlnet",)
    log_keys: tuple[str, ...] = ()

    def __init__(self, cfg: ExperimentConfig, dataset: ImageDataset, device: torch.device):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        cc = cfg.controlnet
        if dataset.labels is None:
            raise ConfigError(
                "the controlnet task makes captions from class labels; use a labelled dataset "
                "and set data.class_conditional = true"
            )
        self.base_model: LatentDiffusion = load_latent_diffusion(resolve_model(cc.base))
        m = self.base_model
        if m.text_encoder is None:
            raise ConfigError(f"controlnet.base = {cc.base!r} has no text encoder")
        m.unet.requires_grad_(False).eval()
        m.text_encoder.requires_grad_(False).eval()
        f = m.vae.config.downsample_factor
        if 2 ** (len(cc.hint_channels) - 1) != f:
            raise ConfigError(
                f"the base model's latents are {f}x smaller than its images: give "
                f"controlnet.hint_channels {f.bit_length()} widths (one per 2x), e.g. "
                f"{[16, 32, 96, 256][: f.bit_length()]}"
            )
        if dataset.images.shape[-1] != m.image_size:
            raise ConfigError(f"data.image_size must be the base model's, {m.image_size}")
        net = ControlNet.from_unet(m.unet, hint_channels=cc.hint_channels)
        self.model = ControlledUNet(net, m.unet)
        self.schedule = m.schedule
        self.objective = ObjectiveConfig(
            prediction=m.prediction,
            weighting="min_snr" if cc.min_snr_gamma > 0 else "none",
            min_snr_gamma=cc.min_snr_gamma or 5.0,
        )
        self.t_sampler = make_timestep_sampler("uniform", len(self.schedule.betas))
        with torch.no_grad():
            vae = m.vae
            if dataset.images.shape[1] != vae.config.in_channels:
                raise ConfigError(
                    f"the base model's VAE takes {vae.config.in_channels}-channel images; "
                    f"set data.channels = {vae.config.in_channels}"
                )
            self.latents = torch.cat(
                [vae.encode_latents(b, sample=False) for b in dataset.images.split(256)]
            )
        self.hints = image_hints(dataset.images, cc.preprocess)
        self._build_captions()

    @torch.no_grad()
    def _build_captions(self) -> None:
        """Text features of every caption (row 0: the empty prompt), by the locked encoder."""
        table = captions.caption_table(self.dataset.class_names)
        texts = [captions.EMPTY] + [c for row in table for c in row]
        ids = self.base_model.tokenizer(texts, truncation=True)
        self.caption_texts = texts
        self.contexts = self.base_model.text_encoder(ids).last_hidden_state.float()
        self.caption_counts = torch.tensor([len(row) for row in table])
        self.caption_start = 1 + torch.cumsum(self.caption_counts, 0) - self.caption_counts

    def draw(self, step: int, generator: torch.Generator) -> Batch:
        """Latents, hints, caption rows, timesteps and noise of global step ``step``."""
        tc, g = self.cfg.train, generator
        idx = batch_indices(len(self.dataset), tc.batch_size, step, tc.seed)
        labels = self.dataset.labels[idx]
        choice = captions.draw_caption_choices(labels, self.caption_counts, g, tc.cond_drop_prob)
        rows = torch.where(choice < 0, 0, self.caption_start[labels] + choice)
        z0 = self.latents[idx]
        t, weights = self.t_sampler.sample(len(idx), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        return {
            "z0": z0,
            "hint": self.hints[idx].float(),
            "rows": rows,
            "t": t,
            "weights": weights,
            "noise": noise,
        }

    def model_kwargs(self, batch: Batch) -> dict:
        """The frozen captions' context and the RGB hint of each row."""
        context = self.contexts.to(batch["z0"].device)[batch["rows"]]
        return {"context": context, "hint": batch["hint"].expand(-1, 3, -1, -1)}

    # ------------------------------------------------------------------ outputs
    def save_model(self, model: nn.Module, path: Path, training: dict[str, Any]) -> None:
        save_controlnet(model.controlnet, path, overwrite=True)

    def sample_grid(self, model: nn.Module) -> tuple[Tensor, int]:
        """One row per training digit (8 rows): its hint, then 7 images from the empty prompt
        with the ControlNet (the ``[run]`` sampler, steps and CFG)."""
        rc, m = self.cfg.run, self.base_model
        rows = []
        for i in range(min(8, len(self.dataset))):
            hint = self.hints[i : i + 1].float()
            req = GenerateRequest(
                n=7,
                sampler=rc.sample_sampler,
                steps=rc.sample_steps,
                cfg=rc.sample_cfg,
                seed=i,
                controls=(ControlInput(model.controlnet, hint.expand(-1, 3, -1, -1)),),
            )
            rows += [hint * 2 - 1, generate(m, req)]
        return torch.cat(rows), 8


__all__ = ["ControlNetTask", "ControlledUNet", "image_hints"]
