"""The variational bound term by term (improved DDPM figure 2): L_t in bits/dim vs t, log y.

L = L_T + sum_{t>=1} L_{t-1} + L_0 (DDPM eq. 5). Index t is 0-based as in
:mod:`noisecraft.diffusion.vlb`: the term at t = 0 is the decoder NLL -log p(x0 | x_1),
the term at t >= 1 the KL of the step t -> t-1, and the prior L_T is separate.
When only some t are evaluated, the others are estimated by interpolation (see
:func:`estimate_total`) and the figure and CSV say which t were evaluated.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from noisecraft.errors import ConfigError
from noisecraft.io.atomic import atomic_path, check_writable
from noisecraft.io.write_errors import writing


@dataclass(frozen=True, eq=False)
class VLBCurve:
    """Mean (and spread) over ``n`` images of the bound's terms at the evaluated timesteps."""

    timesteps: tuple[int, ...]  # evaluated t, increasing, 0-based
    terms: np.ndarray  # (K,) mean bits/dim of the term at each evaluated t
    std: np.ndarray  # (K,) standard deviation over images
    prior: float  # L_T = KL(q(x_T | x0) || N(0, I)), bits/dim
    num_steps: int  # T
    n: int  # images averaged
    abar: np.ndarray | None = None  # (K,) alpha-bar at the evaluated t, for the CSV

    @property
    def exact(self) -> bool:
        """True when every t in 0 .. T-1 was evaluated, so :meth:`total` is the bound itself."""
        return len(set(self.timesteps)) == self.num_steps

    def total(self) -> float:
        """The bound in bits/dim, exact or estimated by :func:`estimate_total`."""
        return estimate_total(self.timesteps, self.terms, self.prior, self.num_steps)


def vlb_timesteps(num_steps: int, k: int) -> list[int]:
    """``k`` timesteps for the bound: t = 0 (the decoder) and ``k - 1`` evenly spaced from 1 to
    T-1 inclusive, so the large KL terms next to t = 1 are measured, not extrapolated.

    All T when ``k >= T``.
    """
    if k < 3:
        raise ConfigError(
            f"@timesteps must be at least 3 (t = 0, 1 and T-1), got {k}", settings=["timesteps"]
        )
    if k >= num_steps:
        return list(range(num_steps))
    return [0, *sorted({1 + round(i * (num_steps - 2) / (k - 2)) for i in range(k - 1)})]


def estimate_total(
    timesteps: Sequence[int], terms: Sequence[float], prior: float, num_steps: int
) -> float:
    """L_T + L_0 + sum_{t=1}^{T-1} L_t (DDPM eq. 5, bits/dim) from the evaluated terms.

    The decoder term at t = 0 must be evaluated; KL terms at t >= 1 that were not are
    interpolated linearly in log L between the evaluated ones (the terms fall by orders of
    magnitude over t, so log-linear tracks them better than linear) and held constant
    beyond the first and last evaluated t. With every t evaluated this is the exact sum.
    """
    ts = np.asarray(timesteps, dtype=np.int64)
    vals = np.asarray(terms, dtype=np.float64)
    if ts.shape != vals.shape or ts.ndim != 1:
        raise ConfigError("timesteps and terms must be 1-D of the same length")
    if 0 not in ts:
        raise ConfigError("the decoder term at t = 0 must be evaluated to estimate the total")
    order = np.argsort(ts)
    ts, vals = ts[order], vals[order]
    if ts[-1] >= num_steps or ts[0] < 0:
        raise ConfigError(f"timesteps must lie in [0, {num_steps - 1}]")
    decoder = float(vals[0])
    kl_t, kl_v = ts[1:], vals[1:]
    if num_steps > 1 and kl_t.size == 0:
        raise ConfigError("evaluate at least one t >= 1 besides t = 0 to estimate the total")
    grid = np.arange(1, num_steps)
    if kl_t.size == num_steps - 1:
        kl_sum = float(kl_v.sum())
    else:
        log_kl = np.log(np.clip(kl_v, 1e-30, None))
        kl_sum = float(np.exp(np.interp(grid, kl_t, log_kl)).sum())
    return float(prior) + decoder + kl_sum


def write_vlb_csv(path: str | os.PathLike, curve: VLBCurve, *, overwrite: bool = False) -> Path:
    """One row per evaluated t: ``t, abar, bits_per_dim, std`` (atomic write)."""
    path = check_writable(path, overwrite=overwrite)
    with writing(path), atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "abar", "bits_per_dim", "std"])
        for i, t in enumerate(curve.timesteps):
            abar = "" if curve.abar is None else f"{float(curve.abar[i]):.6g}"
            w.writerow([t, abar, f"{float(curve.terms[i]):.6g}", f"{float(curve.std[i]):.6g}"])
    return path


def plot_vlb(
    path: str | os.PathLike,
    curve: VLBCurve,
    *,
    title: str = "",
    overwrite: bool = False,
) -> Path:
    """Plot the terms vs t on a log y axis (improved DDPM fig. 2); markers = evaluated t.

    The format follows the suffix (png, pdf, svg, ...), PNG when matplotlib does not know it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = check_writable(path, overwrite=overwrite)
    ts = np.asarray(curve.timesteps)
    vals = np.clip(np.asarray(curve.terms, dtype=np.float64), 1e-12, None)
    T, K = curve.num_steps, len(ts)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    kl = ts >= 1
    ax.plot(ts[kl], vals[kl], "o-", ms=3, lw=1, label=r"$L_{t}$: KL of step $t \to t-1$")
    if (~kl).any():
        ax.plot(ts[~kl], vals[~kl], "s", ms=6, label=r"$L_0$: decoder $-\log p(x_0|x_1)$")
    ax.plot([T], [max(curve.prior, 1e-12)], "^", ms=6, label=r"prior $L_T$ (at $t = T$)")
    ax.set_yscale("log")
    ax.set_xlabel("t (0-based timestep)")
    ax.set_ylabel("bits/dim")
    kind = "exact" if curve.exact else "estimate (interpolated)"
    ax.set_title(
        title or f"VLB terms over {curve.n} images; {K} of {T} timesteps evaluated", fontsize=10
    )
    ax.text(
        0.98,
        0.95,
        f"total {curve.total():.3f} bits/dim, {kind}",
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=9,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fmt = path.suffix.lstrip(".").lower()
    fmt = fmt if fmt in fig.canvas.get_supported_filetypes() else "png"
    with writing(path), atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)
    plt.close(fig)
    return path
