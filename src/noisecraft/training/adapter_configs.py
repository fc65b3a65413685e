"""The recipe sections of the adapter-training tasks (kept apart from :mod:`.config`, which
builds them): ``[lora]`` of the ``lora`` task, ``[inversion]`` of ``textual_inversion``,
``[lcm]`` of ``lcm_distill``, ``[controlnet]`` of ``controlnet``."""

from __future__ import annotations

from dataclasses import dataclass

from noisecraft.errors import ConfigError
from noisecraft.training.ranges import Float, Int, check_choice, check_numbers
from noisecraft.training.styles import STYLES


@dataclass(frozen=True)
class LoRATrainConfig:
    """What the ``lora`` task trains (:mod:`noisecraft.training.tasks.lora`).

    * ``base``: the frozen model (a shipped name such as ``"mnist-text"`` or a file path).
    * ``rank`` / ``alpha``: the low-rank deltas ``(alpha / rank) * up @ down`` (kohya's scale).
    * ``layers``: ``"attention"`` (the U-Net's transformer blocks: q, k, v, out, feed-forward,
      proj_in / proj_out) or ``"all"`` (also its ResBlock and sampling convolutions, LoCon);
      ``text_encoder``: also the text encoder's attention and MLP layers.
    * ``style`` / ``keyword`` / ``style_prob``: a share ``style_prob`` of the images is drawn
      in ``style`` (:mod:`noisecraft.training.styles`) and only their captions carry
      ``keyword``, so the LoRA learns the style on the keyword and leaves the rest alone.
    * ``min_snr_gamma``: Min-SNR-gamma loss weighting (0 = plain MSE).
    """

    base: str = "mnist-text"
    rank: int = 8
    alpha: float = 8.0
    layers: str = "attention"  # attention | all
    text_encoder: bool = True
    style: str = "tiny"
    keyword: str = "tiny"
    style_prob: float = 0.5
    min_snr_gamma: float = 5.0

    def __post_init__(self) -> None:
        check_numbers(
            self,
            "lora",
            rank=Int(1, 4096),
            alpha=Float(0, lo_open=True),
            style_prob=Float(0, 1),
            min_snr_gamma=Float(0),
        )
        check_choice(self, "lora", "layers", ("attention", "all"))
        check_choice(self, "lora", "style", STYLES)
        if not isinstance(self.keyword, str) or not self.keyword.strip():
            raise ConfigError("lora.keyword must be a word that triggers the style")


@dataclass(frozen=True)
class InversionConfig:
    """What the ``textual_inversion`` task learns
    (:mod:`noisecraft.training.tasks.textual_inversion`).

    * ``model``: the frozen text-to-image model (a ``latent_diffusion`` file, or the shipped
      ``"mnist-text"``); ``token``: the word the embedding is trained under, ``vectors`` how
      many token vectors it has, initialised from the token embeddings of ``init_text``.
    * ``select``: which images of ``[data]`` to learn from -- ``"all"``, the ``fraction``
      with the ``"thickest"`` / ``"thinnest"`` strokes (:mod:`noisecraft.metrics.stroke`), or
      the images of the class names in ``classes`` (``"classes"``).
    * ``templates``: captions, ``{token}`` the token, ``{word}`` / ``{digit}`` the label
      (digits) or ``{name}`` (other classes); one drawn per image and step.
    * ``min_snr_gamma``: Min-SNR loss weighting (0 = plain eps MSE).
    """

    model: str = "mnist-text"
    token: str = "<thick>"
    vectors: int = 2
    init_text: str = "bold"
    select: str = "thickest"  # all | thickest | thinnest | classes
    fraction: float = 0.1
    classes: tuple[str, ...] = ()
    templates: tuple[str, ...] = (
        "a handwritten {word} {token}",
        "a {token} {digit}",
        "the digit {digit} {token}",
        "a {token} handwritten {word}",
        "{token} {word}",
        "the number {digit}, {token}",
    )
    min_snr_gamma: float = 5.0

    def __post_init__(self) -> None:
        check_numbers(
            self,
            "inversion",
            vectors=Int(1, 75),
            fraction=Float(0, 1, lo_open=True),
            min_snr_gamma=Float(0),
        )
        check_choice(self, "inversion", "select", ("all", "thickest", "thinnest", "classes"))
        if any(not isinstance(c, (str, int)) or isinstance(c, bool) for c in self.classes):
            raise ConfigError(f"inversion.classes must be class names, got {list(self.classes)!r}")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if (self.select == "classes") != bool(self.classes):
            raise ConfigError(
                'inversion.classes lists the classes to learn from, with select = "classes" only'
            )
        if not str(self.token).strip():
            raise ConfigError('inversion.token must be a word, e.g. "<thick>"')
        if not self.templates or any(
            not isinstance(t, str) or "{token}" not in t for t in self.templates
        ):
            raise ConfigError("every inversion.templates caption must contain {token}")


@dataclass(frozen=True)
class LCMConfig:
    """Latent consistency distillation (:mod:`noisecraft.training.tasks.lcm_distill`).

    * ``teacher``: a native ``latent_diffusion`` file (e.g. the shipped mini SD).
    * ``guidance_min`` / ``guidance_max``: the teacher's CFG scale, drawn per sample
      uniformly in this range (``u + g (c - u)``), baked into the student.
    * ``original_steps``: the DDIM grid of the teacher solver (skip ``k = T // original_steps``).
    * ``target_decay``: EMA decay of the target network (0: the student itself, no grad).
    * ``huber_c``: pseudo-Huber constant of the loss (0: squared error).
    """

    teacher: str = ""
    guidance_min: float = 5.0
    guidance_max: float = 5.0
    original_steps: int = 50
    target_decay: float = 0.95
    huber_c: float = 0.001

    def __post_init__(self) -> None:
        check_numbers(
            self,
            "lcm",
            guidance_min=Float(0),
            guidance_max=Float(0),
            original_steps=Int(1),
            target_decay=Float(0, 1, hi_open=True),
            huber_c=Float(0),
        )
        if self.guidance_max < self.guidance_min:
            raise ConfigError("lcm.guidance_max must be >= lcm.guidance_min")


@dataclass(frozen=True)
class ControlNetTrainConfig:
    """What the ``controlnet`` task trains (:mod:`noisecraft.training.tasks.controlnet`).

    * ``base``: the frozen ("locked") text-to-image model (a shipped name or a file); the
      ControlNet is a trainable copy of its U-Net's encoder (``ControlNet.from_unet``).
    * ``preprocess``: the pipeline's preprocessor that turns each training image into its
      hint (``canny``, ``scribble``, ``threshold``), so generation uses the same function.
    * ``hint_channels``: the widths of the hint encoder (one level per 2x of the hint over the
      latent size; cldm's are 16, 32, 96, 256).
    * ``min_snr_gamma``: Min-SNR-gamma loss weighting (0 = plain MSE).

    The share of empty prompts is ``train.cond_drop_prob`` (the original drops 50 %).
    """

    base: str = "mnist-text"
    preprocess: str = "canny"
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)
    min_snr_gamma: float = 5.0

    def __post_init__(self) -> None:
        check_numbers(self, "controlnet", min_snr_gamma=Float(0))
        check_choice(self, "controlnet", "preprocess", ("canny", "scribble", "threshold"))
        h = self.hint_channels
        if not h or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in h):
            raise ConfigError(
                f"controlnet.hint_channels must be a list of positive integers, got {list(h)!r}"
            )


__all__ = ["ControlNetTrainConfig", "InversionConfig", "LCMConfig", "LoRATrainConfig"]
