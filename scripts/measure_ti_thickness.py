"""Measure what a stroke-thickness embedding does on the shipped mini Stable Diffusion.

    python scripts/measure_ti_thickness.py [EMBEDDING] [--token "<thick>"]

100 prompts, ten per digit ("a handwritten seven", "a handwritten seven <thick>" and
"a <thick> handwritten seven"), seeds 0..99 (the same seed with and without the token),
DPM++ 2M (Karras) 20 steps, CFG 5. For each set: mean stroke thickness (ink pixels per
skeleton pixel, noisecraft.metrics.stroke) and the shipped classifier's digit accuracy on
the 28x28 centre. Real MNIST (5,000 digits) and its thickest 10 % are measured for
reference. Prints a Markdown table (README "Textual inversion").
"""

from __future__ import annotations

import argparse

import torch

import noisecraft
from noisecraft.metrics.features import mnist_extractor
from noisecraft.metrics.stroke import stroke_thickness
from noisecraft.training.captions import DIGIT_WORDS
from noisecraft.training.config import DataConfig
from noisecraft.training.data import load_mnist

DEFAULT = "runs/mnist_text_ti/model.safetensors"


def measure(pipe, prompts: list[str], digits: list[int]) -> tuple[float, float, torch.Tensor]:
    """(mean thickness, accuracy, per-image thickness) of the images of ``prompts``."""
    images = []
    for i in range(0, len(prompts), 25):
        r = pipe(prompts[i : i + 25], seed=i, steps=20, cfg=5.0, sampler="dpmpp_2m")
        images.append(r.tensors)
    x = torch.cat(images)
    thick = stroke_thickness(x)
    predicted = mnist_extractor().logits(x[..., 2:30, 2:30]).argmax(1)
    acc = (predicted == torch.tensor(digits)).float().mean().item()
    return thick.mean().item(), acc, thick


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("embedding", nargs="?", default=DEFAULT)
    ap.add_argument("--token", default="<thick>")
    args = ap.parse_args()
    pipe = noisecraft.load("mnist-text")
    pipe.load_embedding(args.embedding, args.token)
    digits = [d for d in range(10) for _ in range(10)]
    plain = [f"a handwritten {DIGIT_WORDS[d]}" for d in digits]
    after = [f"{p} {args.token}" for p in plain]
    before = [p.replace("a handwritten", f"a {args.token} handwritten") for p in plain]
    t0, a0, th0 = measure(pipe, plain, digits)
    t1, a1, th1 = measure(pipe, after, digits)
    t2, a2, th2 = measure(pipe, before, digits)
    real = stroke_thickness(load_mnist(DataConfig(name="mnist", image_size=28)).images)
    top = real.sort(descending=True).values[: len(real) // 10]  # the training images
    print("| images | mean thickness (px) | digit accuracy |")
    print("|---|---|---|")
    print(f"| MNIST, all 5,000 | {real.mean():.2f} | |")
    print(f"| MNIST, thickest 10 % (training set) | {top.mean():.2f} | |")
    print(f'| "a handwritten <digit>" | {t0:.2f} | {a0:.0%} |')
    print(f'| "a handwritten <digit> {args.token}" | {t1:.2f} | {a1:.0%} |')
    print(f'| "a {args.token} handwritten <digit>" | {t2:.2f} | {a2:.0%} |')
    for name, th in (("after", th1), ("before", th2)):
        print(f"token {name}: same seed thicker in {(th > th0).float().mean():.0%} of 100")


if __name__ == "__main__":
    main()
