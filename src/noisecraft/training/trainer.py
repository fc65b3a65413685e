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
                         ``latent_diffusion``, by task); its metadata records its step
    ``log.csv``          step, loss, lr, samples/s, elapsed seconds (+ the task's log keys)
    ``samples/step_N.png`` sample grids (the task's picture: samples, or reconstructions)

Interruptions (:mod:`~noisecraft.training.run_files`, :mod:`~noisecraft.training.interrupt`)
    Every file is written atomically. A run starts by removing the temporaries a ``kill -9``
    left, cutting ``log.csv`` back to the step it resumes from, and rewriting
    ``model.safetensors`` from the checkpoint when the kill came between the two writes.
    SIGINT / SIGTERM finish the step, save, and raise :class:`TrainingInterrupted`. A full
    disk or a read-only folder is one :class:`~noisecraft.errors.OutputError` line; the
    previous checkpoint stays. Under DDP every rank takes these decisions together.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from noisecraft.errors import ConfigError
from noisecraft.training import distributed
from noisecraft.training.config import ExperimentConfig
from noisecraft.training.data import ImageDataset, load_dataset
from noisecraft.training.ema import EMA
from noisecraft.training.interrupt import StopRequest, TrainingInterrupted
from noisecraft.training.run_dir import check_run_dir
from noisecraft.training.run_files import CHECKPOINT, LOG, MODEL, RunFiles
from noisecraft.training.tasks import Task, build_task
from noisecraft.training.tasks.base import build_schedule, objective_config
from noisecraft.viz.images import save_grid


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The CPU generator behind every random draw of global step ``step``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"train.device = {name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = '{name}' but CUDA is not available; use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device = '{name}' but this machine has {torch.cuda.device_count()} CUDA "
            "device(s)"
        )
    return dev


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # the per-step mean loss of the steps this call ran
    seconds: float
    samples_per_second: float
    run_dir: Path


class Trainer(RunFiles):
    """Train the :class:`~noisecraft.training.tasks.Task` of an :class:`ExperimentConfig`.

    ``model`` is the task's trained module (a U-Net for ``pixel``), ``ema`` its EMA copy
    (what is saved and sampled), ``net`` the module the loss calls (``model`` or its DDP
    wrapper).

    Resuming (``run.dir`` holds a checkpoint): the saved config must equal ``cfg`` except
    for keys that do not change what a step computes (``train.max_steps``, ``train.device``,
    ``train.threads``, ``run.*``) and the keys named in ``allow_config_change``
    (:mod:`noisecraft.training.resume`); ``config_changes`` lists what changed.
    ``overwrite``: start over even if the folder holds a run.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        dataset: ImageDataset | None = None,
        overwrite: bool = False,
        allow_config_change: tuple[str, ...] | list[str] | frozenset[str] = (),
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
        self.checkpoint_step: int | None = None  # the step of the checkpoint on disk
        self.config_changes: dict[str, tuple] = {}
        self._raise_together(self._on_main(lambda: check_run_dir(self.run_dir)))
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
        self._prepare_run_dir(overwrite, frozenset(allow_config_change))

    # ------------------------------------------------------------------ setup
    def _validate(self) -> None:
        """What the config alone cannot check (its ranges are checked when it is built)."""
        tc = self.cfg.train
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if tc.batch_size % (world * tc.grad_accum):
            raise ConfigError(
                f"train.batch_size ({tc.batch_size}) must be divisible by processes x grad_accum "
                f"({world} x {tc.grad_accum})"
            )

    @property
    def log_header(self) -> list[str]:
        return ["step", "loss", "lr", "samples_per_s", "elapsed_s", *self.task.log_keys]

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
        """Run until ``max_steps`` (default ``train.max_steps``); checkpoint at the end.

        SIGINT / SIGTERM: finish the step, save, raise :class:`TrainingInterrupted`."""
        if max_steps is not None and (
            isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
        ):
            raise ConfigError(
                f"@max_steps must be at least 1, got {max_steps!r}", settings=["max_steps"]
            )
        end = self.cfg.train.max_steps if max_steps is None else max_steps
        with self._lock(), StopRequest(escalate=not self.dist.enabled) as stop:
            result = self._train(end, stop)
        if stop.signum is not None and self.step < end:
            raise TrainingInterrupted(stop.signum, self.step, self.run_dir / CHECKPOINT)
        return result

    def _train(self, end: int, stop: StopRequest) -> TrainResult:
        from tqdm.auto import tqdm

        rc, tc = self.cfg.run, self.cfg.train
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
                kept = f" (the checkpoint of step {self.checkpoint_step} is kept)"
                raise ConfigError(
                    f"loss became {loss} at step {self.step}; lower train.lr"
                    + (kept if self.checkpoint_step else "")
                )
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
                self._raise_together(self._on_main(self._log_row, mean, sps, now - t0, extra))
                window, window_logs, window_t = [], [], now
            if rc.sample_every and self.step % rc.sample_every == 0:
                self._raise_together(self._on_main(self.save_samples))
            if rc.checkpoint_every and self.step % rc.checkpoint_every == 0 and self.step < end:
                self.save()
            if distributed.any_true([stop.requested], self.dist, self.device)[0]:
                stop.signum = stop.signum or signal.SIGTERM  # a peer was signalled
                break
        bar.close()
        if self.checkpoint_step != self.step:
            self.save()
        if stop.signum is None and rc.sample_every and self.step % rc.sample_every:
            self._raise_together(self._on_main(self.save_samples))
        secs = time.perf_counter() - t0
        n = (self.step - start_step) * tc.batch_size
        return TrainResult(self.step, losses, secs, n / max(secs, 1e-9), self.run_dir)

    def _log_row(
        self, loss: float, sps: float, elapsed: float, extra: dict[str, float] | None = None
    ) -> None:
        if not self.dist.is_main:
            return
        with self._writing(self.run_dir / LOG), open(self.run_dir / LOG, "a", newline="") as f:
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

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        """The task's picture from the EMA model (samples, or originals over reconstructions)."""
        if not self.dist.is_main:
            return None
        images, nrow = self.task.sample_grid(self.ema.model)
        path = self.run_dir / "samples" / f"step_{self.step:06d}.png"
        with self._writing(path):
            return save_grid(images, path, nrow=nrow, overwrite=True)


__all__ = [
    "CHECKPOINT",
    "MODEL",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "build_schedule",
    "objective_config",
    "resolve_device",
    "step_generator",
]
