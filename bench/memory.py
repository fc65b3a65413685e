"""Peak memory of loading and sampling a full-size Stable Diffusion 1.5 model on the CPU.

The SD 1.5 architecture (U-Net 859.5 M, VAE 83.7 M, CLIP ViT-L/14 text tower 123 M parameters:
4.3 GB in float32) with random weights is saved as an original SD single file (CompVis
layout, what users download; ``--format native`` for noisecraft's own), or ``--file PATH``
is used (any format ``noisecraft.io.formats.auto.load_any`` reads), then each measurement
runs in a FRESH child process, so peaks do not mix:

* ``weights``: bytes of the loaded parameters;
* ``base``: RSS of the child after importing torch and noisecraft, before loading;
* ``load``: peak RSS (``VmHWM``) right after loading: the weights are a memory
  map of the file, paged in lazily, so this is small;
* ``touched``: RSS after reading every weight once (all pages of the map resident): base plus
  one copy of the weights if loading made no copy;
* ``sampling``: peak RSS up to the end of the last sampling step (before the VAE decode);
* ``peak``: peak RSS of the whole child: load, prompt encoding, ``--steps`` Euler steps with
  classifier-free guidance (U-Net batch 2) and the VAE decode, for one ``--size`` image;
* ``peak/weights``: the issue's target is <= 1.3.

Modes (``--modes``): ``default``; ``slicing`` (``set_attention_slicing(128 MiB)``: the
first U-Net level's 1 GiB attention matrix in 8 query chunks); ``tiling`` (the VAE decodes
in tiles of half the image side, overlap 1/8 of it, i.e. 4 tiles, via
``vae_tiling.tiled_decode``; ``generate()``'s own switch only tiles above 1024x1024);
``lowmem-fp16`` / ``lowmem-int8`` (low-memory mode, :mod:`noisecraft.pipelines.lowmem`: U-Net
and text-encoder weights stored fp16 / int8, VAE fp16, each layer widened to fp32 for its
forward; loaded by ``load_low_memory``, so ``weights`` is the stored bytes). Modes combine
with ``+``, e.g. ``lowmem-int8+tiling``. ``bf16`` loads as ``noisecraft.api.load(path,
dtype="bf16")`` does (U-Net bfloat16, text encoder and VAE float32).
``--file-dtype fp16`` saves the random model's single file in float16 (what most published
SD files are); low-memory fp16 then maps the file's tensors with no copy.

``--sdpa`` instead measures one attention call the size of SD 1.5's first U-Net level at
512x512 (q, k, v of shape (2, 8, 4096, 40): batch 2 with CFG, 8 heads, 64x64 tokens; the full
attention matrix is 1 GiB in float32), each case in its own child: SDPA as it runs by default
on the CPU (a fused kernel), SDPA forced to its unfused math kernel, and the math kernel sliced
by ``set_attention_slicing(128 MiB)``. It prints the peak RSS above the inputs.

``--speed`` instead times one U-Net pass (batch 2, one CFG step) at ``--size`` (256 by
default there) in ONE child process, the calls alternating ours fp32, lowmem-fp16,
lowmem-int8, diffusers (after one untimed warm-up each; median of ``--repeats``), diffusers'
``UNet2DConditionModel`` sharing our fp32 weights (``bench/_sd15.py``): the price of widening
every weight once per pass.

Run: ``python bench/memory.py --size 512 --steps 1`` (about 4 minutes on 2 shared cores:
building and saving the model 30-50 s, then per mode ~25 s of prompt encoding and one step
and ~22 s of VAE decode; the tiled decode ~46 s). Measured (torch 2.13 CPU, safetensors 0.8):
weights 3.97 GiB, peak 5.06 GiB = 1.27 x (default and slicing), 4.76 GiB = 1.20 x (tiling).
Low-memory mode (fp32 file): lowmem-fp16 peak 3.08 GiB (weights 1.99 GiB), lowmem-int8 2.17
GiB (weights 1.08 GiB), lowmem-int8+tiling 1.89 GiB = 2.03 GB; from an fp16 file
(``--file-dtype fp16``) lowmem-fp16 loads with a 0.38 GiB peak (no copy), peak 3.05 GiB.
``--json`` prints one JSON line instead of the table (used by the slow test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("default", "bf16", "slicing", "tiling", "lowmem-fp16", "lowmem-int8")
#: bench modes -> the ``weights`` of :func:`noisecraft.pipelines.lowmem.load_low_memory`
LOWMEM = {"lowmem-fp16": "fp16", "lowmem-int8": "int8"}
SLICING_BUDGET = 128 * 2**20
PROMPT = "a photograph of an astronaut riding a horse"


def _status(key: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (VmRSS, VmHWM, RssAnon, RssFile)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def sd15_model():
    """A LatentDiffusion with Stable Diffusion 1.5's architecture and random weights
    (``bench/_sd15.py``: no zero-initialised layer left, so no block is the identity)."""
    import _sd15

    return _sd15.latent_diffusion(**_sd15.build_ours())


def _build(path: str, half: bool = False) -> None:
    """Save the random SD 1.5 as an original single file (what users have; ``half``: float16
    tensors) or native."""
    import torch

    model = sd15_model()
    if path.endswith(".native.safetensors"):
        from noisecraft.io.native import save_model

        save_model(model, path)
    else:
        from noisecraft.io.formats.single_file import save_single_file

        save_single_file(model, path, dtype=torch.float16 if half else None)


def _load(path: str):
    """Any format noisecraft reads (native, single file, diffusers folder)."""
    from noisecraft.io.formats.auto import load_any

    return load_any(path)


def _measure(path: str, mode: str, size: int, steps: int) -> dict:
    import torch

    from noisecraft.models.vae_tiling import tiled_decode
    from noisecraft.nn.attention import set_attention_slicing
    from noisecraft.pipelines import GenerateRequest, generate

    base = _status("VmRSS")
    t0 = time.perf_counter()
    parts = mode.split("+")  # e.g. "lowmem-int8+tiling"
    lowmem = [LOWMEM[p] for p in parts if p in LOWMEM]
    if lowmem:
        from noisecraft.pipelines.lowmem import load_low_memory

        model = load_low_memory(path, lowmem[0])
    elif "bf16" in parts:
        from noisecraft.api import load

        model = load(path, dtype="bf16").model
    else:
        model = _load(path)
    load_s = time.perf_counter() - t0
    load_peak = _status("VmHWM")
    params = [
        t
        for m in (model.unet, model.vae, model.text_encoder)
        for t in (*m.parameters(), *m.buffers())
    ]
    weights = sum(p.numel() * p.element_size() for p in params)
    with torch.no_grad():
        for p in params:  # page in every weight once
            p.sum()
    touched = _status("VmRSS")
    touched_file = _status("RssFile")

    if "slicing" in parts:
        set_attention_slicing(SLICING_BUDGET)
    request = GenerateRequest(
        n=1, prompts=[PROMPT], sampler="euler", steps=steps, cfg=7.5, width=size, height=size
    )
    marks = []

    def mark(d: dict) -> None:
        marks.append((time.perf_counter(), _status("VmHWM"), _status("VmRSS")))

    t0 = time.perf_counter()
    if "tiling" in parts:
        latents = generate(model, request, decode=False, callback=mark)
        t1 = time.perf_counter()
        tile = size // 16  # latent pixels: half the image side
        z = model.vae.unscale_latents(latents.to(next(model.vae.parameters()).dtype))
        with torch.no_grad():
            image = tiled_decode(model.vae, z, tile, max(tile // 8, 1)).float().clamp(-1, 1)
    else:  # generate()'s own path; the last step's callback marks the start of the decode
        image = generate(model, request, callback=mark)
        t1 = marks[-1][0]
    t2 = time.perf_counter()
    return {
        "mode": mode,
        "size": size,
        "steps": steps,
        "weights_bytes": weights,
        "file_bytes": os.path.getsize(path),
        "base_rss": base,
        "load_peak": load_peak,
        "touched_rss": touched,
        "touched_file_rss": touched_file,
        "sample_peak_rss": marks[-1][1],
        "sample_end_rss": marks[-1][2],
        "peak_rss": _status("VmHWM"),
        "end_anon_rss": _status("RssAnon"),
        "end_file_rss": _status("RssFile"),
        "ru_maxrss": _ru_maxrss(),
        "load_s": load_s,
        "sample_s": t1 - t0,
        "decode_s": t2 - t1,
        "image_shape": list(image.shape),
        "finite": bool(torch.isfinite(image).all()),
    }


SPEED_CASES = ("ours-fp32", "lowmem-fp16", "lowmem-int8", "diffusers")


def _measure_speed(size: int, repeats: int, threads: int = 0) -> dict:
    """Median seconds of one SD 1.5 U-Net pass (batch 2) per case, calls alternating."""
    import copy
    import statistics

    import _sd15
    import torch

    from noisecraft.pipelines.lowmem import low_memory_module

    torch.set_grad_enabled(False)
    if threads:
        torch.set_num_threads(threads)
    ours = _sd15.build_unet(_sd15.SD15_UNET)
    theirs = _sd15.diffusers_unet(ours)  # shares ours' fp32 tensors
    fp16, int8 = copy.deepcopy(ours), copy.deepcopy(ours)
    low_memory_module(fp16, "fp16")
    low_memory_module(int8, "int8")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g)
    t = torch.full((2,), 500)
    ctx = torch.randn(2, 77, 768, generator=g)
    calls = {
        "ours-fp32": lambda: ours(x, t, context=ctx),
        "lowmem-fp16": lambda: fp16(x, t, context=ctx),
        "lowmem-int8": lambda: int8(x, t, context=ctx),
        "diffusers": lambda: theirs(x, t, encoder_hidden_states=ctx).sample,
    }
    outs = {name: f() for name, f in calls.items()}  # warm-up, and the outputs compared
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    ref = outs["ours-fp32"]
    return {
        "size": size,
        "threads": torch.get_num_threads(),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "max_rel_diff": {
            k: float((o - ref).abs().max() / ref.abs().max()) for k, o in outs.items()
        },
    }


SDPA_CASES = ("sdpa", "math", "math+slicing")


def _measure_sdpa(case: str) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from noisecraft.nn.attention import attention, set_attention_slicing

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 4096, 40, generator=g) for _ in range(3))
    if case == "math+slicing":
        set_attention_slicing(SLICING_BUDGET)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    if case == "sdpa":
        out = attention(q, k, v)
    else:
        with sdpa_kernel(SDPBackend.MATH):
            out = attention(q, k, v)
    return {
        "case": case,
        "peak_above_inputs": _status("VmHWM") - before,
        "output_bytes": out.numel() * out.element_size(),
        "matrix_bytes": 2 * 8 * 4096 * 4096 * 4,
        "seconds": time.perf_counter() - t0,
    }


def _ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _child(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    )
    return out.stdout


def _gib(n: int) -> str:
    return f"{n / 2**30:6.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, help="image side (default 512; 256 with --speed)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--file", help="an existing model file instead of a new random SD 1.5")
    ap.add_argument(
        "--format",
        choices=("single-file", "native"),
        default="single-file",
        help="how the random SD 1.5 is saved before it is loaded (default: an SD single file)",
    )
    ap.add_argument(
        "--file-dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="dtype of the random SD single file (default fp32)",
    )
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    ap.add_argument("--workdir", help="where the random model is written (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON line, not a table")
    ap.add_argument("--sdpa", action="store_true", help="measure one SD 1.5 attention call")
    ap.add_argument("--speed", action="store_true", help="time one U-Net pass per mode")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per case (--speed)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (--speed; 0: default)")
    ap.add_argument("--_speed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_sdpa", help=argparse.SUPPRESS)
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", help=argparse.SUPPRESS)
    ap.add_argument("--_mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size is None:
        args.size = 256 if args.speed else 512

    if args._build:
        _build(args._build, half=args.file_dtype == "fp16")
        return
    if args._speed:
        print(json.dumps(_measure_speed(args.size, args.repeats, args.threads)))
        return
    if args.speed:
        out = _child(
            "--_speed", "--size", str(args.size), "--repeats", str(args.repeats), "--threads",
            str(args.threads),
        )  # fmt: skip
        r = json.loads(out.strip().splitlines()[-1])
        if args.json:
            print(json.dumps(r))
            return
        base = r["median_s"]["diffusers"]
        print(
            f"one SD 1.5 U-Net pass, batch 2, {r['size']}x{r['size']}, {r['threads']} threads, "
            f"median of {args.repeats}, alternating"
        )
        print("case          seconds  diffusers/case  max rel diff vs ours-fp32")
        for name, s in r["median_s"].items():
            print(f"{name:<13} {s:7.2f}  {base / s:14.2f}  {r['max_rel_diff'][name]:.1e}")
        return
    if args._sdpa:
        print(json.dumps(_measure_sdpa(args._sdpa)))
        return
    if args.sdpa:
        rows = [json.loads(_child("--_sdpa", case).strip().splitlines()[-1]) for case in SDPA_CASES]
        if args.json:
            print(json.dumps(rows))
            return
        print("one attention call, q/k/v (2, 8, 4096, 40) float32; full matrix 1024 MiB")
        print("case           peak above inputs MiB  output MiB  seconds")
        for r in rows:
            print(
                f"{r['case']:<14} {r['peak_above_inputs'] / 2**20:21.0f}  "
                f"{r['output_bytes'] / 2**20:10.0f}  {r['seconds']:7.2f}"
            )
        return
    if args._measure:
        print(json.dumps(_measure(args._measure, args._mode, args.size, args.steps)))
        return

    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if not set(m.split("+")) <= set(MODES)]
    if bad:
        ap.error(f"unknown mode {bad[0]}; choose from {', '.join(MODES)}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = args.file
        build_s = None
        if path is None:
            suffix = ".native.safetensors" if args.format == "native" else ".safetensors"
            path = str(Path(tmp) / f"sd15-random{suffix}")
            t0 = time.perf_counter()
            _child("--_build", path, "--file-dtype", args.file_dtype)
            build_s = time.perf_counter() - t0
        rows = {}
        for mode in modes:
            out = _child(
                "--_measure", path, "--_mode", mode, "--size", str(args.size), "--steps",
                str(args.steps),
            )  # fmt: skip
            rows[mode] = json.loads(out.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(rows))
        return
    first = next(iter(rows.values()))
    print(
        f"SD 1.5 architecture, random weights: {first['weights_bytes'] / 1e9:.2f} GB "
        f"({first['weights_bytes'] / 2**30:.2f} GiB) of parameters, file "
        f"{first['file_bytes'] / 1e9:.2f} GB"
        + (f" (built and saved in {build_s:.0f} s)" if build_s else "")
    )
    print(f"one {args.size}x{args.size} image, {args.steps} Euler step(s), CFG 7.5 (U-Net batch 2)")
    print(
        "mode         weights GiB  base GiB  load GiB  touched GiB  sampling GiB  peak GiB  "
        "peak/weights  sample s  decode s  finite"
    )
    for mode, r in rows.items():
        print(
            f"{mode:<12} {_gib(r['weights_bytes'])}       {_gib(r['base_rss'])}    "
            f"{_gib(r['load_peak'])}    "
            f"{_gib(r['touched_rss'])}       {_gib(r['sample_peak_rss'])}        "
            f"{_gib(r['peak_rss'])}    "
            f"{r['peak_rss'] / r['weights_bytes']:8.2f}      {r['sample_s']:7.1f}   "
            f"{r['decode_s']:7.1f}   {r['finite']}"
        )


if __name__ == "__main__":
    main()
