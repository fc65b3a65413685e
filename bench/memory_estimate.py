"""The request memory estimate (noisecraft.pipelines.memory) against measured peaks.

Each row runs one request in a fresh child process: the model is loaded and warmed up at a
small size, then the peak resident memory (``ru_maxrss``) is read after the request, minus
the resident memory just before it. The estimate is what ``noisecraft.load``'s limits check
uses to refuse a request or to run it in smaller batches; the ratio column is
estimate / measured (above 1: the estimate errs on the safe side).

    .venv/bin/python bench/memory_estimate.py
    .venv/bin/python bench/memory_estimate.py --sizes 256,512 --n 1,4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def child(model: str, size: int, n: int, tiling: str) -> None:
    """Run one request and print {"estimate": ..., "measured": ...} as JSON."""
    import noisecraft
    from noisecraft.pipelines import memory

    pipe = noisecraft.load(model)
    pipe("a 7", steps=1)  # warm-up: kernels, caches
    tiled = {"auto": None, "on": True, "off": False}[tiling]
    before = _rss()
    result = pipe("a 7", n=n, steps=2, width=size, height=size, tiling=tiled)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    req = result.request
    est = memory.estimate(pipe.model, size, size, n, req.batch_size, req.cfg, tiled)
    print(json.dumps({"estimate": est.total, "measured": peak - before, "batch": est.batch}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist-text")
    p.add_argument("--sizes", default="128,256,512,1024")
    p.add_argument("--n", default="1,4")
    p.add_argument("--tiling", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        size, n, tiling = args.child
        child(args.model, int(size), int(n), tiling)
        return
    print(f"{args.model}, peak resident memory of one request above what was resident before")
    print(
        f"{'size':>6} {'n':>3} {'batch':>5} {'estimate MiB':>13} {'measured MiB':>13} {'ratio':>6}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        for n in (int(k) for k in args.n.split(",")):
            cmd = [sys.executable, __file__, "--model", args.model]
            cmd += ["--child", str(size), str(n), args.tiling]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            est, got = row["estimate"] / 2**20, max(row["measured"], 1) / 2**20
            print(f"{size:>6} {n:>3} {row['batch']:>5} {est:>13.1f} {got:>13.1f} {est / got:>6.2f}")


if __name__ == "__main__":
    main()
