"""``noisecraft train``: run a recipe, resume, and stop cleanly on Ctrl-C / SIGTERM.

A user's mistake is an ``error:`` line (exit 2) raised by the core. An interruption is not a
mistake: the trainer saves a checkpoint, and this prints where, and the command that resumes
the run, then exits with ``128 + signal`` (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

import typer

from noisecraft.errors import ConfigError


def _split_keys(items: list[str] | None) -> list[str]:
    """``--allow-config-change a.b,c.d --allow-config-change e.f`` -> [a.b, c.d, e.f]."""
    return [k.strip() for item in items or [] for k in item.split(",") if k.strip()]


def _program() -> list[str]:
    """How this process was started, as the words to type again (best effort)."""
    argv0 = sys.argv[0] if sys.argv else ""
    name = Path(argv0).name
    if name == "noisecraft":
        return ["noisecraft" if shutil.which("noisecraft") == argv0 else argv0]
    if name == "__main__.py" and Path(argv0).parent.name == "noisecraft":
        return [sys.executable, "-m", "noisecraft"]
    if name == "main.py" and Path(argv0).parent.name == "cli":
        return [sys.executable, "-m", "noisecraft.cli.main"]
    return ["noisecraft"]


def _torchrun_prefix() -> list[str] | None:
    """Under torchrun: the launcher's own command line up to the ``train`` word (read from
    ``/proc``), or a plain ``torchrun`` line when that cannot be read; None outside DDP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        words = [w.decode() for w in raw.split(b"\0") if w]
        return words[: words.index("train")]
    except (OSError, ValueError, UnicodeDecodeError):
        n = os.environ.get("LOCAL_WORLD_SIZE", str(world))
        return ["torchrun", "--standalone", "--nproc_per_node", n, "-m", "noisecraft.cli.main"]


def resume_command(
    config: Path, overrides: list[str], max_steps: int | None, allowed: list[str]
) -> str:
    """The command that resumes this run (the same one, without ``--overwrite``)."""
    words = _torchrun_prefix() or _program()
    words += ["train", str(config)]
    for item in overrides:
        words += ["--set", item]
    if max_steps is not None:
        words += ["--max-steps", str(max_steps)]
    if allowed:
        words += ["--allow-config-change", ",".join(allowed)]
    return shlex.join(words)


def run_train(
    config: Path,
    overrides: list[str],
    max_steps: int | None,
    overwrite: bool,
    allow_config_change: list[str] | None,
) -> None:
    """The ``train`` command (see :func:`noisecraft.cli.main.train`)."""
    from noisecraft.training.config import load_config
    from noisecraft.training.trainer import Trainer, TrainingInterrupted

    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps must be at least 1, got {max_steps}")
    allowed = _split_keys(allow_config_change)
    cfg = load_config(config, overrides)
    try:
        trainer = Trainer(cfg, overwrite=overwrite, allow_config_change=allowed)
    except KeyboardInterrupt:
        typer.echo("interrupted before training started; nothing was saved", err=True)
        raise typer.Exit(128 + signal.SIGINT) from None
    main = trainer.dist.is_main
    if trainer.dataset.skipped and main:
        typer.echo(f"skipped {trainer.dataset.skipped} unreadable image(s) in {cfg.data.path}")
    if trainer.step and main:
        typer.echo(f"resuming {trainer.run_dir} from step {trainer.step}")
        for key, (old, new) in trainer.config_changes.items():
            typer.echo(f"  {key} changed: {old!r} -> {new!r}")
    try:
        res = trainer.train(max_steps)
    except TrainingInterrupted as e:
        if main:
            name = signal.Signals(e.signum).name
            typer.echo(
                f"\n{name}: stopped at step {e.step}, checkpoint saved in {e.checkpoint}",
                err=True,
            )
            command = resume_command(config, overrides, max_steps, allowed)
            typer.echo(f"resume with: {command}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        if main:
            typer.echo(
                "\ninterrupted again while stopping; the last checkpoint on disk is kept",
                err=True,
            )
        raise typer.Exit(128 + signal.SIGINT) from None
    if main:
        typer.echo(
            f"trained to step {res.step} in {res.seconds:.0f} s ({res.samples_per_second:.1f} "
            f"samples/s); model: {res.run_dir / 'model.safetensors'}"
        )


__all__ = ["resume_command", "run_train"]
