"""The tiny TAESD-like decoder: decode speed at Stable Diffusion size, and its quality cost on
the shipped mini Stable Diffusion (noisecraft issue 7, point 3).

Speed (``--speed``, default on): one process, decoders alternating in each repeat, the median
of ``--repeats`` timings per decoder; latents (1, 4, size/8, size/8) -> an image (1, 3, size,
size), float32 on the CPU, no gradients:

* tiny: :class:`~noisecraft.models.tiny_decoder.TinyDecoder` with TAESD's SD config
  (width 64, 3 blocks per level, f=8; random weights -- speed does not depend on them);
* ours: noisecraft's KL-VAE decoder with SD 1.5's architecture (``VAEConfig.sd()``,
  ``AutoencoderKL.decode_latents``, random weights as bench/_sd15.py builds them);
* diffusers: diffusers' ``AutoencoderKL.decode`` sharing those weights.

Quality (``--quality``): the shipped text-to-image model (assets/mnist_text.safetensors) and
the shipped tiny decoder (assets/mnist_text_tiny_decoder.safetensors). The latents of
``--fid-n`` generated images (prompts "a handwritten <digit>", digits in turn, DPM++ 2M 20
steps on the linspace grid, CFG 5, seeds 0..n-1; the first 100 are the prompts and seeds of
tests/test_shipped_text_model.py, which runs DPM++ 2M's default Karras grid) are decoded
by the VAE and by the tiny decoder; reported: the digit accuracy of the MNIST classifier on
both, FID with the MNIST features (noisecraft.metrics) of each against the 5,000 MNIST digits
of ``data.name = "mnist"`` (the training set of the VAE, the U-Net and the tiny decoder: there
is no held-out split) and of tiny against VAE, and the PSNR of the tiny decode against the VAE
decode (images in [-1, 1], peak-to-peak 2), on those latents and on the encoded digits.

    .venv/bin/python bench/tiny_decoder.py --size 512 --repeats 3
    .venv/bin/python bench/tiny_decoder.py --no-speed --quality
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _sd15 import build_vae, diffusers_vae

from noisecraft.io.native import load_tiny_decoder
from noisecraft.models.tiny_decoder import TinyDecoder, TinyDecoderConfig
from noisecraft.models.vae import VAEConfig

ASSETS = Path(__file__).resolve().parent.parent / "src/noisecraft/assets"


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def speed(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    vae_cfg = VAEConfig.sd()
    if args.tiny:  # a narrow VAE: checks the script quickly
        vae_cfg = VAEConfig(base_channels=32, channel_mult=(1, 2, 4, 4), norm_groups=32)
    vae = build_vae(vae_cfg)
    theirs = diffusers_vae(vae)
    torch.manual_seed(3)
    tiny = TinyDecoder(TinyDecoderConfig.taesd()).eval().requires_grad_(False)
    f = vae_cfg.downsample_factor
    z = torch.randn(
        1, 4, args.size // f, args.size // f, generator=torch.Generator().manual_seed(0)
    )
    fns = {
        "tiny (TAESD config)": lambda: tiny.decode(z),
        "ours (KL-VAE, SD 1.5)": lambda: vae.decode_latents(z),
        "diffusers AutoencoderKL": lambda: theirs.decode(z / vae_cfg.scaling_factor).sample,
    }
    params = {
        "tiny (TAESD config)": tiny,
        "ours (KL-VAE, SD 1.5)": vae.decoder,
        "diffusers AutoencoderKL": theirs.decoder,
    }
    assert tiny.decode(z).shape == vae.decode_latents(z).shape
    for fn in fns.values():  # warm-up (oneDNN primitive caches)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(_time(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\ndecode {args.size}x{args.size} (latents {args.size // f}x{args.size // f}), "
        f"{args.threads} thread(s), median of {args.repeats}"
    )
    print("| decoder | decoder params | time (s) | vs diffusers |")
    print("|---|---:|---:|---:|")
    ref = med["diffusers AutoencoderKL"]
    for name in fns:
        n = sum(p.numel() for p in params[name].parameters()) / 1e6
        print(f"| {name} | {n:.2f} M | {med[name]:.3f} | {ref / med[name]:.1f}x |")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(4 / (a - b).pow(2).mean())).item()


@torch.no_grad()
def quality(args: argparse.Namespace) -> None:
    from noisecraft.io.native import load_latent_diffusion
    from noisecraft.metrics.features import mnist_extractor
    from noisecraft.metrics.frechet import fid_from_features
    from noisecraft.pipelines import GenerateRequest, generate
    from noisecraft.training.captions import DIGIT_WORDS
    from noisecraft.training.config import DataConfig
    from noisecraft.training.data import load_dataset

    torch.set_num_threads(args.threads)
    extractor = mnist_extractor()
    model = load_latent_diffusion(ASSETS / "mnist_text.safetensors")
    model = model.replace(tiny_decoder=load_tiny_decoder(args.tiny_decoder))
    real = load_dataset(DataConfig(name="mnist", image_size=32, pad=2)).images[: args.real_n]
    digits = [i % 10 for i in range(args.fid_n)]
    digits[:100] = [d for d in range(10) for _ in range(10)]  # the shipped-model test's 100
    prompts = [f"a handwritten {DIGIT_WORDS[d]}" for d in digits]
    req = GenerateRequest(
        n=len(prompts),
        prompts=prompts,
        sampler="dpmpp_2m",
        spacing="linspace",  # the grid docs/performance.md's numbers were measured on
        steps=20,
        cfg=5.0,
        seed=0,
    )
    t0 = time.perf_counter()
    latents = generate(model, req, decode=False)
    gen_s = time.perf_counter() - t0
    by_vae = model.decode(latents).clamp(-1, 1)
    by_tiny = model.tiny_decode(latents)
    truth = torch.tensor(digits)
    real_f = extractor(real)
    rows = []
    for name, images in (("VAE decoder", by_vae), ("tiny decoder", by_tiny)):
        pred = extractor.logits(images[..., 2:30, 2:30]).argmax(1)
        acc100 = (pred[:100] == truth[:100]).float().mean().item()
        acc = (pred == truth).float().mean().item()
        fid = fid_from_features(extractor(images), real_f)
        rows.append((name, acc100, acc, fid))
    fid_tv = fid_from_features(extractor(by_tiny), extractor(by_vae))
    z_real = model.encode(real, None)
    psnr_real = _psnr(model.tiny_decode(z_real), model.decode(z_real).clamp(-1, 1))
    print(
        f"\nshipped mini SD, {args.fid_n} generated latents ({gen_s:.0f} s to sample), "
        f"FID against {len(real)} MNIST digits (MNIST features)"
    )
    print(f"| decode | digit accuracy (100) | digit accuracy ({args.fid_n}) | FID vs MNIST |")
    print("|---|---:|---:|---:|")
    for name, acc100, acc, fid in rows:
        print(f"| {name} | {acc100:.2f} | {acc:.3f} | {fid:.2f} |")
    print(f"\nFID tiny-decoded vs VAE-decoded (same latents): {fid_tv:.2f}")
    print(f"PSNR tiny vs VAE decode, generated latents: {_psnr(by_tiny, by_vae):.1f} dB")
    print(f"PSNR tiny vs VAE decode, latents of {len(real)} MNIST digits: {psnr_real:.1f} dB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image side (latents: size / 8)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a narrow VAE (checks the script)")
    ap.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--quality", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--fid-n", type=int, default=1000, help="generated images for FID")
    ap.add_argument("--real-n", type=int, default=5000, help="MNIST digits for FID")
    ap.add_argument(
        "--tiny-decoder", type=Path, default=ASSETS / "mnist_text_tiny_decoder.safetensors"
    )
    args = ap.parse_args()
    if args.speed:
        speed(args)
    if args.quality:
        quality(args)


if __name__ == "__main__":
    main()
