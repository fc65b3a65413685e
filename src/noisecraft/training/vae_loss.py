"""Training objective of the KL autoencoder, and the latent scale (Rombach et al. 2022 appendix G).

LDM trains its first stage with ``L = L_rec + beta * KL(q(z|x) || N(0, I)) + lambda * L_adv``
(``LPIPSWithDiscriminator`` in ``ldm/modules/losses/contperceptual.py``):

* ``L_rec``: pixel L1 (or L2) summed over pixels and averaged over the batch. LDM adds a
  perceptual LPIPS term; it is **not available here** (its VGG weights would need a download),
  so this loss is pixel-only and reconstructions are blurrier than SD's.
* ``KL``: closed form for a diagonal Gaussian posterior against the standard normal, summed
  over latent dimensions, averaged over the batch (:meth:`DiagonalGaussian.kl`); ``beta``
  (``kl_weight``) is 1e-6 as in LDM's ``kl-f8`` config: a "slight" KL penalty that keeps the
  latent near N(0, I) without forcing it there.
* ``L_adv``: optional, off by default. A PatchGAN discriminator (Isola et al. 2017; the
  ``NLayerDiscriminator`` of taming-transformers) trained with the hinge loss; the generator
  term ``-mean(D(x~))`` is weighted by ``lambda = ||grad L_rec|| / (||grad L_adv|| + 1e-4)``
  at the decoder's last layer (Esser et al. 2021 eq. 7, LDM's ``calculate_adaptive_weight``)
  times ``disc_weight``, and only switched on from step ``disc_start``.

LDM's learned output log-variance (``logvar``, initialised to 0 and nearly constant in
practice) is left out: ``L_rec`` is the plain summed error.

:func:`latent_scaling_factor` is LDM's ``scale_by_std``: 1 / std of the latents of the data,
so that the diffusion model sees latents of unit variance (sec. 4.3 / appendix G).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisecraft.errors import ConfigError, DataError
from noisecraft.models.vae import AutoencoderKL, DiagonalGaussian
from noisecraft.training.ranges import Float, Int, check_numbers

_RECONSTRUCTION = ("l1", "l2")


@dataclass(frozen=True)
class VAELossConfig:
    """Weights of :class:`VAELoss`; defaults are LDM's ``kl-f8`` (without LPIPS).

    * ``reconstruction``: ``"l1"`` (LDM) or ``"l2"``.
    * ``kl_weight``: ``beta`` on the KL term (1e-6).
    * ``adversarial``: add the PatchGAN hinge loss (default off). ``disc_start``: first step
      with the adversarial term (LDM: 50001); ``disc_weight``: multiplier of the adaptive
      weight (0.5); ``adaptive_weight``: use the gradient-norm ratio, else ``disc_weight``
      alone; ``disc_channels`` / ``disc_layers``: discriminator width / depth (64 / 3).
    """

    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    adversarial: bool = False
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    adaptive_weight: bool = True
    disc_in_channels: int = 3
    disc_channels: int = 64
    disc_layers: int = 3

    def __post_init__(self) -> None:
        if self.reconstruction not in _RECONSTRUCTION:
            raise ConfigError(
                f"unknown reconstruction loss '{self.reconstruction}'; choose one of: l1, l2"
            )
        check_numbers(
            self,
            "vae_loss",
            kl_weight=Float(0),
            disc_weight=Float(0),
            disc_factor=Float(0),
            disc_start=Int(0),
            disc_in_channels=Int(1),
            disc_channels=Int(1),
            disc_layers=Int(1),
        )


class PatchGANDiscriminator(nn.Module):
    """pix2pix's PatchGAN (Isola et al. 2017), as taming-transformers' ``NLayerDiscriminator``.

    ``layers`` stride-2 4x4 convs (channels ``ch, 2ch, 4ch, ...`` capped at ``8ch``), one
    stride-1 conv, then a 1-channel 4x4 conv: one real/fake logit per overlapping patch.
    BatchNorm after every conv but the first and the last; LeakyReLU(0.2). Weights start at
    N(0, 0.02), BatchNorm scales at N(1, 0.02) (DCGAN init). Parameter names ``main.{i}``.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            mods += [
                nn.Conv2d(
                    channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False
                ),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        mods.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def reconstruction_loss(x: Tensor, recon: Tensor, kind: str = "l1") -> Tensor:
    """Per-element ``|x - x~|`` (``"l1"``) or ``(x - x~)^2`` (``"l2"``), same shape as ``x``."""
    if kind == "l1":
        return (x - recon).abs()
    if kind == "l2":
        return (x - recon).square()
    raise ConfigError(f"unknown reconstruction loss '{kind}'; choose one of: l1, l2")


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss ``1/2 [mean relu(1 - D(x)) + mean relu(1 + D(x~))]``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(
    rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float = 1.0
) -> Tensor:
    """``disc_weight * ||grad_L rec|| / (||grad_L g|| + 1e-4)``, clamped to [0, 1e4], detached.

    ``L`` is the decoder's last layer (Esser et al. 2021 eq. 7): the adversarial gradient is
    scaled to the size of the reconstruction gradient there.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


@dataclass
class VAELossOutput:
    """Total autoencoder loss and its (detached) parts, for logging."""

    loss: Tensor
    reconstruction: Tensor
    kl: Tensor
    adversarial: Tensor
    disc_weight: Tensor


class VAELoss(nn.Module):
    """``L_rec + kl_weight * KL [+ lambda * disc_factor * L_adv]``; holds the discriminator.

    Train the autoencoder on ``loss(x, recon, posterior, global_step=..., last_layer=...)``
    and, with ``adversarial``, the discriminator (its own optimiser) on
    ``loss.discriminator_loss(x, recon, global_step=...)``. ``last_layer`` is
    :attr:`AutoencoderKL.last_layer`; without it the adversarial weight is ``disc_weight``.
    """

    def __init__(self, config: VAELossConfig | None = None):
        super().__init__()
        self.config = c = config or VAELossConfig()
        self.discriminator: PatchGANDiscriminator | None = (
            PatchGANDiscriminator(c.disc_in_channels, c.disc_channels, c.disc_layers)
            if c.adversarial
            else None
        )

    def disc_active(self, global_step: int) -> bool:
        """Whether the adversarial terms count at ``global_step`` (LDM's ``adopt_weight``)."""
        return self.discriminator is not None and global_step >= self.config.disc_start

    def forward(
        self,
        x: Tensor,
        recon: Tensor,
        posterior: DiagonalGaussian,
        *,
        global_step: int = 0,
        last_layer: Tensor | None = None,
    ) -> VAELossOutput:
        """Autoencoder (generator) loss for images ``x``, reconstructions and the posterior."""
        c = self.config
        b = x.shape[0]
        rec = reconstruction_loss(x, recon, c.reconstruction).sum() / b
        kl = posterior.kl().sum() / b
        loss = rec + c.kl_weight * kl
        zero = x.new_zeros(())
        g_loss, d_weight = zero, zero
        if self.disc_active(global_step) and c.disc_factor > 0:
            assert self.discriminator is not None
            g_loss = -self.discriminator(recon).mean()
            if c.adaptive_weight and last_layer is not None and torch.is_grad_enabled():
                d_weight = adaptive_weight(rec, g_loss, last_layer, c.disc_weight)
            else:
                d_weight = x.new_tensor(c.disc_weight)
            loss = loss + d_weight * c.disc_factor * g_loss
        return VAELossOutput(loss, rec.detach(), kl.detach(), g_loss.detach(), d_weight)

    def discriminator_loss(self, x: Tensor, recon: Tensor, *, global_step: int = 0) -> Tensor:
        """Hinge loss of the discriminator on real ``x`` and (detached) reconstructions."""
        if self.discriminator is None:
            raise ConfigError("this VAELoss has no discriminator; set adversarial=True")
        factor = self.config.disc_factor if self.disc_active(global_step) else 0.0
        real = self.discriminator(x.detach())
        fake = self.discriminator(recon.detach())
        return factor * hinge_d_loss(real, fake)


@torch.no_grad()
def latent_scaling_factor(
    vae: AutoencoderKL,
    batches: Iterable[Tensor | tuple | list],
    *,
    sample: bool = True,
    generator: torch.Generator | None = None,
) -> float:
    """``1 / std`` of the raw latents of ``batches`` (LDM's ``scale_by_std``).

    Each batch is an image tensor (B, C, H, W) in [-1, 1], or a tuple / list whose first item
    is. Latents are posterior samples (as LDM) or, with ``sample=False``, the means; the std
    (unbiased, about the mean, over every element of every batch) is accumulated in float64.
    Setting ``VAEConfig.scaling_factor`` to the result gives scaled latents of unit std.
    """
    n, total, total_sq = 0, 0.0, 0.0
    shift = vae.config.shift_factor or 0.0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        posterior = vae.encode(x)
        z = (posterior.sample(generator) if sample else posterior.mode()).double() - shift
        n += z.numel()
        total += z.sum().item()
        total_sq += z.square().sum().item()
    if n < 2:
        raise DataError("latent_scaling_factor needs at least one non-empty batch of images")
    var = (total_sq - total * total / n) / (n - 1)
    if not var > 0:
        raise DataError("the latents of these batches are constant; cannot scale them to unit std")
    return float(var**-0.5)
