"""The shipped style LoRA (assets/loras/mnist_tiny.safetensors) on the shipped mini SD.

100 prompts "a handwritten <word>" (10 per digit, seeds 0-99, DPM++ 2M, 20 steps, CFG 5), with
and without the keyword "tiny", with and without the LoRA. Scores
(:func:`noisecraft.metrics.digit_shape.tiny_style_scores`): the share of tiny digits (ink
<= 14 px tall), of tiny digits the shipped classifier reads as asked once enlarged, and of
normal-sized digits it reads as asked. Prints the README's markdown table.

    .venv/bin/python bench/lora_style.py [--lora PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import noisecraft
from noisecraft.api.shipped import ASSETS
from noisecraft.metrics.digit_shape import tiny_style_scores
from noisecraft.training.captions import DIGIT_WORDS
from noisecraft.training.styles import TINY_SCALE

SHIPPED = ASSETS / "loras" / "mnist_tiny.safetensors"
DIGITS = [d for d in range(10) for _ in range(10)]


def scores(pipe, keyword: str, lora: str | None = None, digits=DIGITS, seed: int = 0) -> dict:
    """Scores of one row: ``lora`` is a ``<lora:…>`` tag added to every prompt (or None)."""
    suffix = f", {keyword}" if keyword else ""
    tag = f" {lora}" if lora else ""
    prompts = [f"a handwritten {DIGIT_WORDS[d]}{suffix}{tag}" for d in digits]
    result = pipe(prompts, sampler="DPM++ 2M", steps=20, cfg=5.0, seed=seed, progress=False)
    return tiny_style_scores(result.tensors, torch.tensor(digits), TINY_SCALE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora", default=str(SHIPPED))
    args = ap.parse_args()
    path = Path(args.lora)
    pipe = noisecraft.load("mnist-text", lora_dir=None if path == SHIPPED else path.parent)
    tag = f"<lora:{path.stem}:1>"
    print("| LoRA | prompt | tiny | tiny, digit read | normal size, digit read |")
    print("|---|---|---:|---:|---:|")
    for lora in (None, tag):
        for kw in ("", "tiny"):
            s = scores(pipe, kw, lora)
            prompt = '"a handwritten seven' + (', tiny"' if kw else '"')
            print(
                f"| {'yes' if lora else 'no'} | {prompt} | {s['tiny']:.0%} | "
                f"{s['tiny_and_read']:.0%} | {s['normal_and_read']:.0%} |"
            )


if __name__ == "__main__":
    main()
