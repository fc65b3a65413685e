"""The recipe sections of the adapter-training tasks (kept apart from :mod:`.config`, which
builds them): ``[lora]`` of the ``lora`` task."""

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


__all__ = ["LoRATrainConfig"]
