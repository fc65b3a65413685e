"""The fastest recipe, LCM 4 steps at CFG 1 + bf16 + DeepCache (``--fast``) + the tiny decoder.

Two parts, both through the public API a user runs:

* ``--quality``: its cost on the shipped mini SD. 100 prompts "a handwritten <digit i % 10>",
  seed i, for five rows: the teacher ``mnist-text`` exact (fp32, DPM++ 2M Karras 20 steps,
  CFG 5, KL-VAE decode: the reference), the LCM student ``mnist-text-lcm`` in fp32 (4 LCM
  steps, CFG 1, VAE), the student in bf16, in bf16 with DeepCache, and the whole recipe
  (student, bf16, ``fast=True`` = DeepCache, the shipped tiny decoder). Digit accuracy of
  the shipped MNIST classifier, FID against the 5,000 MNIST digits in its features (biased
  upwards at n = 100: compare rows), the mean / max 8-bit difference against the fp32
  student row (the same path without the speed-ups), seconds.
* ``--command``: the whole command on SD 1.5's architecture (random weights), as a user runs
  it: ``noisecraft generate`` in a fresh process, loading included, 512x512, wall time and
  peak RSS (``os.wait4``), the first run and ``--repeats`` more (a fresh process each: the
  first one reads the file from disk if the page cache lost it; the load average is
  printed before and after). The model file (an fp16 single file, what users download) and a
  TAESD-config tiny decoder with random weights are written first if missing.

    python bench/fast_recipe.py --quality
    python bench/fast_recipe.py --command --repeats 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sd_speed import _load  # noqa: E402  (standard library only)

SD15 = Path(tempfile.gettempdir()) / "sd15_fp16.safetensors"
TAESD = Path(tempfile.gettempdir()) / "taesd_random.safetensors"
RECIPE = ["--dtype", "bf16", "--fast", "--sampler", "lcm", "--steps", "4", "--cfg", "1"]


def quality(n: int) -> None:
    import warnings

    import noisecraft
    from noisecraft.errors import NoisecraftWarning
    from noisecraft.metrics.features import mnist_extractor
    from noisecraft.metrics.frechet import fid_from_features
    from noisecraft.training.captions import DIGIT_WORDS
    from noisecraft.training.config import DataConfig
    from noisecraft.training.data import load_dataset

    digits = [i % 10 for i in range(n)]
    prompts = [f"a handwritten {DIGIT_WORDS[d]}" for d in digits]
    extractor = mnist_extractor()
    real = extractor(load_dataset(DataConfig(name="mnist")).images)
    lcm = {"sampler": "lcm", "steps": 4, "cfg": 1.0}
    rows = (
        ("teacher mnist-text, fp32, DPM++ 2M Karras 20 steps, CFG 5, VAE", "mnist-text", {},
         {"sampler": "DPM++ 2M Karras", "steps": 20, "cfg": 5.0}),
        ("LCM student, fp32, 4 steps, CFG 1, VAE", "mnist-text-lcm", {}, lcm),
        ("LCM student, bf16, VAE", "mnist-text-lcm", {"dtype": "bf16"}, lcm),
        ("LCM student, bf16 + DeepCache (fast), VAE", "mnist-text-lcm",
         {"dtype": "bf16", "fast": True, "tiny_decoder": False}, lcm),
        ("LCM student, bf16 + DeepCache (fast) + tiny decoder", "mnist-text-lcm",
         {"dtype": "bf16", "fast": True, "tiny_decoder": True}, {**lcm, "fast_decode": True}),
    )  # fmt: skip
    print(f"load average {_load()}; n = {n}, seeds 0..{n - 1}")
    print("| recipe | digit accuracy | FID | mean / max 8-bit diff vs fp32 student | s |")
    print("|---|---:|---:|---|---:|")
    base = None
    for label, model, load_kw, call_kw in rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoisecraftWarning)
            pipe = noisecraft.load(model, **load_kw)
        t0 = time.perf_counter()
        out = pipe(prompts, seed=0, **call_kw).tensors
        secs = time.perf_counter() - t0
        images = out[..., 2:30, 2:30]
        acc = (extractor.logits(images).argmax(1) == torch.tensor(digits)).float().mean().item()
        fid = fid_from_features(extractor(images), real)
        eight = ((out.clamp(-1, 1) + 1) * 127.5).round()
        if label.startswith("LCM student, fp32"):
            base = eight
        diff = "-" if base is None or eight is base else (
            f"{(eight - base).abs().mean():.2f} / {(eight - base).abs().max():.0f}"
        )  # fmt: skip
        print(f"| {label} | {100 * acc:.0f} % | {fid:.2f} | {diff} | {secs:.1f} |", flush=True)
    print(f"load average after {_load()}")


def ensure_files() -> None:
    if not SD15.exists():
        import memory

        tmp = SD15.with_suffix(".tmp.safetensors")
        memory._build(str(tmp), half=True)
        os.replace(tmp, SD15)
    if not TAESD.exists():
        from noisecraft.io.native import save_tiny_decoder
        from noisecraft.models.tiny_decoder import TinyDecoder, TinyDecoderConfig

        torch.manual_seed(0)
        save_tiny_decoder(TinyDecoder(TinyDecoderConfig.taesd()), TAESD)


def run_command(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"the command failed: {' '.join(args)}\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024 / 1e9


def command(repeats: int, size: int, extra: list[str]) -> None:
    ensure_files()
    exe = [sys.executable, "-m", "noisecraft", "generate", "a photo of a cat"]
    with tempfile.TemporaryDirectory() as out:
        cases = {
            "--fast recipe (LCM 4 steps, CFG 1, bf16, DeepCache, tiny decoder)": [
                *RECIPE, "--fast-decode", "--tiny-decoder", str(TAESD)],
        }  # fmt: skip
        for extra_case in extra:
            cases[extra_case] = extra_case.split()
        print(f"SD 1.5 random weights, {SD15.name} ({SD15.stat().st_size / 1e9:.2f} GB), "
              f"{size}x{size}, torch {torch.__version__}, {os.cpu_count()} CPUs")  # fmt: skip
        print("| command | run | load avg before / after | wall s | peak RSS GB |")
        print("|---|---|---|---:|---:|")
        for label, flags in cases.items():
            for i in range(1 + repeats):
                png = Path(out, f"{i}.png")
                before = _load()
                args = [*exe, "--model", str(SD15), "--size", f"{size}x{size}", *flags]
                wall, rss = run_command([*args, "--out", str(png), "--overwrite"])
                run = "first" if i == 0 else f"repeat {i}"
                print(f"| `{label}` | {run} | {before} / {_load()} | {wall:.2f} | {rss:.2f} |",
                      flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quality", action="store_true", help="the mini SD rows")
    ap.add_argument("--command", action="store_true", help="the SD 1.5 whole command")
    ap.add_argument("--n", type=int, default=100, help="mini SD images per row")
    ap.add_argument("--repeats", type=int, default=2, help="command runs after the first")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--also", action="append", default=[], help="more CLI flags to time")
    args = ap.parse_args()
    if not (args.quality or args.command):
        ap.error("give --quality and/or --command")
    if args.quality:
        quality(args.n)
    if args.command:
        command(args.repeats, args.size, args.also)


if __name__ == "__main__":
    main()
