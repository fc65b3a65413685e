"""The training loop: AdamW + warm-up, clipping, accumulation, EMA, AMP, DDP, exact resume.

Exact resume
    All randomness of step ``s`` (which images, flips, dropped labels,
    timesteps, noise, dropout) comes from generators seeded by
    ``(seed, s)``: :func:`step_generator`. The batch order is a pure function
    of ``(seed, s)`` too (:func:`noisecraft.training.data.batch_indices`).
    A checkpoint therefore only needs weights, EMA, optimizer, LR schedule,
    timestep-sampler state and ``s``; resuming from it gives the same loss
    sequence as a run that never stopped.

Run directory (``run.dir``)
    ``config.json``      the resolved experiment config
    ``checkpoint.pt``    training state (read back with ``weights_only=True``)
    ``model.safetensors`` the EMA model, a native checkpoint ``noisecraft sample`` reads
    ``log.csv``          step, loss, lr, samples/s, elapsed seconds
    ``samples/step_N.png`` sample grids (one row per class for class-conditional models)
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from noisecraft.diffusion import NoiseSchedule, ObjectiveConfig, training_losses
from noisecraft.diffusion.timestep_sampling import make_timestep_sampler
from noisecraft.errors import ConfigError, OutputExistsError
from noisecraft.io.atomic import atomic_path
from noisecraft.models.unet import UNet
from noisecraft.pipelines.generate import GenerateRequest, generate
from noisecraft.pipelines.pixel import PixelDiffusion
from noisecraft.training import distributed
from noisecraft.training.config import ExperimentConfig
from noisecraft.training.data import ImageDataset, batch_indices, load_dataset
from noisecraft.training.ema import EMA
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


def build_schedule(cfg: ExperimentConfig) -> NoiseSchedule:
    d = cfg.diffusion
    schedule = NoiseSchedule.from_name(d.schedule, num_steps=d.num_steps)
    return schedule.rescale_zero_terminal_snr() if d.zero_terminal_snr else schedule


def objective_config(cfg: ExperimentConfig) -> ObjectiveConfig:
    d = cfg.diffusion
    return ObjectiveConfig(
        prediction=d.prediction,
        weighting=d.weighting,
        min_snr_gamma=d.min_snr_gamma,
        offset_noise=0.0,  # the trainer adds it to the global batch's noise itself
        learned_variance=d.learned_variance,
        vlb_weight=d.vlb_weight,
    )


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # the per-step mean loss of the steps this call ran
    seconds: float
    samples_per_second: float
    run_dir: Path


class Trainer:
    """Train a pixel-space U-Net diffusion model from an :class:`ExperimentConfig`."""

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
        self._check_model_vs_data()

        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.model = UNet(cfg.model).to(self.device)
        self.ema = EMA(self.model, tc.ema_decay, tc.ema_warmup)
        self.schedule = build_schedule(cfg)
        self.objective = objective_config(cfg)
        self.t_sampler = make_timestep_sampler(
            cfg.diffusion.timestep_sampler, cfg.diffusion.num_steps
        )
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
        self.net: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DDP(self.model, device_ids=ids)
        self._prepare_run_dir(overwrite)

    # ------------------------------------------------------------------ setup
    def _validate(self) -> None:
        tc = self.cfg.train
        world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
        if tc.batch_size < 1 or tc.grad_accum < 1 or tc.max_steps < 0:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1, max_steps >= 0")
        if tc.batch_size % (world * tc.grad_accum):
            raise ConfigError(
                f"train.batch_size ({tc.batch_size}) must be divisible by processes x grad_accum "
                f"({world} x {tc.grad_accum})"
            )
        if tc.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError("train.mixed_precision must be one of: no, fp16, bf16")

    def _check_model_vs_data(self) -> None:
        m, ds = self.cfg.model, self.dataset
        if m.in_channels != ds.images.shape[1]:
            raise ConfigError(
                f"model.in_channels = {m.in_channels} but the data has "
                f"{ds.images.shape[1]} channel(s)"
            )
        if ds.labels is not None and m.num_classes is not None and m.num_classes < ds.num_classes:
            raise ConfigError(
                f"model.num_classes = {m.num_classes} but the data has {ds.num_classes} classes"
            )
        if ds.labels is None and m.num_classes is not None:
            raise ConfigError(
                "model.num_classes is set but the data has no labels; "
                "remove model.num_classes or set data.class_conditional = true"
            )

    def _prepare_run_dir(self, overwrite: bool) -> None:
        ckpt = self.run_dir / CHECKPOINT
        if ckpt.exists() and not overwrite:
            self.load_state(ckpt)
        elif self.run_dir.exists() and any(self.run_dir.iterdir()) and not overwrite:
            raise OutputExistsError(
                f"run directory {self.run_dir} exists without a checkpoint to resume; "
                "pass --overwrite or set run.dir to a new folder"
            )
        distributed.barrier(self.dist)  # every rank has looked before the main one writes
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.step == 0:
                (self.run_dir / "samples").mkdir(exist_ok=True)
                log = self.run_dir / "log.csv"
                log.write_text("step,loss,lr,samples_per_s,elapsed_s\n")
            with atomic_path(self.run_dir / "config.json") as tmp:
                tmp.write_text(json.dumps(self.cfg.to_dict(), indent=2))

    # ------------------------------------------------------------- one step
    def _global_batch(
        self, step: int
    ) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images, model kwargs, timesteps, importance weights, noise of global step ``step``."""
        tc, ds = self.cfg.train, self.dataset
        g = step_generator(tc.seed, step)
        idx = batch_indices(len(ds), tc.batch_size, step, tc.seed)
        x0 = ds.images[idx]
        if self.cfg.data.flip:
            flip = torch.rand(len(idx), generator=g) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        kwargs = {}
        if ds.labels is not None and self.cfg.model.num_classes is not None:
            labels = ds.labels[idx].clone()
            drop = torch.rand(len(idx), generator=g) < tc.cond_drop_prob
            labels[drop] = self.model.null_class
            kwargs["class_labels"] = labels
        t, weights = self.t_sampler.sample(len(idx), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        if self.cfg.diffusion.offset_noise:  # drawn here so every rank sees the global batch's
            offset = torch.randn(*x0.shape[:2], 1, 1, generator=g)
            noise = noise + self.cfg.diffusion.offset_noise * offset
        return x0, kwargs, t, weights, noise

    def train_step(self) -> float:
        """One optimizer step on global batch ``self.step``; returns its mean loss (all ranks)."""
        tc = self.cfg.train
        x0, kwargs, t, weights, noise = self._global_batch(self.step)
        r, w = self.dist.rank, self.dist.world_size
        local = tc.batch_size // w
        sl = slice(r * local, (r + 1) * local)
        micro = local // tc.grad_accum
        torch.manual_seed(step_generator(tc.seed, self.step, 1).initial_seed())  # dropout
        self.net.train()
        total = torch.zeros((), device=self.device)
        per_sample = []
        for k in range(tc.grad_accum):
            ms = slice(sl.start + k * micro, sl.start + (k + 1) * micro)
            sync = k == tc.grad_accum - 1 or not self.dist.enabled
            ctx = contextlib.nullcontext() if sync else self.net.no_sync()
            with ctx, self._autocast():
                out = training_losses(
                    self.net,
                    self.schedule,
                    x0[ms].to(self.device),
                    t[ms].to(self.device),
                    config=self.objective,
                    noise=noise[ms].to(self.device),
                    model_kwargs={k2: v[ms].to(self.device) for k2, v in kwargs.items()},
                )
                loss = (out["loss"] * weights[ms].to(self.device)).mean() / tc.grad_accum
            self.scaler.scale(loss).backward()
            total += loss.detach()
            per_sample.append(out["loss"].detach().float())
        self.scaler.unscale_(self.opt)
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.lr_sched.step()
        self.ema.update(self.model)
        losses = distributed.all_gather_cat(torch.cat(per_sample), self.dist)
        if hasattr(self.t_sampler, "update"):
            self.t_sampler.update(t, losses.cpu())
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
            desc="train",
            unit="step",
            disable=not (rc.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        window, window_t = [], time.perf_counter()
        while self.step < end:
            loss = self.train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}; lower train.lr")
            losses.append(loss)
            window.append(loss)
            bar.update(1)
            if self.step % rc.log_every == 0 or self.step == end:
                now = time.perf_counter()
                sps = len(window) * tc.batch_size / max(now - window_t, 1e-9)
                mean = sum(window) / len(window)
                bar.set_postfix(loss=f"{mean:.4f}", samples_s=f"{sps:.0f}")
                self._log_row(mean, sps, now - t0)
                window, window_t = [], now
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

    def _log_row(self, loss: float, sps: float, elapsed: float) -> None:
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
                ]
            )

    # ----------------------------------------------------- save / resume
    def pixel_model(self) -> PixelDiffusion:
        """The EMA model as a sampling-ready :class:`PixelDiffusion`."""
        return PixelDiffusion(
            unet=self.ema.model,
            schedule=self.schedule,
            prediction=self.cfg.diffusion.prediction,
            learned_variance=self.cfg.diffusion.learned_variance,
            image_size=self.cfg.data.image_size,
        )

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
                "t_sampler": self.t_sampler.state_dict()
                if hasattr(self.t_sampler, "state_dict")
                else {},
                "config": json.dumps(self.cfg.to_dict()),
            }
            with atomic_path(self.run_dir / CHECKPOINT) as tmp:
                torch.save(state, tmp)
            self.pixel_model().save(
                self.run_dir / MODEL, training=self.training_metadata(), overwrite=True
            )
        distributed.barrier(self.dist)

    def load_state(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved = json.loads(state["config"])
        for section in ("model", "diffusion"):
            if saved[section] != self.cfg.to_dict()[section]:
                raise ConfigError(
                    f"{path} was trained with a different [{section}] config; "
                    "use the same config to resume, or pass --overwrite to start over"
                )
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.lr_sched.load_state_dict(state["lr_sched"])
        self.scaler.load_state_dict(state["scaler"])
        if state.get("t_sampler") and hasattr(self.t_sampler, "load_state_dict"):
            self.t_sampler.load_state_dict(state["t_sampler"])
        self.step = int(state["step"])

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        """A sample grid from the EMA model: one row per class (up to 10 classes x 8)."""
        if not self.dist.is_main:
            return None
        rc = self.cfg.run
        k = self.cfg.model.num_classes
        if k:
            rows = min(k, 10)
            classes = [c for c in range(rows) for _ in range(8)]
            req = GenerateRequest(
                n=len(classes),
                sampler=rc.sample_sampler,
                steps=rc.sample_steps,
                cfg=rc.sample_cfg,
                classes=classes,
                seed=0,
            )
        else:
            req = GenerateRequest(n=64, sampler=rc.sample_sampler, steps=rc.sample_steps, seed=0)
        images = generate(self.pixel_model(), req)
        return save_grid(
            images, self.run_dir / "samples" / f"step_{self.step:06d}.png", nrow=8, overwrite=True
        )
