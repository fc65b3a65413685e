"""The :class:`Task` protocol: what the generic training loop needs to know about a model.

The :class:`~noisecraft.training.trainer.Trainer` owns everything that is the same for every
model -- AdamW with warm-up, clipping, gradient accumulation, EMA, AMP, DDP, checkpoints,
exact resume, logs -- and asks a task for the rest:

1. ``model``: the ``nn.Module`` whose parameters are trained (built from the config under
   ``torch.manual_seed(train.seed)``, so every DDP rank starts from the same weights). The
   trainer keeps its EMA copy, optimises it and wraps it in DDP.
2. ``draw(step, generator) -> batch``: the *global* batch of step ``step`` and every random
   number the step needs (flips, dropped conditions, timesteps, noise), drawn from the step's
   generator only. Every tensor has the global batch size as its first dimension; the
   trainer cuts the slice of its DDP rank and the micro-batches of gradient accumulation.
3. ``loss(net, micro_batch) -> TaskLoss``: the scalar to back-propagate (a mean over the
   micro-batch), the per-sample losses that are logged, and optional per-sample extras
   (``log_keys``: extra CSV columns). ``net`` is ``model`` or its DDP wrapper: call it, not
   ``model``, so that DDP sees the forward pass.
4. ``after_step(batch, losses)``: state updates from the gathered per-sample losses of the
   global batch (the loss-aware timestep sampler); ``state_dict`` / ``load_state_dict`` for
   that state, saved in the training checkpoint.
5. ``save_model(model, path, training)``: write the sampling-ready native checkpoint from the
   EMA copy of ``model``; ``sample_grid(model)``: the periodic picture, ``(images, nrow)``.
6. ``resume_sections``: the config sections that must not change between a checkpoint and
   the run that resumes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from noisecraft.diffusion import NoiseSchedule, ObjectiveConfig, training_losses
from noisecraft.training.config import ExperimentConfig
from noisecraft.training.data import ImageDataset

Batch = dict[str, Tensor]


class TaskLoss(NamedTuple):
    """What :meth:`Task.loss` returns for one (micro-)batch."""

    loss: Tensor  # scalar to back-propagate: the mean over the micro-batch
    per_sample: Tensor  # (b,) the logged loss of each sample (detached by the trainer)
    logs: dict[str, Tensor] = {}  # (b,) per-sample extras, one per ``Task.log_keys``


@runtime_checkable
class Task(Protocol):
    """A trainable model and its objective (see the module docstring)."""

    name: str
    dataset: ImageDataset
    model: nn.Module
    resume_sections: tuple[str, ...]
    log_keys: tuple[str, ...]

    def draw(self, step: int, generator: torch.Generator) -> Batch: ...

    def loss(self, net: nn.Module, batch: Batch) -> TaskLoss: ...

    def after_step(self, batch: Batch, losses: Tensor) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_model(self, model: nn.Module, path: Path, training: dict[str, Any]) -> None: ...

    def sample_grid(self, model: nn.Module) -> tuple[Tensor, int]: ...


# ------------------------------------------------------------------ shared by the diffusion tasks


def build_schedule(cfg: ExperimentConfig) -> NoiseSchedule:
    """The ``[diffusion]`` noise schedule (DESIGN.md contract 1)."""
    d = cfg.diffusion
    schedule = NoiseSchedule.from_name(d.schedule, num_steps=d.num_steps)
    return schedule.rescale_zero_terminal_snr() if d.zero_terminal_snr else schedule


def objective_config(cfg: ExperimentConfig) -> ObjectiveConfig:
    """The ``[diffusion]`` training objective (DESIGN.md contract 5)."""
    d = cfg.diffusion
    return ObjectiveConfig(
        prediction=d.prediction,
        weighting=d.weighting,
        min_snr_gamma=d.min_snr_gamma,
        offset_noise=0.0,  # the task adds it to the global batch's noise itself
        learned_variance=d.learned_variance,
        vlb_weight=d.vlb_weight,
    )


def draw_timesteps_and_noise(
    t_sampler: Any,
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator,
    offset_noise: float = 0.0,
) -> Batch:
    """``t``, importance ``weights`` and ``noise`` of a global batch, in this draw order.

    Offset noise (Guttenberg 2023) is drawn here, on the global batch, so every DDP rank
    sees the slice of the same noise.
    """
    t, weights = t_sampler.sample(shape[0], generator=generator)
    noise = torch.randn(shape, generator=generator)
    if offset_noise:
        offset = torch.randn(*shape[:2], *(1,) * (len(shape) - 2), generator=generator)
        noise = noise + offset_noise * offset
    return {"t": t, "weights": weights, "noise": noise}


__all__ = [
    "Batch",
    "CaptionedLatentLoss",
    "grid_request",
    "Task",
    "TaskLoss",
    "build_schedule",
    "draw_timesteps_and_noise",
    "objective_config",
]


class TimestepSamplerState:
    """Mixin of the diffusion tasks: feed losses to ``self.t_sampler`` and checkpoint it.

    Importance samplers (loss-second-moment) learn from each step's per-sample losses;
    their state goes into the checkpoint so that a resumed run draws the same timesteps.
    """

    t_sampler: Any

    def after_step(self, batch: Batch, losses: Tensor) -> None:
        if hasattr(self.t_sampler, "update"):
            self.t_sampler.update(batch["t"], losses)

    def state_dict(self) -> dict[str, Any]:
        sd = self.t_sampler.state_dict() if hasattr(self.t_sampler, "state_dict") else {}
        return {"t_sampler": sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("t_sampler") and hasattr(self.t_sampler, "load_state_dict"):
            self.t_sampler.load_state_dict(state["t_sampler"])


class CaptionedLatentLoss:
    """Mixin of the text-to-image tasks: the diffusion objective (DESIGN.md contract 5) of
    ``net(x_t, t, **model_kwargs(batch))`` (default: the caption ids ``input_ids``) on a batch
    of latents ``z0``, weighted by the timestep sampler's importance ``weights``."""

    schedule: NoiseSchedule
    objective: ObjectiveConfig

    def model_kwargs(self, batch: Batch) -> dict:
        """What ``net`` takes besides ``x_t`` and ``t``."""
        return {"input_ids": batch["input_ids"]}

    def loss(self, net: nn.Module, batch: Batch) -> TaskLoss:
        out = training_losses(
            net,
            self.schedule,
            batch["z0"],
            batch["t"],
            config=self.objective,
            noise=batch["noise"],
            model_kwargs=self.model_kwargs(batch),
        )
        return TaskLoss((out["loss"] * batch["weights"]).mean(), out["loss"])


def grid_request(cfg: ExperimentConfig, prompts: list[str], **seeds: Any) -> Any:
    """The :class:`~noisecraft.pipelines.GenerateRequest` of a text task's sample grid: one
    image per prompt with the ``[run]`` sampler, steps and CFG; ``seeds``: ``seed=`` or
    ``seeds=`` (default seed 0)."""
    from noisecraft.pipelines.generate import GenerateRequest

    rc = cfg.run
    return GenerateRequest(
        n=len(prompts),
        sampler=rc.sample_sampler,
        steps=rc.sample_steps,
        cfg=rc.sample_cfg,
        prompts=prompts,
        **(seeds or {"seed": 0}),
    )
