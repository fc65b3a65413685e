"""A sampler on noisecraft's old grid against AUTOMATIC1111's default grid, on the shipped models.

For each sampler, step count, guidance scale and grid (``--grids``), ``--n`` digits are drawn
with the same seed: by default on the linspace grid noisecraft 0.1.0 used for every sampler
("old") and on the sampler's A1111 default ("auto": ``Schedule type: Automatic``, e.g.
exponential sigmas with the next-to-last one dropped for DPM++ 3M SDE). Scores: the digit
accuracy of the shipped MNIST classifier (the digit the prompt or class label asked for) and
FID against the 5,000 MNIST digits in the classifier's features (with ``--n`` samples; FID is
biased upwards at small n, so compare rows of the same n only). Prints markdown rows for
docs/samplers.md.

Latent models draw each image from its own seed and so run stochastic samplers one image at
a time; to keep a cell to minutes, the images here are drawn as one batch from one generator
seeded 0 (``--per-image-seeds``: the CLI's rule). Same sampler and grid, other noise.

    python bench/a1111_defaults.py --model mnist-text --sampler "DPM++ 3M SDE" --n 300
    python bench/a1111_defaults.py --model mnist --cfg 2 --n 1000
    python bench/a1111_defaults.py --steps 20 --cfg 7 --grids exponential,linspace+discard
"""

from __future__ import annotations

import argparse
import time

import torch

from noisecraft.api.shipped import resolve_model
from noisecraft.io.formats.auto import load_any
from noisecraft.metrics.features import mnist_extractor
from noisecraft.metrics.frechet import fid_from_features
from noisecraft.models import LatentDiffusion
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.samplers import SamplerSpec, parse_sampler
from noisecraft.training.captions import DIGIT_WORDS
from noisecraft.training.config import DataConfig
from noisecraft.training.data import load_dataset


def _grid(token: str, sampler: str) -> SamplerSpec:
    if token == "old":
        return parse_sampler(sampler, "linspace", discard_penultimate_sigma=False)
    if token == "auto":
        return parse_sampler(sampler)
    spacing, _, discard = token.partition("+")
    return parse_sampler(sampler, spacing, discard_penultimate_sigma=discard == "discard")


def _label(token: str, sampler: str) -> str:
    spec = _grid(token, sampler)
    label = f"{spec.schedule}{', discard' if spec.discard_penultimate_sigma else ''}"
    if token == "old":
        return f"{label} (noisecraft 0.1.0)"
    return f"{label} (A1111 default)" if token == "auto" else label


class _OneGenerator:
    """The model, drawing a whole batch's noise from one generator (``per_image_seeds``
    False: generate()'s rule for pixel models)."""

    per_image_seeds = False

    def __init__(self, model: LatentDiffusion):
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="mnist-text", help="mnist-text | mnist | a file")
    ap.add_argument("--sampler", action="append", help="repeatable (default DPM++ 3M SDE)")
    ap.add_argument("--n", type=int, default=500, help="images per cell")
    ap.add_argument("--steps", default="10,20,30")
    ap.add_argument("--cfg", default="3,7")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--grids",
        default="old,auto",
        help="old (linspace, no discard: noisecraft 0.1.0), auto (the A1111 default), or a "
        "spacing, optionally +discard (e.g. exponential, linspace+discard)",
    )
    ap.add_argument("--per-image-seeds", action="store_true", help="seed i for image i (slow)")
    args = ap.parse_args()

    model = load_any(resolve_model(args.model), device=args.device)
    latent = isinstance(model, LatentDiffusion)
    if latent and not args.per_image_seeds:
        model = _OneGenerator(model)
    extractor = mnist_extractor(device=args.device)
    real = extractor(load_dataset(DataConfig(name="mnist")).images)
    digits = [i % 10 for i in range(args.n)]
    cond = (
        {"prompts": [f"a handwritten {DIGIT_WORDS[d]}" for d in digits]}
        if latent
        else {"classes": digits}
    )
    print("| model | sampler | steps | CFG | grid | digit accuracy | FID | seconds |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for name in args.sampler or ["DPM++ 3M SDE"]:
        grids = {_label(g, name): _grid(g, name) for g in args.grids.split(",")}
        for steps in (int(s) for s in args.steps.split(",")):
            for cfg in (float(c) for c in args.cfg.split(",")):
                for label, spec in grids.items():
                    req = GenerateRequest(
                        n=args.n, sampler=spec, steps=steps, cfg=cfg, seed=0, batch_size=500, **cond
                    )
                    t0 = time.perf_counter()
                    images = generate(model, req)
                    secs = time.perf_counter() - t0
                    if latent:  # 32x32 digits: MNIST's 28x28 padded by 2 px
                        images = images[..., 2:30, 2:30]
                    logits = extractor.logits(images)
                    acc = (logits.argmax(1) == torch.tensor(digits)).float().mean().item()
                    fid = fid_from_features(extractor(images), real)
                    print(
                        f"| {args.model} | {spec.record.display} | {steps} | {cfg:g} | {label} | "
                        f"{100 * acc:.1f} % | {fid:.2f} | {secs:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
