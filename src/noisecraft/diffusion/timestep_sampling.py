"""How training picks timesteps: uniformly, or by importance (improved DDPM sec. 3.3).

``sample(batch)`` returns (t, weights): LongTensor timesteps and float weights to multiply
the per-sample losses by, so that the weighted mean is an unbiased estimate of the
uniform-timestep loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from noisecraft.errors import ConfigError, unknown_name


class UniformSampler:
    """t ~ Uniform{0, ..., T-1}, all weights 1."""

    def __init__(self, num_steps: int):
        if num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = int(num_steps)

    def probabilities(self) -> Tensor:
        return torch.full((self.num_steps,), 1.0 / self.num_steps, dtype=torch.float64)

    def sample(
        self,
        batch: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        t = torch.randint(0, self.num_steps, (batch,), generator=generator)
        return t.to(device), torch.ones(batch, device=device)


class LossSecondMomentSampler:
    """Importance sampling p_t ∝ sqrt(E[L_t^2]) (improved DDPM eq. 18).

    Keeps the last ``history`` losses of each timestep; until every timestep has a full
    history it samples uniformly. The probabilities are mixed with ``uniform_prob`` of the
    uniform distribution, as improved-diffusion does; weights are 1 / (T p_t).
    """

    def __init__(self, num_steps: int, history: int = 10, uniform_prob: float = 0.001):
        if num_steps < 1 or history < 1 or not 0.0 <= uniform_prob <= 1.0:
            raise ConfigError(
                "LossSecondMomentSampler needs num_steps >= 1, history >= 1 and "
                f"0 <= uniform_prob <= 1 (got {num_steps}, {history}, {uniform_prob})"
            )
        self.num_steps = int(num_steps)
        self.history = int(history)
        self.uniform_prob = float(uniform_prob)
        self.losses = torch.zeros(self.num_steps, self.history, dtype=torch.float64)
        self.counts = torch.zeros(self.num_steps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history).all())

    def probabilities(self) -> Tensor:
        if not self.warmed_up():
            return torch.full((self.num_steps,), 1.0 / self.num_steps, dtype=torch.float64)
        w = (self.losses**2).mean(dim=1).sqrt()
        total = w.sum()
        p = w / total if total > 0 else torch.full_like(w, 1.0 / self.num_steps)
        return p * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_steps

    def sample(
        self,
        batch: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        weights = (1.0 / (self.num_steps * p[t])).to(torch.float32)
        return t.to(device), weights.to(device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample losses (B,) observed at timesteps t (B,)."""
        for ti, li in zip(
            t.detach().cpu().tolist(), losses.detach().cpu().double().tolist(), strict=True
        ):
            n = int(self.counts[ti])
            if n == self.history:
                self.losses[ti, :-1] = self.losses[ti, 1:].clone()
                self.losses[ti, -1] = li
            else:
                self.losses[ti, n] = li
                self.counts[ti] = n + 1

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        losses, counts = state["losses"], state["counts"]
        if tuple(losses.shape) != (self.num_steps, self.history):
            raise ConfigError(
                f"timestep sampler state is for shape {tuple(losses.shape)}, expected "
                f"{(self.num_steps, self.history)}; resume with the same num_steps"
            )
        self.losses = losses.to(torch.float64).clone()
        self.counts = counts.to(torch.long).clone()


TIMESTEP_SAMPLERS = {"uniform": UniformSampler, "loss-second-moment": LossSecondMomentSampler}


def make_timestep_sampler(name: str, num_steps: int) -> UniformSampler | LossSecondMomentSampler:
    """Build a timestep sampler by name: "uniform" or "loss-second-moment"."""
    if name not in TIMESTEP_SAMPLERS:
        raise unknown_name("timestep sampler", name, TIMESTEP_SAMPLERS)
    return TIMESTEP_SAMPLERS[name](num_steps)
