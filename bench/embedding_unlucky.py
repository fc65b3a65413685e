"""The shipped textual-inversion embedding (assets/embeddings/unlucky.safetensors) on the mini SD.

"unlucky" was learned from the fours of MNIST with captions that never name the digit
(configs/mnist_text_ti.toml). 100 images per prompt template (seeds 0-99, DPM++ 2M, 20 steps,
CFG 5): the share the shipped classifier reads as a 4, and the digit histogram. Rows: the word
with the embedding, the same prompts without it (the plain CLIP word, which the base model never
learned), and the embedding's init text "number" (the base draws a 7 for it).
Prints the README's markdown table.

    .venv/bin/python bench/embedding_unlucky.py
"""

from __future__ import annotations

import torch

import noisecraft
from noisecraft.metrics.digit_shape import read_digits

PROMPTS = ("a handwritten {}", "the digit {}")


def fours(pipe, word: str, n: int = 100, seed: int = 0) -> tuple[float, list[int]]:
    """Share of 4s and the digit histogram over ``n`` images of each prompt template."""
    digits = []
    for template in PROMPTS:
        result = pipe(
            [template.format(word)] * n,
            sampler="DPM++ 2M",
            steps=20,
            cfg=5.0,
            seed=seed,
            progress=False,
        )
        digits.append(read_digits(result.tensors))
    d = torch.cat(digits)
    return (d == 4).float().mean().item(), torch.bincount(d, minlength=10).tolist()


def main() -> None:
    with_ti = noisecraft.load("mnist-text")  # the shipped model knows the shipped embeddings
    without = noisecraft.load("mnist-text")
    without.model.textual_inversion = None
    print("| prompt word | embedding | 4s read | digits 0-9 |")
    print("|---|---|---:|---|")
    for word, pipe, label in (
        ("unlucky", with_ti, "unlucky.safetensors"),
        ("unlucky", without, "none (the plain word)"),
        ("number", without, "none (the init text)"),
    ):
        share, hist = fours(pipe, word)
        print(f"| {word} | {label} | {share:.0%} | {hist} |")


if __name__ == "__main__":
    main()
