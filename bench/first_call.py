"""What a user's FIRST call pays: import, load (file cached or not), and call 1 against call 2+.

A command runs once: its first call is the one the user waits for, so the tables elsewhere
(medians after an untimed warm-up) understate it. This script runs in a fresh process and
times, in order, as a command does:

* ``import``: ``import torch`` and ``noisecraft`` (the CLI's import cost);
* ``load``: ``noisecraft.load(FILE, ...)`` with the file's pages dropped from the page cache
  first (``posix_fadvise(POSIX_FADV_DONTNEED)``: what the kernel does to a file nobody read
  for a while; on this VM DAMON reclaim pages out idle page cache within minutes), then again
  with the file cached (``--cached``: the second load of a process, from the page cache);
* ``U-Net call k``: one U-Net pass (the pipeline's denoiser at ``--size``, batch 1 or 2 with
  ``--cfg``), calls 1, 2, 3 in the same process: call 1 pays oneDNN's primitive creation,
  weight reorders and the first touch of the activations' memory;
* ``decode call k``: the decode of the pipeline (VAE, or the tiny decoder with
  ``--tiny-decoder``), calls 1 and 2.

    python bench/first_call.py --model /tmp/sd15_fp16.safetensors --dtype bf16 --size 512
    python bench/first_call.py --model /tmp/sd15_fp16.safetensors --size 512 --cfg
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_speed import _load  # noqa: E402  (standard library only)

T0 = time.perf_counter()
import torch  # noqa: E402

import noisecraft  # noqa: E402

IMPORT_S = time.perf_counter() - T0


def drop_cache(path: Path) -> int:
    """Drop the file's clean pages from the page cache; the bytes that were cached before."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path.stat().st_size


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--tiny-decoder", type=Path)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--cfg", action="store_true", help="U-Net batch 2 (one CFG step)")
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"load average before: {_load()}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    rows = [("import torch + noisecraft", IMPORT_S)]
    kw = {"dtype": args.dtype, "fast": args.fast}
    if args.tiny_decoder:
        kw["tiny_decoder"] = args.tiny_decoder
    drop_cache(args.model)
    t0 = time.perf_counter()
    pipe = noisecraft.load(args.model, **kw)
    rows.append(("load, file not in the page cache", time.perf_counter() - t0))
    del pipe
    t0 = time.perf_counter()
    pipe = noisecraft.load(args.model, **kw)
    rows.append(("load again, file cached", time.perf_counter() - t0))
    model = pipe.model
    batch = 2 if args.cfg else 1
    lat = args.size // 8
    x = torch.randn(batch, 4, lat, lat)
    ctx = model.encode_prompt(["a photo of a cat", ""][:batch])
    t = torch.full((batch,), 500)
    dt = next(model.unet.parameters()).dtype
    x, ctx = x.to(dt), ctx.to(dt)
    for k in range(args.calls):
        rows.append((f"U-Net call {k + 1} ({args.size}², batch {batch}, {dt})",
                     timed(lambda: model.unet(x, t, context=ctx))))  # fmt: skip
    z = torch.randn(1, 4, lat, lat)
    decode = model.tiny_decode if args.tiny_decoder else model.decode
    for k in range(2):
        rows.append((f"decode call {k + 1}", timed(lambda: decode(z))))
    print("| phase | s |\n|---|---:|")
    for name, secs in rows:
        print(f"| {name} | {secs:.2f} |")
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
