"""Experiment configuration: a TOML file of frozen dataclasses.

A recipe (``configs/mnist.toml``) has the sections ``[data]``, ``[model]``
(:class:`noisecraft.models.unet.UNetConfig`), ``[diffusion]``, ``[train]`` and
``[run]``. ``noisecraft train CONFIG --set train.lr=1e-4`` overrides any key;
values are parsed as TOML literals (``--set model.channel_mult=[1,2]``).
An unknown key is an error that names the closest known key.

``[task] name`` picks what is trained (:mod:`noisecraft.training.tasks`), and with it
which sections the recipe may have (:data:`TASK_SECTIONS`):

* ``"pixel"`` (default): a pixel-space U-Net diffusion model -- ``[data]``, ``[model]``,
  ``[diffusion]``, ``[train]``, ``[run]``.
* ``"vae"``: the first stage of latent diffusion (Rombach et al. 2022), a KL autoencoder --
  ``[vae]`` (:class:`~noisecraft.models.vae.VAEConfig`) and ``[vae_loss]``
  (:class:`~noisecraft.training.vae_loss.VAELossConfig`) instead of ``[model]`` /
  ``[diffusion]``.
* ``"text_latent"``: the second stage, a text-conditioned U-Net on the latents of a trained
  VAE -- ``[latent]`` (:class:`LatentConfig`) and ``[text_encoder]``
  (:class:`~noisecraft.models.text_encoder.TextEncoderConfig`) on top of the pixel sections.
* ``"textual_inversion"``: new token vectors for a trained, frozen text-to-image model
  (Gal et al. 2022) -- ``[inversion]`` (:class:`InversionConfig`) with ``[data]``,
  ``[train]``, ``[run]``.
* ``"tiny_decoder"``: a TAESD-like decoder distilled from a trained VAE's decoder --
  ``[latent]`` (the teacher), ``[tiny_decoder]``
  (:class:`~noisecraft.models.tiny_decoder.TinyDecoderConfig`) and ``[distill]``
  (:class:`DistillConfig`) with ``[data]``, ``[train]``, ``[run]``.
* ``"lora"``: a LoRA over a frozen text-to-image model that learns a style keyword --
  ``[lora]`` (:class:`LoRATrainConfig`) with ``[data]``, ``[train]``, ``[run]``.
* ``"lcm_distill"``: a latent consistency student of a trained text-to-image model --
  ``[lcm]`` (:class:`LCMConfig`) with ``[data]``, ``[train]``, ``[run]``.
* ``"controlnet"``: a ControlNet for a frozen text-to-image model -- ``[controlnet]``
  (:class:`ControlNetTrainConfig`) with ``[data]``, ``[train]``, ``[run]``.

A section the chosen task does not use is an error (so a forgotten ``[task]`` line does not
silently train the wrong thing). Every number is checked against its range when a section is
built (:mod:`noisecraft.training.ranges`), and no float may be ``nan`` or ``inf``.

Resuming (:mod:`noisecraft.training.resume`) compares the run's saved config with the new one:
:data:`FREE_KEYS` may change freely between runs; any other change breaks exact resume and must
be allowed by name.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from noisecraft.errors import ConfigError, NoisecraftError, unknown_name
from noisecraft.models.text_encoder import TextEncoderConfig
from noisecraft.models.tiny_decoder import TinyDecoderConfig
from noisecraft.models.unet import UNetConfig
from noisecraft.models.vae import VAEConfig
from noisecraft.samplers.registry import lookup as lookup_sampler
from noisecraft.training.adapter_configs import (
    ControlNetTrainConfig,
    InversionConfig,
    LCMConfig,
    LoRATrainConfig,
)
from noisecraft.training.ranges import Float, Int, check_choice, check_numbers, non_finite
from noisecraft.training.vae_loss import VAELossConfig

#: The sections each task reads (besides ``[task]``), in the order ``to_dict`` writes them.
TASK_SECTIONS: dict[str, tuple[str, ...]] = {
    "pixel": ("data", "model", "diffusion", "train", "run"),
    "vae": ("data", "vae", "vae_loss", "train", "run"),
    "text_latent": ("data", "latent", "text_encoder", "model", "diffusion", "train", "run"),
    "tiny_decoder": ("data", "latent", "tiny_decoder", "distill", "train", "run"),
    "lora": ("data", "lora", "train", "run"),
    "textual_inversion": ("data", "inversion", "train", "run"),
    "lcm_distill": ("data", "lcm", "train", "run"),
    "controlnet": ("data", "controlnet", "train", "run"),
}


@dataclass(frozen=True)
class TaskConfig:
    """What the trainer trains: ``pixel`` | ``vae`` | ``text_latent`` (see the module doc)."""

    name: str = "pixel"

    def __post_init__(self) -> None:
        if self.name not in TASK_SECTIONS:
            raise unknown_name("task", str(self.name), TASK_SECTIONS)


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
    pad: int = 0  # pixels of background (-1) added on each side before resizing (28 + 2*2 = 32)
    # mnist only: "all" | "train" (without the held-out digits) | "heldout" (the 1,000 digits,
    # 100 per class, that the shipped classifier was not trained on: mnist_net.heldout_split)
    split: str = "all"

    def __post_init__(self) -> None:
        check_numbers(self, "data", image_size=Int(1), limit=Int(0), pad=Int(0))
        check_choice(self, "data", "split", ("all", "train", "heldout"))
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ConfigError(f"data.channels must be 1 or 3, got {self.channels!r}")


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

    def __post_init__(self) -> None:
        check_numbers(
            self,
            "diffusion",
            num_steps=Int(2, MAX_TIMESTEPS),
            min_snr_gamma=Float(0, lo_open=True),
            offset_noise=Float(0),
            vlb_weight=Float(0),
        )


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

    def __post_init__(self) -> None:
        check_numbers(
            self,
            "train",
            seed=Int(0, MAX_SEED),
            batch_size=Int(1),
            grad_accum=Int(1),
            lr=Float(0, lo_open=True),
            weight_decay=Float(0),
            warmup_steps=Int(0),
            max_steps=Int(1),
            grad_clip=Float(0),
            ema_decay=Float(0, 1),
            cond_drop_prob=Float(0, 1),
            threads=Int(0, MAX_THREADS),
        )
        betas = self.betas
        beta = Float(0, 1, hi_open=True)
        if (
            not isinstance(betas, (list, tuple))
            or len(betas) != 2
            or any(beta.problem(b) for b in betas)
        ):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {betas!r}")
        object.__setattr__(self, "betas", tuple(betas))
        check_choice(self, "train", "mixed_precision", ("no", "fp16", "bf16"))
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum "
                f"({self.grad_accum})"
            )


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

    def __post_init__(self) -> None:
        if not isinstance(self.dir, str) or not self.dir.strip():
            raise ConfigError(f"run.dir must name a folder, got {self.dir!r}")
        check_numbers(
            self,
            "run",
            checkpoint_every=Int(0),
            sample_every=Int(0),
            sample_steps=Int(1),
            sample_cfg=Float(),
            log_every=Int(1),
        )
        try:  # an unknown name fails now, not at the first sample grid
            lookup_sampler(self.sample_sampler)
        except NoisecraftError as e:
            raise ConfigError(f"run.sample_sampler: {e}") from None


@dataclass(frozen=True)
class LatentConfig:
    """Where the latents of the ``text_latent`` task come from.

    * ``vae``: the ``model.safetensors`` of a trained VAE run (checkpoint kind ``"vae"``); its
      config carries the ``scaling_factor`` measured at the end of VAE training.
    * ``posterior``: encode each image once with the posterior ``"mode"`` (its mean) or one
      ``"sample"`` (drawn with ``train.seed``); the scaled latents are cached in memory.
    * ``encode_batch_size``: images per VAE forward pass while caching.
    """

    vae: str = ""
    posterior: str = "mode"  # mode | sample
    encode_batch_size: int = 256

    def __post_init__(self) -> None:
        check_numbers(self, "latent", encode_batch_size=Int(1))


@dataclass(frozen=True)
class DistillConfig:
    """What the ``tiny_decoder`` task fits (:mod:`noisecraft.training.tasks.tiny_decoder`).

    * ``target``: ``"vae"`` -- the teacher VAE decoder's own output on each latent
      (distillation), or ``"images"`` -- the dataset's images.
    * ``gradient_weight``: weight of an L1 loss on the images' horizontal and vertical finite
      differences (sharp edges), added to the pixel L1; 0 = off.
    * ``latent_noise``: std of Gaussian noise added to the (scaled) input latents at each step,
      so the decoder also sees latents a little off the encoder's (as sampled ones are).
    """

    target: str = "vae"  # vae | images
    gradient_weight: float = 0.0
    latent_noise: float = 0.0

    def __post_init__(self) -> None:
        check_numbers(self, "distill", gradient_weight=Float(0), latent_noise=Float(0))


#: Largest ``train.seed``: the step generators seed with ``(seed * 1_000_003 + step) * 7``,
#: which must stay below 2**64.
MAX_SEED = 2**32 - 1
#: Largest ``diffusion.num_steps`` (DDPM uses 1000, improved DDPM 4000).
MAX_TIMESTEPS = 100_000
#: Largest ``train.threads`` (torch crashes at exit after a million).
MAX_THREADS = 1024
#: Largest recipe file read: a TOML recipe is a few kB; a bigger file is not one.
MAX_RECIPE_BYTES = 1_000_000

#: Keys that may change between a checkpoint and the run that resumes it: they say where the
#: run computes (device, threads), how long (max_steps) and what it writes along the way
#: (run.*), not what it computes. The same device gives the same loss curve bit for bit.
FREE_KEYS = frozenset({"train.max_steps", "train.device", "train.threads"})
FREE_SECTIONS = frozenset({"run"})

#: Sections built by a model config's own ``from_dict`` (unknown keys name the closest).
_MODEL_SECTIONS = {
    "model": UNetConfig,
    "vae": VAEConfig,
    "text_encoder": TextEncoderConfig,
    "tiny_decoder": TinyDecoderConfig,
}


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_loss: VAELossConfig = field(default_factory=VAELossConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    tiny_decoder: TinyDecoderConfig = field(default_factory=TinyDecoderConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoRATrainConfig = field(default_factory=LoRATrainConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    lcm: LCMConfig = field(default_factory=LCMConfig)
    controlnet: ControlNetTrainConfig = field(default_factory=ControlNetTrainConfig)

    def __post_init__(self) -> None:
        if "diffusion" in self.sections and self.run.sample_steps > self.diffusion.num_steps:
            raise ConfigError(
                f"run.sample_steps ({self.run.sample_steps}) must be at most "
                f"diffusion.num_steps ({self.diffusion.num_steps})"
            )

    @property
    def sections(self) -> tuple[str, ...]:
        """The sections the chosen task uses (besides ``task``)."""
        return TASK_SECTIONS[self.task.name]

    def to_dict(self) -> dict[str, Any]:
        """``task`` and the sections the task uses, as plain JSON-able dicts."""
        out: dict[str, Any] = {"task": dataclasses.asdict(self.task)}
        for name in self.sections:
            value = getattr(self, name)
            out[name] = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise unknown_name("config section", key, known)
        for key, value in d.items():
            non_finite(value, key)
        task = _build(TaskConfig, d.get("task", {}), "task")
        used = TASK_SECTIONS[task.name]
        for key in d:
            if key != "task" and key not in used:
                users = [name for name, secs in TASK_SECTIONS.items() if key in secs]
                raise ConfigError(
                    f"[{key}] is not used by task '{task.name}' (it belongs to "
                    f"task.name = {' | '.join(repr(u) for u in users)}); "
                    f"remove [{key}] or set task.name"
                )
        kwargs: dict[str, Any] = {"task": task}
        for f in fields(cls):
            if f.name == "task" or f.name not in d:
                continue
            if f.name in _MODEL_SECTIONS:
                kwargs[f.name] = _build_model_config(_MODEL_SECTIONS[f.name], d[f.name], f.name)
            else:
                kwargs[f.name] = _build(_SECTION_TYPES[f.name], d[f.name], f.name)
        return cls(**kwargs)


_SECTION_TYPES: dict[str, type] = {
    "data": DataConfig,
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
    "run": RunConfig,
    "vae_loss": VAELossConfig,
    "latent": LatentConfig,
    "distill": DistillConfig,
    "lora": LoRATrainConfig,
    "inversion": InversionConfig,
    "lcm": LCMConfig,
    "controlnet": ControlNetTrainConfig,
}


def _build_model_config(cls: type, values: Any, section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
    try:
        return cls.from_dict(values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{section}]: {e}") from None


def _build(cls: type, values: dict[str, Any], section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise unknown_name(f"key in [{section}]", key, known)
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{section}.{key} must be a list, got {value!r}")
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
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"--set key must look like section.key (e.g. train.lr), got '{key}'")
    try:
        doc = tomllib.loads(f"v = {raw}")
    except (tomllib.TOMLDecodeError, RecursionError):
        doc = {}
    value = doc["v"] if set(doc) == {"v"} else raw  # "1\n[x]" is text, not a table
    return [p.strip() for p in parts], value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a TOML recipe (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    doc: dict[str, Any] = {}
    if path is not None:
        doc = _read_toml(Path(path))
    for item in overrides:
        (section, key), value = parse_override(item)
        doc.setdefault(section, {})[key] = value
    return ExperimentConfig.from_dict(doc)


def _read_toml(path: Path) -> dict[str, Any]:
    """The TOML document of a recipe file, or a one-line :class:`ConfigError`."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a TOML recipe file such as configs/mnist.toml")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; see configs/ for recipes")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise ConfigError(
                f"{path} is {size / 1e6:.1f} MB, not a TOML recipe (a few kB); "
                "see configs/ for recipes"
            )
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not a TOML text file (byte {e.object[e.start]:#04x} at offset "
            f"{e.start} is not UTF-8); give a recipe such as configs/mnist.toml"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path} is not valid TOML: values nested too deeply") from None


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (saved, current)}`` for every key whose value differs between two
    :meth:`ExperimentConfig.to_dict` documents (compared as JSON: tuples are lists).

    A key present on one side only (a setting added to noisecraft since the run was saved)
    is not a change."""
    import json

    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    out: dict[str, tuple[Any, Any]] = {}
    for section in sorted(set(saved) & set(current)):
        old, new = saved[section], current[section]
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                out[section] = (old, new)
            continue
        for key in sorted(set(old) & set(new)):
            if old[key] != new[key]:
                out[f"{section}.{key}"] = (old[key], new[key])
    return out


def is_free_key(key: str) -> bool:
    """Whether changing ``section.key`` keeps a resumed run exact (:data:`FREE_KEYS`)."""
    return key in FREE_KEYS or key.split(".", 1)[0] in FREE_SECTIONS
