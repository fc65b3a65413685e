"""Experiment configuration: a TOML file of frozen dataclasses.

A recipe (``configs/mnist.toml``) has the sections ``[data]``, ``[model]``
(:class:`noisecraft.models.unet.UNetConfig`), ``[diffusion]``, ``[train]`` and
``[run]``. ``noisecraft train CONFIG --set train.lr=1e-4`` overrides any key;
values are parsed as TOML literals (``--set model.channel_mult=[1,2]``).
An unknown key is an error that names the closest known key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from noisecraft.errors import ConfigError, unknown_name
from noisecraft.models.unet import UNetConfig


@dataclass(frozen=True)
class DataConfig:
    """Where images come from. ``name``: mnist | digits | folder."""

    name: str = "mnist"
    path: str = ""  # image folder, for name = "folder"
    image_size: int = 28
    channels: int = 1
    flip: bool = False  # random horizontal flips (not for digits!)
    class_conditional: bool = True  # use labels (mnist, digits, or sub-folders of a folder)
    limit: int = 0  # use only the first N images (0 = all)


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the training objective (DESIGN.md contracts 1 and 5)."""

    schedule: str = "cosine"  # linear | cosine | scaled_linear | sigmoid
    num_steps: int = 1000
    zero_terminal_snr: bool = False
    prediction: str = "eps"  # eps | v | x0
    weighting: str = "none"  # none | min_snr
    min_snr_gamma: float = 5.0
    offset_noise: float = 0.0
    learned_variance: bool = False
    vlb_weight: float = 0.001
    timestep_sampler: str = "uniform"  # uniform | loss-second-moment


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW with linear warm-up, clipping, accumulation, EMA, AMP (CUDA only)."""

    seed: int = 0
    batch_size: int = 64  # global batch (split over processes under torchrun)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 200
    max_steps: int = 4000
    grad_clip: float = 1.0  # 0 = off
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay = min(ema_decay, (1 + n) / (10 + n)) as in many DDPM codes
    cond_drop_prob: float = 0.1  # class label -> null class, for classifier-free guidance
    mixed_precision: str = "no"  # no | fp16 | bf16 (CUDA only; CPU always trains in fp32)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch.set_num_threads (0 = leave as is)


@dataclass(frozen=True)
class RunConfig:
    """Where and how often a run writes: checkpoints, sample grids, CSV log."""

    dir: str = "runs/mnist"
    checkpoint_every: int = 500
    sample_every: int = 500
    sample_steps: int = 20
    sample_sampler: str = "dpmpp_2m"
    sample_cfg: float = 2.0
    log_every: int = 10
    progress: bool = True


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": dataclasses.asdict(self.data),
            "model": self.model.to_dict(),
            "diffusion": dataclasses.asdict(self.diffusion),
            "train": dataclasses.asdict(self.train),
            "run": dataclasses.asdict(self.run),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        sections = {f.name: f.type for f in fields(cls)}
        for key in d:
            if key not in sections:
                raise unknown_name("config section", key, sections)
        model = d.get("model", {})
        try:
            model_cfg = UNetConfig.from_dict(model)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[model]: {e}") from None
        return cls(
            data=_build(DataConfig, d.get("data", {}), "data"),
            model=model_cfg,
            diffusion=_build(DiffusionConfig, d.get("diffusion", {}), "diffusion"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
            run=_build(RunConfig, d.get("run", {}), "run"),
        )


def _build(cls: type, values: dict[str, Any], section: str):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise unknown_name(f"key in [{section}]", key, known)
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{section}.{key} must be true or false, got {value!r}")
        elif isinstance(default, float) and isinstance(value, int):
            value = float(value)
        elif type(default) is not type(value):
            raise ConfigError(f"{section}.{key} must be a {type(default).__name__}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is a TOML literal, else a plain string."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got '{item}'")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set key must look like section.key (e.g. train.lr), got '{key}'")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a TOML recipe (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    doc: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; see configs/ for recipes")
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for item in overrides:
        (section, key), value = parse_override(item)
        doc.setdefault(section, {})[key] = value
    return ExperimentConfig.from_dict(doc)
