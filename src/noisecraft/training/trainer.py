"""The generic training loop: AdamW + warm-up, clipping, accumulation, EMA, AMP, DDP, resume.

What is trained is a :class:`~noisecraft.training.tasks.Task` picked by ``[task] name``:
pixel-space diffusion (``pixel``, the default), the KL autoencoder of latent diffusion
(``vae``) or a text-conditioned latent diffusion model (``text_latent``). The task builds
the model(s), draws the global batch of a step, computes the loss and writes the saved
model and the sample grid; everything else is here, the same for every task.

Exact resume
    All randomness of step ``s`` (which images, flips, dropped labels or captions,
    timesteps, noise, posterior samples, dropout) comes from generators seeded by
    ``(seed, s)``: :func:`step_generator`. The batch order is a pure function
    of ``(seed, s)`` too (:func:`noisecraft.training.data.batch_indices`).
    A checkpoint therefore only needs weights, EMA, optimizer, LR schedule,
    the task's state (timestep sampler) and ``s``; resuming from it gives the same loss
    sequence as a run that never stopped.

DDP
    Every process draws the same global batch and takes its slice; DDP averages the
    gradients, so an update equals the single-process update on the global batch.

Run directory (``run.dir``)
    ``config.json``      the resolved experiment config
    ``checkpoint.pt``    training state (read back with ``weights_only=True``)
    ``model.safetensors`` the EMA model as a native checkpoint (kind ``unet``, ``vae`` or
                         ``latent_diffusion``, by task)
    ``log.csv``          step, loss, lr, samples/s, elapsed seconds (+ the task's log keys)
    ``samples/step_N.png`` sample grids (the task's picture: samples, or reconstructions)
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from noisecraft.errors import ConfigError, OutputExistsError
from noisecraft.io.atomic import atomic_path
from noisecraft.training import distributed
from noisecraft.training.config import ExperimentConfig
from noisecraft.training.data import ImageDataset, load_dataset
from noisecraft.training.ema import EMA
from noisecraft.training.tasks import Task, build_task
from noisecraft.training.tasks.base import build_schedule, objective_config
from noisecraft.viz.images import save_grid

CHECKPOINT = "checkpoint.pt"
MODEL = "model.safetensors"


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The CPU generator behind every random draw of global step ``step``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = '{name}' but CUDA is not available; use 'cpu'")
    return dev


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # the per-step mean loss of the steps this call ran
    seconds: float
    samples_per_second: float
    run_dir: Path


class Trainer:
    """Train the :class:`~noisecraft.training.tasks.Task` of an :class:`ExperimentConfig`.

    ``model`` is the task's trained module (a U-Net for ``pixel``), ``ema`` its EMA copy
    (what is saved and sampled), ``net`` the module the loss calls (``model`` or its DDP
    wrapper).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        dataset: ImageDataset | None = None,
        overwrite: bool = False,
    ):
        self.cfg = cfg
        tc = cfg.train
        self._validate()
        self.device = resolve_device(tc.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.dist = distributed.setup(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.run_dir = Path(cfg.run.dir)
        self.dataset = dataset if dataset is not None else load_dataset(cfg.data)

        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.task: Task = build_task(cfg, self.dataset, self.device)
        self.model: nn.Module = self.task.model.to(self.device)
        self.ema = EMA(self.model, tc.ema_decay, tc.ema_warmup)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay
        )
        warm = max(tc.warmup_steps, 0)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )
        self.amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[
            tc.mixed_precision
        ]
        if self.device.type != "cuda":
            self.amp_dtype = None  # CPU trains in float32 (bf16 is very slow on CPUs without AMX)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.last_logs: dict[str, float] = {}  # the task's log keys, last step
        self.net: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DDP(self.model, device_ids=ids)
        self._prepare_run_dir(overwrite)

    # ------------------------------------------------------------------ setup
    def _validate(self) -> None:
        tc = self.cfg.train
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if tc.batch_size < 1 or tc.grad_accum < 1 or tc.max_steps < 0:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1, max_steps >= 0")
        if tc.batch_size % (world * tc.grad_accum):
            raise ConfigError(
                f"train.batch_size ({tc.batch_size}) must be divisible by processes x grad_accum "
                f"({world} x {tc.grad_accum})"
            )
        if tc.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError("train.mixed_precision must be one of: no, fp16, bf16")

    @property
    def log_header(self) -> list[str]:
        return ["step", "loss", "lr", "samples_per_s", "elapsed_s", *self.task.log_keys]

    def _prepare_run_dir(self, overwrite: bool) -> None:
        ckpt = self.run_dir / CHECKPOINT
        if ckpt.exists() and not overwrite:
            self.load_state(ckpt)
        elif self.run_dir.exists() and any(self.run_dir.iterdir()) and not overwrite:
            raise OutputExistsError(
                f"run directory {self.run_dir} exists without a checkpoint to resume; "
                "pass @overwrite or set run.dir to a new folder",
                settings=["overwrite"],
            )
        distributed.barrier(self.dist)  # every rank has looked before the main one writes
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.step == 0:
                (self.run_dir / "samples").mkdir(exist_ok=True)
                log = self.run_dir / "log.csv"
                log.write_text(",".join(self.log_header) + "\n")
            with atomic_path(self.run_dir / "config.json") as tmp:
                tmp.write_text(json.dumps(self.cfg.to_dict(), indent=2))

    # ------------------------------------------------------------- one step
    def train_step(self) -> float:
        """One optimizer step on global batch ``self.step``; returns its mean loss (all ranks)."""
        tc = self.cfg.train
        batch = self.task.draw(self.step, step_generator(tc.seed, self.step))
        r, w = self.dist.rank, self.dist.world_size
        local = tc.batch_size // w
        start = r * local
        micro = local // tc.grad_accum
        torch.manual_seed(step_generator(tc.seed, self.step, 1).initial_seed())  # dropout
        self.net.train()
        per_sample, logs = [], []
        for k in range(tc.grad_accum):
            ms = slice(start + k * micro, start + (k + 1) * micro)
            sync = k == tc.grad_accum - 1 or not self.dist.enabled
            ctx = contextlib.nullcontext() if sync else self.net.no_sync()
            with ctx, self._autocast():
                out = self.task.loss(self.net, {n: v[ms].to(self.device) for n, v in batch.items()})
                loss = out.loss / tc.grad_accum
            self.scaler.scale(loss).backward()
            per_sample.append(out.per_sample.detach().float())
            if self.task.log_keys:
                logs.append(
                    torch.stack([out.logs[n].detach().float() for n in self.task.log_keys], 1)
                )
        self.scaler.unscale_(self.opt)
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.lr_sched.step()
        self.ema.update(self.model)
        losses = distributed.all_gather_cat(torch.cat(per_sample), self.dist)
        self.last_logs = {}
        if logs:
            extra = distributed.all_gather_cat(torch.cat(logs), self.dist).mean(0)
            self.last_logs = dict(zip(self.task.log_keys, extra.tolist(), strict=True))
        self.task.after_step(batch, losses.cpu())
        self.step += 1
        return float(losses.mean())

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    # ---------------------------------------------------------------- loop
    def train(self, max_steps: int | None = None) -> TrainResult:
        """Run until ``max_steps`` (default ``train.max_steps``); checkpoint at the end."""
        from tqdm.auto import tqdm

        rc, tc = self.cfg.run, self.cfg.train
        end = tc.max_steps if max_steps is None else max_steps
        start_step, t0 = self.step, time.perf_counter()
        losses: list[float] = []
        bar = tqdm(
            total=end,
            initial=self.step,
            desc=f"train {self.task.name}",
            unit="step",
            disable=not (rc.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        window, window_logs, window_t = [], [], time.perf_counter()
        while self.step < end:
            loss = self.train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}; lower train.lr")
            losses.append(loss)
            window.append(loss)
            window_logs.append(self.last_logs)
            bar.update(1)
            if self.step % rc.log_every == 0 or self.step == end:
                now = time.perf_counter()
                sps = len(window) * tc.batch_size / max(now - window_t, 1e-9)
                mean = sum(window) / len(window)
                extra = {
                    k: sum(d[k] for d in window_logs) / len(window_logs) for k in self.task.log_keys
                }
                bar.set_postfix(
                    loss=f"{mean:.4f}",
                    **{k: f"{v:.4g}" for k, v in extra.items()},
                    samples_s=f"{sps:.0f}",
                )
                self._log_row(mean, sps, now - t0, extra)
                window, window_logs, window_t = [], [], now
            if rc.sample_every and self.step % rc.sample_every == 0:
                self.save_samples()
            if rc.checkpoint_every and self.step % rc.checkpoint_every == 0 and self.step < end:
                self.save()
        bar.close()
        self.save()
        if self.cfg.run.sample_every and self.step % self.cfg.run.sample_every:
            self.save_samples()
        secs = time.perf_counter() - t0
        n = (self.step - start_step) * tc.batch_size
        return TrainResult(self.step, losses, secs, n / max(secs, 1e-9), self.run_dir)

    def _log_row(
        self, loss: float, sps: float, elapsed: float, extra: dict[str, float] | None = None
    ) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / "log.csv", "a", newline="") as f:
            csv.writer(f).writerow(
                [
                    self.step,
                    f"{loss:.6f}",
                    f"{self.lr_sched.get_last_lr()[0]:.3e}",
                    f"{sps:.1f}",
                    f"{elapsed:.1f}",
                    *(f"{(extra or {})[k]:.6g}" for k in self.task.log_keys),
                ]
            )

    # ----------------------------------------------------- save / resume
    def training_metadata(self) -> dict:
        return {**self.cfg.to_dict(), "step": self.step}

    def save(self) -> None:
        """Write ``checkpoint.pt`` and ``model.safetensors`` atomically (main process only)."""
        if self.dist.is_main:
            state = {
                "step": self.step,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(),
                "lr_sched": self.lr_sched.state_dict(),
                "scaler": self.scaler.state_dict(),
                "task": self.task.state_dict(),
                "config": json.dumps(self.cfg.to_dict()),
            }
            with atomic_path(self.run_dir / CHECKPOINT) as tmp:
                torch.save(state, tmp)
            self.task.save_model(self.ema.model, self.run_dir / MODEL, self.training_metadata())
        distributed.barrier(self.dist)

    def load_state(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved = json.loads(state["config"])
        current = self.cfg.to_dict()
        saved_task = saved.get("task", {}).get("name", "pixel")
        if saved_task != self.task.name:
            raise ConfigError(
                f"{path} is a '{saved_task}' run, this config trains '{self.task.name}'; "
                "use the same config to resume, or pass @overwrite to start over",
                settings=["overwrite"],
            )
        for section in self.task.resume_sections:
            if saved.get(section) != current[section]:
                raise ConfigError(
                    f"{path} was trained with a different [{section}] config; "
                    "use the same config to resume, or pass @overwrite to start over",
                    settings=["overwrite"],
                )
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.lr_sched.load_state_dict(state["lr_sched"])
        self.scaler.load_state_dict(state["scaler"])
        # checkpoints from before tasks kept the timestep sampler at the top level
        self.task.load_state_dict(state.get("task", {"t_sampler": state.get("t_sampler", {})}))
        self.step = int(state["step"])

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        """The task's picture from the EMA model (samples, or originals over reconstructions)."""
        if not self.dist.is_main:
            return None
        images, nrow = self.task.sample_grid(self.ema.model)
        return save_grid(
            images,
            self.run_dir / "samples" / f"step_{self.step:06d}.png",
            nrow=nrow,
            overwrite=True,
        )


__all__ = [
    "CHECKPOINT",
    "MODEL",
    "TrainResult",
    "Trainer",
    "build_schedule",
    "objective_config",
    "resolve_device",
    "step_generator",
]
