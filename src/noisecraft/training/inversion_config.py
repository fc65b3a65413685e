"""The ``[inversion]`` section of a ``textual_inversion`` recipe."""

from __future__ import annotations

from dataclasses import dataclass

from noisecraft.errors import ConfigError
from noisecraft.training.ranges import Float, Int, check_choice, check_numbers


@dataclass(frozen=True)
class InversionConfig:
    """What the ``textual_inversion`` task learns
    (:mod:`noisecraft.training.tasks.textual_inversion`).

    * ``model``: the frozen text-to-image model (a ``latent_diffusion`` file, or the shipped
      ``"mnist-text"``); ``token``: the word the embedding is trained under, ``vectors`` how
      many token vectors it has, initialised from the token embeddings of ``init_text``.
    * ``select``: which images of ``[data]`` to learn from -- ``"all"``, or the ``fraction``
      with the ``"thickest"`` / ``"thinnest"`` strokes (:mod:`noisecraft.metrics.stroke`).
    * ``templates``: captions, ``{token}`` the token, ``{word}`` / ``{digit}`` the label
      (digits) or ``{name}`` (other classes); one drawn per image and step.
    * ``min_snr_gamma``: Min-SNR loss weighting (0 = plain eps MSE).
    """

    model: str = "mnist-text"
    token: str = "<thick>"
    vectors: int = 2
    init_text: str = "bold"
    select: str = "thickest"  # all | thickest | thinnest
    fraction: float = 0.1
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
        check_choice(self, "inversion", "select", ("all", "thickest", "thinnest"))
        if not str(self.token).strip():
            raise ConfigError('inversion.token must be a word, e.g. "<thick>"')
        if not self.templates or any("{token}" not in t for t in self.templates):
            raise ConfigError("every inversion.templates caption must contain {token}")


__all__ = ["InversionConfig"]
