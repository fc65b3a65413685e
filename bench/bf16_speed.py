"""bf16 on the CPU: weights stored bf16 against autocast, against float32 (SD 1.5, random weights).

Builds Stable Diffusion 1.5's U-Net and VAE with random weights (``bench/_sd15.py``) and, in
one process, ALTERNATES the variants (one untimed warm-up call each, whose output is compared
with float32's), reporting median times and the relative difference to float32:

* ``fp32``: our default (float32 weights, the oneDNN paths of ``noisecraft.nn.kernels``);
* ``bf16 stored``: a bfloat16 copy of the weights, inputs cast to bf16 (what
  ``noisecraft.load(dtype="bf16")`` does for the U-Net): plain ``F.linear`` / ``F.conv2d``
  in bf16 (the oneDNN paths take float32 only);
* ``bf16 stored, oneDNN ops``: the same with the oneDNN paths of ``noisecraft.nn.kernels``
  let in for bf16 (``kernels._FAST_DTYPES``; they accept bf16 tensors): the measurement
  behind leaving them to float32;
* ``autocast bf16``: float32 weights under ``torch.autocast("cpu", dtype=torch.bfloat16)``
  (the kernels step aside under autocast; every matmul / conv casts its weights each call).

Rows: one U-Net pass (latents of ``--size`` / 8, batch 2 = one CFG step, 77-token context)
and one VAE decode (batch 1). ``rel`` = max |variant - fp32| / max |fp32|; ``rms rel`` =
RMS(variant - fp32) / RMS(fp32). ``/proc/loadavg`` is printed before and after (the machine
is shared: other jobs' load changes the times, the alternation spreads it over all variants).

    python bench/bf16_speed.py                    # 256x256, the table of docs/performance.md
    python bench/bf16_speed.py --threads 1        # a shared machine: one thread per process
    python bench/bf16_speed.py --size 512 --repeats 3
    python bench/bf16_speed.py --tiny --size 64   # develop on a loaded machine
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sd15 import build_ours  # noqa: E402
from sd_speed import Meter, alternate, loadavg  # noqa: E402

from noisecraft.nn import kernels  # noqa: E402


def rel_diffs(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref| / max |ref|, RMS(out - ref) / RMS(ref)) in float32."""
    d = out.float() - ref.float()
    ref = ref.float()
    return float(d.abs().max() / ref.abs().max()), float(
        d.square().mean().sqrt() / ref.square().mean().sqrt()
    )


def run_row(name: str, variants: dict[str, Callable[[], torch.Tensor]], repeats: int) -> None:
    """Warm-up (outputs compared with the first variant's), then ``repeats`` alternating rounds."""
    outs = {k: fn() for k, fn in variants.items()}
    ref = outs[next(iter(variants))]
    diffs = {k: rel_diffs(o, ref) for k, o in outs.items()}
    del outs
    # no malloc_trim before the calls: the freed heap stays mapped, as in a generation
    times, _ = alternate(name, variants, Meter("cpu", trim=False), repeats)
    base = statistics.median(times[next(iter(variants))])
    for k in variants:
        med = statistics.median(times[k])
        mx, rms = diffs[k]
        print(
            f"| {name} | {k} | {med:.3f} | {base / med:.2f}x | {mx:.2e} | {rms:.2e} |", flush=True
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="image size in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="narrow layouts (development)")
    ap.add_argument("--only", choices=("unet", "vae"), default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"loadavg before: {loadavg()}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print("| part | variant | median s | speed-up vs fp32 | rel (max) | rel (RMS) |")
    print("|---|---|---:|---:|---:|---:|")
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    nothing = contextlib.nullcontext
    bf = torch.bfloat16
    with torch.inference_mode():
        if args.only in (None, "unet"):
            unet = build_ours(args.tiny, parts=("unet",))["unet"]
            unet16 = copy.deepcopy(unet).to(bf)
            lat = args.size // 8
            x = torch.randn(2, 4, lat, lat)
            t = torch.tensor([500.0, 500.0])
            ctx = torch.randn(2, 77, unet.config.context_dim)

            def call(net, dtype, ctxmgr=nothing, fast_dtypes=kernels._FAST_DTYPES):
                def fn():
                    saved, kernels._FAST_DTYPES = kernels._FAST_DTYPES, fast_dtypes
                    try:
                        with ctxmgr():
                            return net(x.to(dtype), t, context=ctx.to(dtype)).float()
                    finally:
                        kernels._FAST_DTYPES = saved

                return fn

            run_row(
                f"U-Net {args.size}² b2",
                {
                    "fp32": call(unet, torch.float32),
                    "bf16 stored": call(unet16, bf),
                    "bf16 stored, oneDNN ops": call(unet16, bf, fast_dtypes=(torch.float32, bf)),
                    "autocast bf16": call(unet, torch.float32, autocast),
                },
                args.repeats,
            )
            del unet, unet16
        if args.only in (None, "vae"):
            vae = build_ours(args.tiny, parts=("vae",))["vae"]
            vae16 = copy.deepcopy(vae).to(bf)
            z = torch.randn(1, 4, args.size // 8, args.size // 8)

            def dec(net, dtype, ctxmgr=nothing):
                def fn():
                    with ctxmgr():
                        return net.decode(z.to(dtype)).float()

                return fn

            run_row(
                f"VAE decode {args.size}²",
                {
                    "fp32": dec(vae, torch.float32),
                    "bf16 stored": dec(vae16, bf),
                    "autocast bf16": dec(vae, torch.float32, autocast),
                },
                args.repeats,
            )
    print(f"loadavg after: {loadavg()}")


if __name__ == "__main__":
    main()
