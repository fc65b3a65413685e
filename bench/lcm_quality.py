"""Few-step sampling of the shipped mini SD: the LCM student against its teacher.

The teacher (``mnist-text``) samples 20 steps of DPM++ 2M (Karras, A1111's default) at CFG 5;
the latent consistency student (the teacher with the distilled U-Net,
``assets/mnist_text_lcm_unet.safetensors``, made by ``noisecraft train
configs/mnist_text_lcm.toml``) samples 1, 2 and 4 LCM steps at CFG 1 (one U-Net row per
step). The same prompts and seeds for every row: prompt i is "a handwritten <digit i % 10>",
seed i (each image from its own generator, as the CLI). Scores: the digit accuracy of the
shipped MNIST classifier and FID against the 5,000 MNIST digits in the classifier's
features (biased upwards at small n: compare rows of the same n only). Prints the markdown
table of README / docs/samplers.md.

    python bench/lcm_quality.py                  # n = 100, seeds 0-99
    python bench/lcm_quality.py --student runs/mnist_text_lcm/unet_fp16.safetensors
"""

from __future__ import annotations

import argparse
import time

import torch

from noisecraft.adapters.lcm_student import apply_lcm_student
from noisecraft.api.shipped import ASSETS, resolve_model
from noisecraft.io.native import load_latent_diffusion
from noisecraft.metrics.features import mnist_extractor
from noisecraft.metrics.frechet import fid_from_features
from noisecraft.models import LatentDiffusion
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.training.captions import DIGIT_WORDS
from noisecraft.training.config import DataConfig
from noisecraft.training.data import load_dataset

STUDENT = ASSETS / "mnist_text_lcm_unet.safetensors"
#: (label, sampler, steps, CFG, uses the student)
ROWS = (
    ("teacher", "DPM++ 2M", 20, 5.0, False),
    ("teacher", "DPM++ 2M", 4, 5.0, False),
    ("teacher, not distilled", "LCM", 1, 1.0, False),
    ("teacher, not distilled", "LCM", 2, 1.0, False),
    ("teacher, not distilled", "LCM", 4, 1.0, False),
    ("LCM student", "LCM", 1, 1.0, True),
    ("LCM student", "LCM", 2, 1.0, True),
    ("LCM student", "LCM", 4, 1.0, True),
)


def prompts_and_digits(n: int) -> tuple[list[str], list[int]]:
    """Prompt i asks for digit i % 10."""
    digits = [i % 10 for i in range(n)]
    return [f"a handwritten {DIGIT_WORDS[d]}" for d in digits], digits


def digit_images(
    model: LatentDiffusion, sampler: str, steps: int, cfg: float, seeds: list[int]
) -> torch.Tensor:
    """28x28 digits (the 32x32 images without their 2-pixel padding), seed i for image i."""
    prompts, _ = prompts_and_digits(len(seeds))
    req = GenerateRequest(
        n=len(seeds), prompts=prompts, sampler=sampler, steps=steps, cfg=cfg, seeds=seeds
    )
    return generate(model, req)[..., 2:30, 2:30]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="images per row (seeds 0..n-1)")
    ap.add_argument("--student", default=str(STUDENT), help="an lcm_distill unet_fp16 file")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    teacher = load_latent_diffusion(resolve_model("mnist-text"), args.device)
    student = apply_lcm_student(teacher, args.student)
    extractor = mnist_extractor(device=args.device)
    real = extractor(load_dataset(DataConfig(name="mnist")).images)
    seeds = list(range(args.n))
    _, digits = prompts_and_digits(args.n)
    print("| model | sampler | steps | CFG | U-Net calls / image | digit accuracy | FID | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, sampler, steps, cfg, use_student in ROWS:
        t0 = time.perf_counter()
        images = digit_images(student if use_student else teacher, sampler, steps, cfg, seeds)
        secs = time.perf_counter() - t0
        acc = (extractor.logits(images).argmax(1) == torch.tensor(digits)).float().mean().item()
        fid = fid_from_features(extractor(images), real)
        calls = steps * (2 if cfg > 1 else 1)
        print(
            f"| {label} | {sampler} | {steps} | {cfg:g} | {calls} | {100 * acc:.0f} % | "
            f"{fid:.2f} | {secs:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
