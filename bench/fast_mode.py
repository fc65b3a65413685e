"""Fast mode: the quality cost of each fast-mode setting on the shipped mini models.

Speed is measured by ``bench/sd_speed.py --only fast`` (SD 1.5 architecture, ours against
diffusers on the same weights, one process, alternating; docs/performance.md "Fast mode").

Digit accuracy of the shipped text model (100 prompts "a handwritten <word>", ten per digit,
CFG 5, seed 0, read by the shipped MNIST classifier) and FID of the shipped class model
(``--fid-n`` samples, class-balanced, CFG 2, against the 5,000 MNIST test digits with the
MNIST classifier's features, as docs/samplers.md) for each setting.

Run: ``python bench/fast_mode.py`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from noisecraft.nn.quantize import quantize_int8
from noisecraft.pipelines.deepcache import DeepCacheConfig
from noisecraft.pipelines.fast import FastMode

ASSETS = Path(__file__).resolve().parent.parent / "src/noisecraft/assets"


def quality(args: argparse.Namespace) -> None:
    from noisecraft.io.native import load_latent_diffusion, load_pixel_diffusion
    from noisecraft.metrics.features import mnist_extractor
    from noisecraft.metrics.frechet import fid_from_features
    from noisecraft.pipelines import GenerateRequest, generate
    from noisecraft.training.captions import DIGIT_WORDS
    from noisecraft.training.config import DataConfig
    from noisecraft.training.data import load_dataset

    torch.set_num_threads(args.threads)
    extractor = mnist_extractor()
    dc2, dc3, dc21 = (FastMode(DeepCacheConfig(*nb)) for nb in ((2, 2), (3, 2), (2, 1)))
    settings = {  # name: (request fields, int8)
        "DPM++ 2M Uniform 20 steps (reference)": (
            dict(sampler="dpmpp_2m", spacing="linspace", steps=20),
            False,
        ),
        "DPM++ 2M Karras 10 steps": (dict(sampler="dpmpp_2m", spacing="karras", steps=10), False),
        "  + DeepCache N=2 b=2 (FAST)": (
            dict(sampler="dpmpp_2m", spacing="karras", steps=10, fast=dc2),
            False,
        ),
        "  + DeepCache N=2 b=1": (
            dict(sampler="dpmpp_2m", spacing="karras", steps=10, fast=dc21),
            False,
        ),
        "  + DeepCache N=3 b=2": (
            dict(sampler="dpmpp_2m", spacing="karras", steps=10, fast=dc3),
            False,
        ),
        "  + DeepCache N=2 b=2 + int8 linear": (
            dict(sampler="dpmpp_2m", spacing="karras", steps=10, fast=dc2),
            "linear",
        ),
        "DPM++ 2M Karras 10 steps + int8 linear+conv": (
            dict(sampler="dpmpp_2m", spacing="karras", steps=10),
            "conv",
        ),
    }
    text = load_latent_diffusion(ASSETS / "mnist_text.safetensors")
    pixel = load_pixel_diffusion(ASSETS / "mnist.safetensors")
    real = extractor(load_dataset(DataConfig(name="mnist")).images)
    digits = [d for d in range(10) for _ in range(10)]
    prompts = [f"a handwritten {DIGIT_WORDS[d]}" for d in digits]
    classes = [i % 10 for i in range(args.fid_n)]
    print(f"\n| setting | digit accuracy (text, 100) | FID (class model, {args.fid_n}) |")
    print("|---|---:|---:|")
    for name, (fields, int8) in settings.items():
        model = text if not int8 else text.int8(convs=int8 == "conv")
        req = GenerateRequest(n=100, prompts=prompts, cfg=5.0, seed=0, **fields)
        pred = extractor.logits(generate(model, req)[..., 2:30, 2:30]).argmax(1)
        acc = (pred == torch.tensor(digits)).float().mean().item()
        net = pixel
        if int8:
            net = dataclasses.replace(pixel, unet=quantize_int8(pixel.unet, convs=int8 == "conv"))
        images = generate(
            net,
            GenerateRequest(
                n=args.fid_n, classes=classes, cfg=2.0, seed=0, batch_size=500, **fields
            ),
        )
        fid = fid_from_features(extractor(images), real)
        print(f"| {name} | {acc:.2f} | {fid:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--fid-n", type=int, default=1000, help="class-model samples for FID")
    quality(ap.parse_args())


if __name__ == "__main__":
    main()
