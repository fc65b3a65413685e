"""The improved-DDPM figure: alpha-bar and log-SNR of the linear and cosine schedules."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from noisecraft.diffusion import NoiseSchedule
from noisecraft.io.atomic import atomic_path, check_writable
from noisecraft.io.write_errors import writing


def plot_schedules(
    path: str | os.PathLike,
    schedules: dict[str, NoiseSchedule] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Plot beta_t, alpha-bar_t and log SNR(t) = log(abar / (1 - abar)) for each schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = check_writable(path, overwrite=overwrite)
    schedules = schedules or {
        "linear": NoiseSchedule.linear(),
        "cosine": NoiseSchedule.cosine(),
        "scaled_linear (SD)": NoiseSchedule.scaled_linear(),
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, s in schedules.items():
        t = torch.arange(s.num_steps) / max(s.num_steps - 1, 1)
        abar = s.alphas_cumprod
        axes[0].plot(t, s.betas, label=name)
        axes[1].plot(t, abar, label=name)
        axes[2].plot(t, torch.log(abar / (1 - abar)), label=name)
    for ax, title in zip(
        axes,
        [r"$\beta_t$", r"$\bar\alpha_t$", r"log SNR = $\log \bar\alpha_t/(1-\bar\alpha_t)$"],
        strict=True,
    ):
        ax.set_title(title)
        ax.set_xlabel("t / T")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend()
    fig.tight_layout()
    with writing(path), atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return path
