"""The files of a run directory, as the :class:`~noisecraft.training.trainer.Trainer` keeps
them: prepare the folder, save, resume -- and stop every DDP rank together when the main one
cannot write.

* Start: under the run lock, remove what a ``kill -9`` left (temporaries, ``log.csv`` rows past
  the checkpoint, a ``model.safetensors`` older than ``checkpoint.pt``), then write
  ``config.json``. A folder with only the files of a run that never reached a checkpoint is
  started over; any other non-empty folder without a checkpoint is refused.
* Save: ``checkpoint.pt`` then ``model.safetensors``, each atomically; the model's metadata
  records its step, so a resume can tell whether the pair matches.
* A write that fails (full disk, read-only folder) is one
  :class:`~noisecraft.errors.OutputError` line naming the file and the cause; the files on
  disk stay as they were.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from noisecraft.errors import CheckpointError, NoisecraftError, OutputExistsError
from noisecraft.io.atomic import atomic_path, remove_stale_temps
from noisecraft.io.checkpoint import read_info
from noisecraft.training import distributed
from noisecraft.training.config import ExperimentConfig
from noisecraft.training.interrupt import debug_pause
from noisecraft.training.resume import check_config_change, read_training_state
from noisecraft.training.run_dir import (
    RunLock,
    leftover_without_checkpoint,
    torch_save,
    truncate_log,
    write_failure,
)

CHECKPOINT = "checkpoint.pt"
MODEL = "model.safetensors"
LOG = "log.csv"

#: What a failed write raises: the OS's error, or safetensors' wrapping of it.
WRITE_ERRORS = (OSError, SafetensorError)


class RunFiles:
    """The run-directory half of :class:`~noisecraft.training.trainer.Trainer` (a mixin: it
    uses the trainer's config, modules, optimizer state and step)."""

    cfg: ExperimentConfig
    run_dir: Path
    dist: distributed.DistInfo
    device: torch.device
    step: int
    checkpoint_step: int | None  # the step of the checkpoint on disk (None: none yet)
    config_changes: dict[str, tuple[Any, Any]]
    log_header: list[str]
    task: Any  # noisecraft.training.tasks.Task
    model: torch.nn.Module
    ema: Any  # noisecraft.training.ema.EMA
    opt: torch.optim.Optimizer
    lr_sched: Any
    scaler: Any

    def _prepare_run_dir(self, overwrite: bool, allow: frozenset[str]) -> None:
        """Resume from the checkpoint, or start (over); then, on the main process, under the
        run lock: remove stale temporaries, cut the log back to the resumed step, make
        ``model.safetensors`` match the checkpoint, write ``config.json``."""
        self._overwrite = overwrite
        with self._lock():
            ckpt = self.run_dir / CHECKPOINT
            if ckpt.exists() and not overwrite:
                self.load_state(ckpt, allow)
            elif (
                self.run_dir.is_dir()
                and any(self.run_dir.iterdir())
                and not overwrite
                and not leftover_without_checkpoint(self.run_dir)
            ):
                raise OutputExistsError(
                    f"run directory {self.run_dir} exists without a checkpoint to resume; "
                    "pass @overwrite or set run.dir to a new folder",
                    settings=["overwrite"],
                )
            distributed.barrier(self.dist)  # every rank has looked before the main one writes
            self._raise_together(self._on_main(self._write_run_files))

    def _lock(self) -> contextlib.AbstractContextManager:
        """The run lock (main process, existing folder), or a no-op; agreed by every rank."""
        lock: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.dist.is_main and self.run_dir.is_dir():
            lock = RunLock(self.run_dir)
        stack = contextlib.ExitStack()
        self._raise_together(self._on_main(lambda: stack.enter_context(lock)))
        return stack

    def _write_run_files(self) -> None:
        run = self.run_dir
        run.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(run)
        remove_stale_temps(run / "samples")
        (run / "samples").mkdir(exist_ok=True)
        if self.step == 0 and self._overwrite:
            # starting over: a later resume must not pick up the previous run's checkpoint
            (run / CHECKPOINT).unlink(missing_ok=True)
        with self._writing(run / LOG):
            if self.step == 0:
                with atomic_path(run / LOG) as tmp:
                    tmp.write_text(",".join(self.log_header) + "\n")
            else:
                truncate_log(run / LOG, self.step, self.log_header)
        if self.step and self._model_step() != self.step:
            self._write_model()  # a kill came between the checkpoint and the model write
        with self._writing(run / "config.json"), atomic_path(run / "config.json") as tmp:
            tmp.write_text(json.dumps(self.cfg.to_dict(), indent=2))

    def _model_step(self) -> int | None:
        """The step recorded in ``model.safetensors`` (None: missing or unreadable)."""
        try:
            step = read_info(self.run_dir / MODEL).training.get("step")
        except NoisecraftError:
            return None
        return step if isinstance(step, int) else None

    # ------------------------------------------------- failures and agreement
    def _on_main(self, fn: Callable[..., object], *args: Any) -> NoisecraftError | None:
        """Run ``fn(*args)`` on the main process; return (not raise) its user-facing error."""
        if not self.dist.is_main:
            return None
        try:
            fn(*args)
        except NoisecraftError as e:
            return e
        except WRITE_ERRORS as e:
            path = Path(getattr(e, "filename", None) or self.run_dir)
            return write_failure(path, e, self.checkpoint_step)
        return None

    def _raise_together(self, error: NoisecraftError | None) -> None:
        """Raise ``error`` of the main process on every rank (DDP: one ``all_reduce``)."""
        if distributed.any_true([error is not None], self.dist, self.device)[0]:
            raise error or CheckpointError(
                "the main process of this run stopped with an error (see its message)"
            )

    @contextlib.contextmanager
    def _writing(self, path: Path):
        """Turn a failed write of ``path`` into one :class:`OutputError` line."""
        try:
            yield
        except WRITE_ERRORS as e:
            raise write_failure(path, e, self.checkpoint_step) from None

    # ----------------------------------------------------- save / resume
    def training_metadata(self) -> dict:
        return {**self.cfg.to_dict(), "step": self.step}

    def save(self) -> None:
        """Write ``checkpoint.pt``, then ``model.safetensors``, atomically (main process);
        a failed write raises :class:`OutputError` on every rank, the old files intact."""
        self._raise_together(self._on_main(self._write_checkpoint))
        self.checkpoint_step = self.step
        self._raise_together(self._on_main(self._write_model))
        distributed.barrier(self.dist)

    def _write_checkpoint(self) -> None:
        path, step = self.run_dir / CHECKPOINT, self.step
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
        with self._writing(path), atomic_path(path) as tmp:
            torch_save(state, tmp, lambda: debug_pause("checkpoint-partial", step))
            debug_pause("checkpoint-tmp", step)
        debug_pause("between-writes", step)

    def _write_model(self) -> None:
        path = self.run_dir / MODEL
        with self._writing(path):
            self.task.save_model(self.ema.model, path, self.training_metadata())

    def load_state(self, path: Path, allow: frozenset[str] = frozenset()) -> None:
        """Resume from the training checkpoint ``path`` (the config rule:
        :mod:`noisecraft.training.resume`). A file that cannot be read, is not ours, or does
        not fit the model is refused in one line before anything is written."""
        state = read_training_state(path, self.device)
        self.config_changes = check_config_change(
            path, state["config"], self.cfg.to_dict(), self.task.resume_sections, allow
        )
        try:
            self._load(state)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(
                f"{path} does not fit this model ({' '.join(str(e).split())[:200]}); "
                "move it away, or pass @overwrite to start the run over",
                settings=["overwrite"],
            ) from None
        self.checkpoint_step = self.step

    def _load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.lr_sched.load_state_dict(state["lr_sched"])
        self.scaler.load_state_dict(state["scaler"])
        # checkpoints from before tasks kept the timestep sampler at the top level
        self.task.load_state_dict(state.get("task", {"t_sampler": state.get("t_sampler", {})}))
        self.step = int(state["step"])


__all__ = ["CHECKPOINT", "LOG", "MODEL", "WRITE_ERRORS", "RunFiles"]
