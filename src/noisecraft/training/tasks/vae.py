"""The first stage of latent diffusion: a KL-regularised autoencoder (Rombach et al. 2022).

LDM trains in two stages (sec. 3): first an autoencoder ``D(E(x)) ~ x`` with a slight KL
penalty on its latent (appendix G), then a diffusion model on the latents ``z = E(x)``
(:mod:`noisecraft.training.tasks.text_latent`). This task is the first stage:
:class:`~noisecraft.models.vae.AutoencoderKL` (``[vae]`` = :class:`VAEConfig`) trained with
:class:`~noisecraft.training.vae_loss.VAELoss` (``[vae_loss]``: pixel L1 + ``kl_weight`` * KL;
no LPIPS, see that module). The posterior sample ``z = mean + std * eps`` takes its ``eps``
from the step's generator, so a resumed run repeats the same loss sequence.

Every time the model is saved, LDM's ``scale_by_std`` (sec. 4.3.2 / appendix G) is measured
on the training set with the EMA weights: ``scaling_factor = 1 / std(z)``
(:func:`~noisecraft.training.vae_loss.latent_scaling_factor`), and stored in the saved
config, so that :meth:`AutoencoderKL.encode_latents` gives the second stage latents of unit
variance. The saved file is a native checkpoint of kind ``"vae"`` (:func:`save_vae`,
:func:`load_vae`). The sample grid shows originals above their reconstructions.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.build import build_module
from noisecraft.io.checkpoint import CheckpointInfo, load_checkpoint, read_info, save_checkpoint
from noisecraft.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from noisecraft.training.config import ExperimentConfig
from noisecraft.training.data import ImageDataset, batch_indices
from noisecraft.training.tasks.base import Batch, TaskLoss
from noisecraft.training.vae_loss import VAELoss, latent_scaling_factor, reconstruction_loss

KIND = "vae"


# ------------------------------------------------------------------ the native VAE checkpoint


def save_vae(
    vae: AutoencoderKL,
    path: str | os.PathLike,
    *,
    training: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``vae`` (weights and :class:`VAEConfig`) as one native checkpoint of kind "vae"."""
    info = CheckpointInfo(kind=KIND, config=vae.config.to_dict(), training=training or {})
    return save_checkpoint(path, vae.state_dict(), info, overwrite=overwrite)


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Rebuild an :class:`AutoencoderKL` from a native "vae" checkpoint (eval mode, frozen)."""
    tensors, info = load_checkpoint(path, expect_kind=KIND)
    config = VAEConfig.from_dict(info.config)
    return build_module(
        lambda: AutoencoderKL(config), tensors, what="VAE", source=path, device=device
    )


LATENT_DIFFUSION_KIND = "latent_diffusion"


def load_latent_vae(
    path: str, device: str | torch.device = "cpu", *, in_model: bool = False
) -> AutoencoderKL:
    """The VAE a training config names in ``latent.vae``: a "vae" checkpoint or, with
    ``in_model``, also the VAE inside a "latent_diffusion" model file; a one-line error for
    an empty setting, a missing file or another kind of checkpoint."""
    kinds = (KIND, LATENT_DIFFUSION_KIND) if in_model else (KIND,)
    where = "the model.safetensors of a trained VAE run (noisecraft train configs/mnist_vae.toml)"
    if in_model:
        where += (
            " or a latent diffusion model file, e.g. src/noisecraft/assets/mnist_text.safetensors"
        )
    if not path:
        raise ConfigError(f"latent.vae is not set; point it at {where}")
    if not Path(path).is_file():
        raise CheckpointError(
            f"latent.vae = '{path}' not found; fix the path or train the VAE first"
        )
    kind = read_info(path).kind
    if kind not in kinds:
        raise CheckpointError(
            f"latent.vae = '{path}' holds a '{kind}' checkpoint, not a "
            + " or a ".join(f"'{k}'" for k in kinds)
            + f"; point it at {where}"
        )
    if kind == LATENT_DIFFUSION_KIND:
        from noisecraft.io.native import load_latent_diffusion

        return load_latent_diffusion(path, device).vae
    return load_vae(path, device)


# ------------------------------------------------------------------ the task


class PosteriorSampleVAE(nn.Module):
    """``AutoencoderKL`` whose forward takes the reparameterisation noise as an input.

    ``forward(x, eps) -> (D(mean + std * eps), moments)`` (Kingma & Welling 2014 eq. 10);
    with the noise an argument, DDP ranks can share the global batch's draw.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        moments = self.vae.moments(x)
        posterior = DiagonalGaussian(moments, deterministic=not self.vae.config.double_z)
        z = posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
        return self.vae.decode(z), moments


class VAETask:
    """Train an :class:`AutoencoderKL` (see the module docstring)."""

    name = "vae"
    resume_sections = ("vae", "vae_loss")
    log_keys = ("rec", "kl")  # reconstruction error per pixel, KL per image

    def __init__(self, cfg: ExperimentConfig, dataset: ImageDataset, device: torch.device):
        self.cfg = cfg
        self.dataset = dataset
        self.device = device
        if cfg.vae_loss.adversarial:
            raise ConfigError(
                "vae_loss.adversarial is not supported by the trainer yet (the PatchGAN "
                "discriminator needs its own optimizer); set vae_loss.adversarial = false"
            )
        self._check_vae_vs_data()
        self.model = PosteriorSampleVAE(AutoencoderKL(cfg.vae))
        self.vae_loss = VAELoss(cfg.vae_loss)
        f, size = cfg.vae.downsample_factor, cfg.data.image_size
        self.latent_shape = (cfg.vae.z_channels, size // f, size // f)

    def _check_vae_vs_data(self) -> None:
        v, ds = self.cfg.vae, self.dataset
        c = ds.images.shape[1]
        if v.in_channels != c or v.out_channels != c:
            raise ConfigError(
                f"vae.in_channels / out_channels = {v.in_channels} / {v.out_channels} but the "
                f"data has {c} channel(s); set both to {c}"
            )
        f, size = v.downsample_factor, ds.images.shape[-1]
        if size % f:
            raise ConfigError(
                f"data.image_size = {size} is not a multiple of {f}, the VAE's downsampling "
                f"factor (2 ** (len(vae.channel_mult) - 1)); change one of them"
            )

    # ------------------------------------------------------------------ one step
    def draw(self, step: int, generator: torch.Generator) -> Batch:
        """Images, flips and the posterior noise of global step ``step``."""
        tc, ds, g = self.cfg.train, self.dataset, generator
        idx = batch_indices(len(ds), tc.batch_size, step, tc.seed)
        x = ds.images[idx]
        if self.cfg.data.flip:
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        eps = torch.randn((len(idx), *self.latent_shape), generator=g)
        return {"x": x, "eps": eps}

    def loss(self, net: nn.Module, batch: Batch) -> TaskLoss:
        x = batch["x"]
        recon, moments = net(x, batch["eps"])
        posterior = DiagonalGaussian(moments, deterministic=not self.cfg.vae.double_z)
        out = self.vae_loss(x, recon, posterior)
        with torch.no_grad():
            rec = reconstruction_loss(x, recon.float(), self.cfg.vae_loss.reconstruction)
            rec = rec.flatten(1)
            kl = posterior.kl().float()
            per_sample = rec.sum(1) + self.cfg.vae_loss.kl_weight * kl
        return TaskLoss(out.loss, per_sample, {"rec": rec.mean(1), "kl": kl})

    def after_step(self, batch: Batch, losses: Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ outputs
    @torch.no_grad()
    def scaled_vae(self, model: nn.Module) -> AutoencoderKL:
        """A copy of ``model``'s VAE whose ``scaling_factor`` is ``1 / std`` of the data latents.

        Latents are posterior samples (as LDM's ``scale_by_std``), drawn from a generator
        seeded with ``train.seed`` so the factor is reproducible.
        """
        vae: AutoencoderKL = model.vae
        images = self.dataset.images
        bs = 256
        g = torch.Generator().manual_seed(self.cfg.train.seed)  # CPU: same on any device
        batches = (images[i : i + bs].to(self.device) for i in range(0, len(images), bs))
        was_training = vae.training
        vae.eval()
        scale = latent_scaling_factor(vae, batches, sample=True, generator=g)
        vae.train(was_training)
        out = AutoencoderKL(dataclasses.replace(vae.config, scaling_factor=scale))
        out.load_state_dict(vae.state_dict())
        return out.eval().requires_grad_(False)

    def save_model(self, model: nn.Module, path: Path, training: dict[str, Any]) -> None:
        save_vae(self.scaled_vae(model), path, training=training, overwrite=True)

    @torch.no_grad()
    def sample_grid(self, model: nn.Module) -> tuple[Tensor, int]:
        """4 pairs of rows: 8 training images above their reconstructions (posterior mode)."""
        vae: AutoencoderKL = model.vae
        n = len(self.dataset)
        idx = torch.linspace(0, n - 1, min(32, n)).long()
        x = self.dataset.images[idx].to(self.device)
        recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
        rows = []
        for i in range(0, len(idx), 8):
            rows += [x[i : i + 8], recon[i : i + 8]]
        return torch.cat(rows).cpu(), 8


__all__ = ["KIND", "PosteriorSampleVAE", "VAETask", "load_vae", "save_vae"]
