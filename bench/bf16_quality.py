"""What bf16 on the CPU costs in quality: bf16 against fp32, measured (docs/performance.md).

``noisecraft.load(dtype="bf16")`` on the CPU stores the U-Net's weights in bf16 (text encoder,
VAE and the sampler's arithmetic stay fp32). Rows, each bf16 against fp32 on the same inputs:

* ``sd15``: Stable Diffusion 1.5's architecture with random weights (``bench/_sd15.py``):
  one U-Net pass (batch 2, latents of ``--size`` / 8), a ``--steps``-step DPM++ 2M generation
  at CFG 7.5 (SD 1.5's scheduler config, seed 0) with the U-Net in bf16, and one VAE decode
  with the VAE in bf16 (what keeping it fp32 avoids). ``rel`` = max |bf16 - fp32| / max
  |fp32|, ``rms rel`` = RMS(bf16 - fp32) / RMS(fp32); images also in 8-bit levels (max and
  mean |difference| of the [0, 255] pixels).
* ``mnist``: the shipped mini SD (``mnist-text``) through ``noisecraft.load(dtype=...)``:
  ``--n`` prompts "a handwritten <digit i % 10>", seed i, 20 steps DPM++ 2M (Karras) at CFG 5
  (as ``bench/lcm_quality.py``'s teacher row); digit accuracy of the shipped MNIST classifier
  and FID against 5,000 MNIST digits in its features (biased upwards at small n: compare the
  two rows only), plus the pixel differences between the two image sets and the VAE decode
  of the fp32 run's latents in bf16.

    python bench/bf16_quality.py                       # both, 256x256, n = 100
    python bench/bf16_quality.py --only sd15 --size 512
    python bench/bf16_quality.py --only mnist --n 100
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sd15  # noqa: E402
from lcm_quality import prompts_and_digits  # noqa: E402
from sd_speed import loadavg  # noqa: E402

import noisecraft  # noqa: E402
from noisecraft.pipelines import GenerateRequest, generate  # noqa: E402
from noisecraft.pipelines.diffusers_schedulers import SD15_SCHEDULER_CONFIG  # noqa: E402

BF16 = torch.bfloat16
PROMPT = "a photograph of an astronaut riding a horse"


def rel(out: torch.Tensor, ref: torch.Tensor) -> str:
    d, ref = out.float() - ref.float(), ref.float()
    mx = float(d.abs().max() / ref.abs().max())
    rms = float(d.square().mean().sqrt() / ref.square().mean().sqrt())
    return f"{mx:.2e} | {rms:.2e}"


def levels(out: torch.Tensor, ref: torch.Tensor) -> str:
    """Max and mean |difference| of [-1, 1] images as [0, 255] pixels (rounded as saved)."""
    q = lambda x: ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round()  # noqa: E731
    d = (q(out) - q(ref)).abs()
    return f"{d.max():.0f} / {d.mean():.2f}"


def row(what: str, out: torch.Tensor, ref: torch.Tensor, pixels: bool, secs: str = "") -> None:
    px = levels(out, ref) if pixels else "—"
    print(f"| {what} | {rel(out, ref)} | {px} | {secs} |", flush=True)


@torch.inference_mode()
def sd15(size: int, steps: int, tiny: bool) -> None:
    parts = _sd15.build_ours(tiny)
    model = _sd15.latent_diffusion(parts["unet"], parts["vae"], parts["text"])
    torch.manual_seed(0)
    lat = size // 8
    x, t = torch.randn(2, 4, lat, lat), torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, model.unet.config.context_dim)
    request = GenerateRequest(
        n=1,
        prompts=[PROMPT],
        sampler="dpmpp_2m",
        steps=steps,
        cfg=7.5,
        width=size,
        height=size,
        seeds=[0],
        scheduler_config=SD15_SCHEDULER_CONFIG,
    )
    name = "SD 1.5 (tiny)" if tiny else "SD 1.5"
    ref_pass = model.unet(x, t, context=ctx)
    t0 = time.perf_counter()
    ref_image = generate(model, request)
    t32 = time.perf_counter() - t0
    z = torch.randn(1, 4, lat, lat)
    ref_decode = model.vae.decode(z)
    model.unet.to(BF16)  # as noisecraft.load(dtype="bf16") on the CPU
    row(
        f"{name} U-Net pass {size}² b2",
        model.unet(x.to(BF16), t, context=ctx.to(BF16)),
        ref_pass,
        False,
    )
    t0 = time.perf_counter()
    image = generate(model, request)
    t16 = time.perf_counter() - t0
    row(
        f"{name} {steps}-step image {size}² (DPM++ 2M, CFG 7.5)",
        image,
        ref_image,
        True,
        f"{t32:.1f} / {t16:.1f}",
    )
    vae16 = copy.deepcopy(model.vae).to(BF16)
    row(f"{name} VAE decode {size}², VAE in bf16", vae16.decode(z.to(BF16)), ref_decode, True)


@torch.inference_mode()
def mnist(n: int) -> None:
    from noisecraft.metrics.features import mnist_extractor
    from noisecraft.metrics.frechet import fid_from_features
    from noisecraft.training.config import DataConfig
    from noisecraft.training.data import load_dataset

    extractor = mnist_extractor()
    real = extractor(load_dataset(DataConfig(name="mnist")).images)
    prompts, digits = prompts_and_digits(n)
    seeds = list(range(n))
    request = GenerateRequest(
        n=n, prompts=prompts, sampler="DPM++ 2M Karras", steps=20, cfg=5.0, seeds=seeds
    )
    images, scores = {}, []
    for dtype in ("fp32", "bf16"):
        model = noisecraft.load("mnist-text", dtype=dtype).model
        t0 = time.perf_counter()
        images[dtype] = generate(model, request)
        secs = time.perf_counter() - t0
        crops = images[dtype][..., 2:30, 2:30]
        acc = (extractor.logits(crops).argmax(1) == torch.tensor(digits)).float().mean().item()
        fid = fid_from_features(extractor(crops), real)
        scores.append(f"| mnist-text {dtype} | {100 * acc:.0f} % | {fid:.2f} | {secs:.1f} |")
    print(f"\nmnist-text, n = {n} (20 steps DPM++ 2M Karras, CFG 5, seeds 0..{n - 1}):\n")
    print("| model | digit accuracy | FID | s |\n|---|---:|---:|---:|")
    print("\n".join(scores))
    print("\n| bf16 against fp32 | rel (max) | rel (RMS) | 8-bit max / mean | s |")
    print("|---|---:|---:|---:|---:|")
    row(f"mnist-text {n} images, U-Net in bf16", images["bf16"], images["fp32"], True)
    vae = noisecraft.load("mnist-text").model
    z = torch.randn(16, vae.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    vae16 = copy.deepcopy(vae.vae).to(BF16)
    row(
        "mnist-text VAE decode (random latents), VAE in bf16",
        vae16.decode(z.to(BF16)),
        vae.vae.decode(z),
        True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", choices=("sd15", "mnist"), default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--tiny", action="store_true", help="narrow SD 1.5 layouts (development)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"loadavg before: {loadavg()}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, CPU capability {torch.backends.cpu.get_cpu_capability()}\n"
    )
    if args.only in (None, "sd15"):
        print("| bf16 against fp32 | rel (max) | rel (RMS) | 8-bit max / mean | s fp32 / bf16 |")
        print("|---|---:|---:|---:|---:|")
        sd15(args.size, args.steps, args.tiny)
    if args.only in (None, "mnist"):
        mnist(args.n)
    print(f"\nloadavg after: {loadavg()}")


if __name__ == "__main__":
    main()
