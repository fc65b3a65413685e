"""Captions for labelled images: a fixed set of varied templates per class.

A text-conditioned model needs prompts, and MNIST has only labels. Each class gets the same
list of templates (:data:`DIGIT_TEMPLATES` for the digit classes "0".."9", with the number
written as a word and as a digit; :data:`GENERIC_TEMPLATES` with the class name for any other
class), and every training step draws one template per image from the step's generator, so
the captions are a pure function of ``(seed, step)`` like every other random choice of the
trainer (exact resume). With probability ``cond_drop_prob`` the caption is replaced by the
empty prompt ``""``, which is what classifier-free guidance (Ho & Salimans 2022) uses as the
unconditional input at sampling time.

The adjectives ("thickly", "thin", "sloppy") are not read off the image: they are noise the
text encoder learns to ignore, so that a prompt phrased in any of these ways still names the
digit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: ``{word}`` = the number as a word ("seven"), ``{digit}`` = as a digit ("7").
DIGIT_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "the number {word} written thickly",
    "a thin {digit}",
    "a sloppy handwritten {digit}",
    "{word}",
    "{digit}",
    "the number {digit}",
    "a neatly written {word}",
    "a bold {digit}",
    "the handwritten digit {word}",
    "a picture of the number {digit}",
    "{word} written by hand",
    "a scribbled {digit}",
    "a white {word} on a black background",
    "the digit {word}",
)

#: ``{name}`` = the class name, with ``_`` and ``-`` read as spaces.
GENERIC_TEMPLATES = (
    "a {name}",
    "a picture of a {name}",
    "{name}",
    "a photo of a {name}",
    "an image of a {name}",
    "a drawing of a {name}",
    "a small {name}",
    "the {name}",
)

#: The unconditional prompt (caption dropout).
EMPTY = ""


def class_captions(name: str) -> tuple[str, ...]:
    """Every caption of class ``name``: digit templates for "0".."9", generic ones otherwise."""
    if name in tuple(map(str, range(10))):
        d = int(name)
        return tuple(t.format(word=DIGIT_WORDS[d], digit=d) for t in DIGIT_TEMPLATES)
    readable = name.replace("_", " ").replace("-", " ").strip()
    return tuple(t.format(name=readable) for t in GENERIC_TEMPLATES)


def caption_table(class_names: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """``table[c][k]``: caption ``k`` of class ``c``."""
    return tuple(class_captions(str(n)) for n in class_names)


def grid_prompt(name: str) -> str:
    """The prompt of a class's row in the training sample grid (its first caption)."""
    return class_captions(str(name))[0]


def draw_caption_choices(
    labels: Tensor,
    counts: Tensor,
    generator: torch.Generator,
    cond_drop_prob: float = 0.0,
) -> Tensor:
    """Template index per image (B,), or -1 where the caption is dropped to ``""``.

    ``counts[c]`` is the number of captions of class ``c``. Two draws from ``generator``, in
    this order, whatever the arguments: one uniform per image picks the template, one decides
    the dropout -- so the stream of the rest of the step does not depend on the data.
    """
    n = counts[labels]
    u = torch.rand(labels.shape[0], generator=generator)
    choice = torch.minimum((u * n).long(), n - 1)
    drop = torch.rand(labels.shape[0], generator=generator) < cond_drop_prob
    return torch.where(drop, torch.full_like(choice, -1), choice)


def sample_captions(
    labels: Tensor,
    generator: torch.Generator,
    *,
    class_names: Sequence[str] = tuple(map(str, range(10))),
    cond_drop_prob: float = 0.0,
) -> list[str]:
    """One caption per label, drawn as the ``text_latent`` task draws them."""
    table = caption_table(class_names)
    counts = torch.tensor([len(c) for c in table])
    choices = draw_caption_choices(labels, counts, generator, cond_drop_prob)
    return [
        EMPTY if k < 0 else table[c][k]
        for c, k in zip(labels.tolist(), choices.tolist(), strict=True)
    ]


__all__ = [
    "DIGIT_TEMPLATES",
    "DIGIT_WORDS",
    "EMPTY",
    "GENERIC_TEMPLATES",
    "caption_table",
    "class_captions",
    "draw_caption_choices",
    "grid_prompt",
    "sample_captions",
]
