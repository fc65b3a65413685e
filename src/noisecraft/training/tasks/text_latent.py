"""The second stage of latent diffusion: a text-conditioned U-Net on VAE latents.

Rombach et al. 2022 (LDM) train the diffusion model on the latents ``z = E(x)`` of a frozen,
already trained autoencoder (sec. 3: "two-stage" training), scaled to unit variance by the
factor the first stage measured (``scale_by_std``, sec. 4.3.2 / appendix G), and condition it
on text through cross-attention to a transformer's token features, trained jointly with the
U-Net (sec. 3.3, the LDM text-to-image model of sec. 4.3.1). This task is that recipe at toy
scale -- a mini Stable Diffusion for captioned MNIST:

* ``[latent] vae``: a checkpoint written by the ``vae`` task. The whole dataset is encoded
  ONCE (posterior mode, or one posterior sample drawn with ``train.seed``), scaled with the
  stored factor and cached in memory; a training step only indexes the cache.
* ``[text_encoder]``: a small :class:`~noisecraft.models.text_encoder.CLIPTextEncoder` over
  the full CLIP vocabulary of :meth:`CLIPTokenizer.default` (49,408 tokens, so any prompt
  tokenizes; keep ``width`` small: the token table alone is ``49408 * width`` weights),
  trained from scratch together with the U-Net (``[model]`` with ``context_dim`` = its width).
* Captions (:mod:`noisecraft.training.captions`): one template per image drawn from the step's
  generator, dropped to ``""`` with ``train.cond_drop_prob`` for classifier-free guidance.
* Loss: the project's diffusion objective (:func:`noisecraft.diffusion.training_losses`,
  ``[diffusion]``) on the latents with the text ``context``.

The saved model is one :class:`~noisecraft.models.latent_diffusion.LatentDiffusion` file (kind
``"latent_diffusion"``: U-Net, VAE, text encoder, tokenizer, schedule), so one file generates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from noisecraft.diffusion.timestep_sampling import make_timestep_sampler
from noisecraft.errors import ConfigError, unknown_name
from noisecraft.io.native import save_model
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.text_encoder import CLIPTextEncoder
from noisecraft.models.tokenizer import CLIPTokenizer
from noisecraft.models.unet import UNet
from noisecraft.pipelines.generate import generate
from noisecraft.training import captions
from noisecraft.training.config import ExperimentConfig
from noisecraft.training.data import ImageDataset, batch_indices
from noisecraft.training.tasks.base import (
    Batch,
    CaptionedLatentLoss,
    TimestepSamplerState,
    build_schedule,
    draw_timesteps_and_noise,
    grid_request,
    objective_config,
)
from noisecraft.training.tasks.vae import load_latent_vae

POSTERIORS = ("mode", "sample")


class TextConditionedUNet(nn.Module):
    """The jointly trained pair: ``unet(x, t, context=text_encoder(input_ids))``.

    Each distinct caption of the batch is encoded once (``torch.unique`` over the token
    rows, then gathered back), which gives the same values and gradients as encoding every
    row.
    """

    def __init__(self, unet: UNet, text_encoder: CLIPTextEncoder):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x: Tensor, t: Tensor, input_ids: Tensor) -> Tensor:
        unique, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
        context = self.text_encoder(unique).last_hidden_state[inverse]
        return self.unet(x, t, context=context)


class TextLatentTask(CaptionedLatentLoss, TimestepSamplerState):
    """Train a text-to-image latent diffusion model (see the module docstring)."""

    name = "text_latent"
    resume_sections = ("latent", "text_encoder", "model", "diffusion")
    log_keys: tuple[str, ...] = ()

    def __init__(self, cfg: ExperimentConfig, dataset: ImageDataset, device: torch.device):
        self.cfg = cfg
        self.dataset = dataset
        self.device = device
        self.tokenizer = CLIPTokenizer.default()
        self._check_config()
        # the trained models first: their init is the first draw from the seeded global RNG
        self.model = TextConditionedUNet(UNet(cfg.model), CLIPTextEncoder(cfg.text_encoder))
        self.vae = load_latent_vae(cfg.latent.vae, device)
        self._check_vae()
        self.schedule = build_schedule(cfg)
        self.objective = objective_config(cfg)
        self.t_sampler = make_timestep_sampler(
            cfg.diffusion.timestep_sampler, cfg.diffusion.num_steps
        )
        self._build_captions()
        self.latents = self.encode(dataset.images)
        self.flipped_latents = self.encode(dataset.images.flip(-1)) if cfg.data.flip else None

    # ------------------------------------------------------------------ checks
    def _check_config(self) -> None:
        cfg, ds = self.cfg, self.dataset
        m, te = cfg.model, cfg.text_encoder
        if ds.labels is None:
            raise ConfigError(
                "the text_latent task makes captions from class labels; use a labelled dataset "
                "and set data.class_conditional = true"
            )
        if cfg.latent.posterior not in POSTERIORS:
            raise unknown_name("latent.posterior", cfg.latent.posterior, POSTERIORS)
        if cfg.latent.encode_batch_size < 1:
            raise ConfigError("latent.encode_batch_size must be >= 1")
        if m.context_dim != te.width:
            raise ConfigError(
                f"model.context_dim = {m.context_dim} must equal text_encoder.width = "
                f"{te.width} (the U-Net cross-attends to the text encoder's features)"
            )
        if m.num_classes is not None:
            raise ConfigError(
                "model.num_classes must be unset for text_latent: the prompt is the condition"
            )
        if m.learn_sigma or cfg.diffusion.learned_variance:
            raise ConfigError(
                "text_latent does not train a learned variance (the latent pipeline samples "
                "without one); set model.learn_sigma and diffusion.learned_variance = false"
            )
        vocab = len(self.tokenizer.vocab)
        if te.vocab_size < vocab:
            raise ConfigError(
                f"text_encoder.vocab_size = {te.vocab_size} is smaller than the CLIP "
                f"tokenizer's {vocab} tokens; set it to {vocab}"
            )
        if te.max_positions < self.tokenizer.context_length:
            raise ConfigError(
                f"text_encoder.max_positions = {te.max_positions} must be at least the "
                f"tokenizer's context length {self.tokenizer.context_length}"
            )

    def _check_vae(self) -> None:
        v, m, ds = self.vae.config, self.cfg.model, self.dataset
        c, size = ds.images.shape[1], ds.images.shape[-1]
        if v.in_channels != c:
            raise ConfigError(
                f"the VAE in latent.vae takes {v.in_channels}-channel images but the data has "
                f"{c}; set data.channels = {v.in_channels}"
            )
        f = v.downsample_factor
        if size % f:
            raise ConfigError(
                f"data.image_size = {size} must be a multiple of {f}, the VAE's downsampling factor"
            )
        if m.in_channels != v.z_channels or m.out_channels != v.z_channels:
            raise ConfigError(
                f"model.in_channels / out_channels = {m.in_channels} / {m.out_channels} but "
                f"the VAE has {v.z_channels} latent channels; set both to {v.z_channels}"
            )

    # ------------------------------------------------------------------ data
    def _build_captions(self) -> None:
        """Token ids of every caption (row 0: the empty prompt) and each class's first row."""
        table = captions.caption_table(self.dataset.class_names)
        texts = [captions.EMPTY] + [c for row in table for c in row]
        self.caption_ids = self.tokenizer(texts, truncation=True)  # (1 + sum(counts), 77)
        self.caption_counts = torch.tensor([len(row) for row in table])
        starts = 1 + torch.cumsum(self.caption_counts, 0) - self.caption_counts
        self.caption_start = starts

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Scaled latents of ``images`` (on the CPU): posterior mode or one sample each."""
        lc = self.cfg.latent
        sample = lc.posterior == "sample"
        g = torch.Generator().manual_seed(self.cfg.train.seed) if sample else None
        out = []
        for i in range(0, len(images), lc.encode_batch_size):
            x = images[i : i + lc.encode_batch_size].to(self.device)
            out.append(self.vae.encode_latents(x, g, sample=sample).float().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ one step
    def draw(self, step: int, generator: torch.Generator) -> Batch:
        """Latents, flips, captions, timesteps, weights and noise of global step ``step``."""
        tc, ds, g = self.cfg.train, self.dataset, generator
        idx = batch_indices(len(ds), tc.batch_size, step, tc.seed)
        z0 = self.latents[idx]
        if self.flipped_latents is not None:
            flip = torch.rand(len(idx), generator=g) < 0.5
            z0 = torch.where(flip[:, None, None, None], self.flipped_latents[idx], z0)
        labels = ds.labels[idx]
        choice = captions.draw_caption_choices(labels, self.caption_counts, g, tc.cond_drop_prob)
        rows = torch.where(choice < 0, 0, self.caption_start[labels] + choice)
        batch: Batch = {"z0": z0, "input_ids": self.caption_ids[rows]}
        batch.update(
            draw_timesteps_and_noise(self.t_sampler, z0.shape, g, self.cfg.diffusion.offset_noise)
        )
        return batch

    def captions_of(self, batch: Batch) -> list[str]:
        """The caption text of each row of a batch (for inspection and tests)."""
        return [self.tokenizer.decode(ids) for ids in batch["input_ids"]]

    # ------------------------------------------------------------------ outputs
    def pipeline(self, model: nn.Module) -> LatentDiffusion:
        """``model`` (the EMA pair) with the VAE and tokenizer as a :class:`LatentDiffusion`."""
        return LatentDiffusion(
            unet=model.unet,
            vae=self.vae,
            text_encoder=model.text_encoder,
            tokenizer=self.tokenizer,
            schedule=self.schedule,
            prediction=self.cfg.diffusion.prediction,
            image_size=self.cfg.data.image_size,
            sample_posterior=self.cfg.latent.posterior == "sample",
        )

    def save_model(self, model: nn.Module, path: Path, training: dict[str, Any]) -> None:
        save_model(self.pipeline(model), path, training=training, overwrite=True)

    def sample_grid(self, model: nn.Module) -> tuple[Tensor, int]:
        """One row per class (up to 10), 8 images each, prompted with the class's first caption."""
        names = self.dataset.class_names[:10]
        prompts = [captions.grid_prompt(n) for n in names for _ in range(8)]
        req = grid_request(self.cfg, prompts)
        return generate(self.pipeline(model), req), 8


__all__ = ["TextConditionedUNet", "TextLatentTask"]
