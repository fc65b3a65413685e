"""Low-memory mode against diffusers at 512x512: the whole command's peak RSS and time.

The issue's goal is both at once: ``--low-memory int8`` at <= 2.1 GB peak AND faster than
diffusers. Run back to back on the same machine, each in a fresh process:

* ours: ``noisecraft generate --low-memory int8`` on SD 1.5's architecture with random
  weights (the fp16 single file of ``bench/fast_recipe.py``), 512x512, 20 DPM++ 2M steps, CFG
  7.5, the whole command (import, load, generation, decode, PNG): wall time and peak RSS
  (``os.wait4``);
* diffusers: ``StableDiffusionPipeline`` on the same architecture's random weights
  (``bench/_sd15.py``), the same 20 DPM++ 2M steps and CFG: the FIRST generation of the
  process, model construction excluded (so diffusers gets the better of the comparison),
  and its peak RSS for the whole process.

    python bench/lowmem_speed.py
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sd_speed import _load  # noqa: E402  (standard library only)


def diffusers_child(size: int, steps: int) -> None:
    import _sd15
    import torch
    from sd_speed import _diffusers_generation

    torch.set_grad_enabled(False)
    parts = _sd15.build_ours(False)
    model = _sd15.latent_diffusion(parts["unet"], parts["vae"], parts["text"])
    pipe = _sd15.diffusers_pipeline(model, "DPMSolverMultistepScheduler")
    del parts, model
    t0 = time.perf_counter()
    _diffusers_generation(pipe, size, steps, 0)
    print(json.dumps({"generation_s": time.perf_counter() - t0}))


def process(args: list[str]) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read() if proc.stdout else ""
    if status != 0:
        err = proc.stderr.read() if proc.stderr else ""
        raise SystemExit(f"failed: {' '.join(args)}\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024 / 1e9, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mode", default="int8", help="--low-memory mode")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        diffusers_child(args.size, args.steps)
        return
    from fast_recipe import SD15, ensure_files

    ensure_files()
    size = f"{args.size}x{args.size}"
    print(f"{size}, {args.steps} DPM++ 2M steps, CFG 7.5; load average before {_load()}")
    print("| side | what is timed | s | peak RSS GB | load avg after |")
    print("|---|---|---:|---:|---|")
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "noisecraft", "generate", "a photo of a cat",
               "--model", str(SD15), "--size", size, "--steps", str(args.steps),
               "--sampler", "DPM++ 2M", "--cfg", "7.5", "--low-memory", args.mode,
               "--out", str(Path(out, "x.png"))]  # fmt: skip
        wall, rss, _ = process(cmd)
        print(f"| ours `--low-memory {args.mode}` | whole command | {wall:.1f} | {rss:.2f} | "
              f"{_load()} |", flush=True)  # fmt: skip
    child = [sys.executable, __file__, "--child", "--size", str(args.size), "--steps",
             str(args.steps)]  # fmt: skip
    _, rss, out = process(child)
    gen = json.loads(out.strip().splitlines()[-1])["generation_s"]
    print(f"| diffusers | first generation (no load) | {gen:.1f} | {rss:.2f} | {_load()} |")


if __name__ == "__main__":
    main()
