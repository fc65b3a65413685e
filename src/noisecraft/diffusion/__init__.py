"""The diffusion math: schedules, forward process, sigmas, denoisers, guidance, losses, VLB.

Imports torch only; no ``nn.Module`` models live here (DESIGN.md).
"""

from noisecraft.diffusion.denoisers import ClippedDenoiser, DiscreteDenoiser
from noisecraft.diffusion.forward import q_mean_variance, q_posterior_mean_variance, q_sample
from noisecraft.diffusion.guidance import CFGDenoiser, rescale_guidance
from noisecraft.diffusion.objectives import ObjectiveConfig, min_snr_weight, training_losses
from noisecraft.diffusion.parametrization import (
    PREDICTIONS,
    predicted_eps,
    predicted_x0,
    target_for,
)
from noisecraft.diffusion.schedule import SCHEDULES, NoiseSchedule
from noisecraft.diffusion.sigmas import SPACINGS, discrete_timesteps, make_sigmas
from noisecraft.diffusion.timestep_sampling import (
    LossSecondMomentSampler,
    UniformSampler,
    make_timestep_sampler,
)
from noisecraft.diffusion.vlb import (
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    normal_kl,
    p_mean_variance,
    vlb_terms,
)

__all__ = [
    "ClippedDenoiser",
    "PREDICTIONS",
    "SCHEDULES",
    "SPACINGS",
    "CFGDenoiser",
    "DiscreteDenoiser",
    "LossSecondMomentSampler",
    "NoiseSchedule",
    "ObjectiveConfig",
    "UniformSampler",
    "bits_per_dim",
    "discrete_timesteps",
    "discretized_gaussian_log_likelihood",
    "make_sigmas",
    "make_timestep_sampler",
    "min_snr_weight",
    "normal_kl",
    "p_mean_variance",
    "predicted_eps",
    "predicted_x0",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "rescale_guidance",
    "target_for",
    "training_losses",
    "vlb_terms",
]
