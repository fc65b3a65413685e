"""Fast mode: speed-up per U-Net pass (SD 1.5 architecture, ours vs diffusers, one process) and
quality cost on the shipped mini models.

``--speed`` (default on): SD 1.5's U-Net (random weights; ``--tiny`` for a quick check) at
``--size`` with classifier-free guidance (batch 2, 77 tokens of 768-wide context), on
``--threads`` threads, median of ``--repeats`` timings of each pass, run interleaved:

* ``diffusers``: ``UNet2DConditionModel`` (the reference; all ratios are diffusers / ours);
* ``ours``: :class:`~noisecraft.models.unet.UNet`, the full pass;
* ``deepcache b=1/2`` shallow: a cached call of
  :func:`~noisecraft.pipelines.deepcache.deepcache_forward`;
* ``int8 linear``: :func:`~noisecraft.pipelines.fast.quantize_int8` (Linear layers);
* ``int8 linear+conv`` (``--int8-conv``): ``convs=True`` (dynamic int8 convolutions; its
  quality is unusable, see ``--quality``).

Per-generation rows (U-Net time only, from the per-pass medians): diffusers DPM++ 2M 20 steps
= 20 full passes, against fast mode 10 steps with DeepCache N = 2 / 3 (per N calls one full
pass and N - 1 shallow ones; FAST is N = 2, branch 2).

``--quality``: digit accuracy of the shipped text model (100 prompts "a handwritten <word>",
ten per digit, CFG 5, seed 0, read by the shipped MNIST classifier) and FID of the shipped
class model (``--fid-n`` samples, class-balanced, CFG 2, against the 5,000 MNIST test digits
with the MNIST classifier's features, as docs/samplers.md) for each setting.

Run: ``python bench/fast_mode.py --size 256`` (about 3 minutes on 2 cores) and
``python bench/fast_mode.py --no-speed --quality`` (about 4 minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.pipelines.deepcache import DeepCacheConfig, DeepCacheState, deepcache_forward
from noisecraft.pipelines.fast import FastMode, quantize_int8

ASSETS = Path(__file__).resolve().parent.parent / "src/noisecraft/assets"


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _diffusers_unet(config: UNetConfig) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    c = config
    blocks = len(c.channel_mult)
    down = [
        "CrossAttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in range(blocks)
    ]
    up = ["CrossAttnUpBlock2D" if i in c.attention_levels else "UpBlock2D" for i in range(blocks)]
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        block_out_channels=[c.model_channels * m for m in c.channel_mult],
        down_block_types=down,
        up_block_types=up[::-1],
        layers_per_block=c.num_res_blocks,
        cross_attention_dim=c.context_dim,
        attention_head_dim=c.num_heads,
        norm_num_groups=c.norm_groups,
    ).eval()


def speed(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    config = UNetConfig.sd15()
    if args.tiny:
        config = dataclasses.replace(config, model_channels=32, context_dim=64, norm_groups=8)
    torch.manual_seed(0)
    ours = UNet(config).eval()
    q_lin = quantize_int8(ours)  # before diffusers' model: peak 2 float copies, not 3
    q_conv = quantize_int8(ours, convs=True) if args.int8_conv else None
    gc.collect()
    theirs = _diffusers_unet(config)
    h = args.size // 8
    x = torch.randn(2, 4, h, h)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, config.context_dim)
    states = {b: DeepCacheState(DeepCacheConfig(interval=10**9, branch=b)) for b in (1, 2)}
    with torch.inference_mode():
        for state in states.values():  # fill the caches with one full pass
            deepcache_forward(ours, state, x, t, context=ctx)
        cases: dict[str, Callable[[], object]] = {
            "diffusers": lambda: theirs(x, t, encoder_hidden_states=ctx),
            "ours": lambda: ours(x, t, context=ctx),
            "ours deepcache b=1 (shallow)": lambda: deepcache_forward(
                ours, states[1], x, t, context=ctx
            ),
            "ours deepcache b=2 (shallow)": lambda: deepcache_forward(
                ours, states[2], x, t, context=ctx
            ),
            "ours int8 linear": lambda: q_lin(x, t, context=ctx),
        }
        if q_conv is not None:
            cases["ours int8 linear+conv"] = lambda: q_conv(x, t, context=ctx)
        for fn in cases.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                times[name].append(_time(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["diffusers"]
    print(
        f"\nSD 1.5 U-Net{' (tiny)' if args.tiny else ''}, {args.size}x{args.size}, CFG batch 2, "
        f"{args.threads} thread(s), median of {args.repeats}\n"
    )
    print("| U-Net pass | s | diffusers / this |")
    print("|---|---:|---:|")
    for name, s in med.items():
        print(f"| {name} | {s:.3f} | {ref / s:.2f} |")
    full, b1, b2 = (med[k] for k in ("ours", *(f"ours deepcache b={b} (shallow)" for b in (1, 2))))
    print("\n| generation (U-Net time only) | s | diffusers 20 steps / this |")
    print("|---|---:|---:|")
    rows = {
        "diffusers DPM++ 2M 20 steps": 20 * ref,
        "ours 20 steps": 20 * full,
        "ours 10 steps (DPM++ 2M Karras)": 10 * full,
        "ours 10 steps + DeepCache N=2 b=2 (FAST)": 5 * full + 5 * b2,
        "ours 10 steps + DeepCache N=2 b=1": 5 * full + 5 * b1,
        "ours 10 steps + DeepCache N=3 b=2": 4 * full + 6 * b2,
    }
    for name, s in rows.items():
        print(f"| {name} | {s:.2f} | {20 * ref / s:.2f} |")


def quality(args: argparse.Namespace) -> None:
    from noisecraft.metrics.features import mnist_extractor
    from noisecraft.metrics.frechet import fid_from_features
    from noisecraft.pipelines import GenerateRequest, LatentDiffusion, PixelDiffusion, generate
    from noisecraft.training.captions import DIGIT_WORDS
    from noisecraft.training.config import DataConfig
    from noisecraft.training.data import load_dataset

    torch.set_num_threads(args.threads)
    extractor = mnist_extractor()
    dc2, dc3, dc21 = (FastMode(DeepCacheConfig(*nb)) for nb in ((2, 2), (3, 2), (2, 1)))
    settings = {  # name: (request fields, int8)
        "DPM++ 2M 20 steps (reference)": (dict(sampler="dpmpp_2m", steps=20), False),
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
    text = LatentDiffusion.load(ASSETS / "mnist_text.safetensors")
    pixel = PixelDiffusion.load(ASSETS / "mnist.safetensors")
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
    ap.add_argument("--size", type=int, default=256, help="image side (latents: size / 8)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a small U-Net (checks the script)")
    ap.add_argument("--int8-conv", action="store_true", help="also time int8 Linear + Conv2d")
    ap.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--quality", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--fid-n", type=int, default=1000, help="class-model samples for FID")
    args = ap.parse_args()
    if args.speed:
        speed(args)
    if args.quality:
        quality(args)


if __name__ == "__main__":
    main()
