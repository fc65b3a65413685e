"""Resuming a run from its ``checkpoint.pt``: read it safely, and check the config.

Reading: the checkpoint goes through :func:`noisecraft.io.safe_read.load_pickle`
(``weights_only=True``): a pickle that would run code, a truncated file or one that is not a
noisecraft training checkpoint is refused in one line, before anything is loaded.

The config rule (:func:`check_config_change`): the checkpoint holds the config it was trained
with; the new run's config is compared with it key by key.

* ``task.name`` and the task's ``resume_sections`` (the model's architecture and, for the
  diffusion tasks, the ``[diffusion]`` objective): never; a different model is a new run.
* :data:`~noisecraft.training.config.FREE_KEYS` / ``FREE_SECTIONS`` (``train.max_steps``,
  ``train.device``, ``train.threads``, every ``run.*`` key): freely -- they do not change
  what a step computes.
* any other key (``train.batch_size``, ``train.lr``, ``data.*``, ...): only when allowed by
  name (``allow={"train.batch_size"}``), because the resumed run then no longer equals an
  uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from noisecraft.errors import CheckpointError, ConfigError, closest
from noisecraft.io.safe_read import load_pickle
from noisecraft.training.config import config_changes, is_free_key

#: What a training checkpoint holds (``Trainer.save``).
STATE_KEYS = ("step", "model", "ema", "opt", "lr_sched", "scaler", "config")

_START_OVER = "move it away, or pass @overwrite to start the run over"


def read_training_state(path: Path, device: torch.device) -> dict[str, Any]:
    """The state dict of a training checkpoint, or a one-line :class:`CheckpointError`."""
    try:
        state = load_pickle(
            path, map_location=device, mmap=False, refused=_START_OVER, corrupt=_START_OVER
        )
    except CheckpointError as e:
        raise CheckpointError(e.template, settings=["overwrite"]) from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(
            f"{path} is not a noisecraft training checkpoint (no {', '.join(missing)}); "
            + _START_OVER,
            settings=["overwrite"],
        )
    step = state["step"]
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = int(step)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(
            f"{path} holds a bad step ({step!r}); " + _START_OVER, settings=["overwrite"]
        )
    state["step"] = step
    try:
        saved = json.loads(state["config"])
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path} holds an unreadable config ({e}); " + _START_OVER, settings=["overwrite"]
        ) from None
    state["config"] = saved
    return state


def _flat_keys(config: dict[str, Any]) -> list[str]:
    return [f"{s}.{k}" for s, sec in config.items() if isinstance(sec, dict) for k in sec]


def check_config_change(
    path: Path,
    saved: dict[str, Any],
    current: dict[str, Any],
    resume_sections: tuple[str, ...],
    allow: frozenset[str] | set[str] = frozenset(),
) -> dict[str, tuple[Any, Any]]:
    """Refuse a config change that breaks exact resume (see the module doc); return every
    change that is made (free keys and allowed ones) as ``{key: (saved, current)}``."""
    known = _flat_keys(current)
    for key in sorted(allow):
        if key not in known:
            guess = closest(key, known)
            hint = f"; did you mean '{guess}'?" if guess else " (give section.key, e.g. train.lr)"
            raise ConfigError(
                f"@allow_config_change names '{key}', which is not a key of this config{hint}",
                settings=["allow_config_change"],
            )
    saved_task = saved.get("task", {}).get("name", "pixel")
    task = current["task"]["name"]
    if saved_task != task:
        raise ConfigError(
            f"{path} is a '{saved_task}' run, this config trains '{task}'; "
            "use the same config to resume, or pass @overwrite to start over",
            settings=["overwrite"],
        )
    changes = config_changes(saved, current)
    for section in resume_sections:
        fixed = {k: v for k, v in changes.items() if k.split(".", 1)[0] == section}
        if section in changes or fixed:
            raise ConfigError(
                f"{path} was trained with a different [{section}] config ({_describe(fixed)}); "
                "use the same config to resume, or pass @overwrite to start over",
                settings=["overwrite"],
            )
    refused = {k: v for k, v in changes.items() if not is_free_key(k) and k not in allow}
    if refused:
        keys = ",".join(refused)
        them = "it" if len(refused) == 1 else "them"
        raise ConfigError(
            f"{path} was trained with other settings ({_describe(refused)}); changing "
            f"{them} breaks exact resume: restore {them}, allow the change with "
            f"@allow_config_change {keys}, or pass @overwrite to start over",
            settings=["allow_config_change", "overwrite"],
        )
    return changes


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())


__all__ = ["STATE_KEYS", "check_config_change", "read_training_state"]
