"""Do the mini SD's cross-attention maps point at the digit? A table for docs/seeing-inside.md.

For each digit d and each seed, ``noisecraft.load("mnist-text")`` makes "a handwritten d"
with ``observe=Observer(attention=True)`` (DAAM maps, :mod:`noisecraft.pipelines.observe`);
each word's map is scored by the share of its top 20 % pixels that are ink (pixel > 0 on
[-1, 1]; :func:`noisecraft.metrics.attention_overlap.top_overlap`). A map blind to the
image scores the ink's area fraction on average (column ``ink``). ``digit > a``: for how
many seeds the digit's map beats the map of "a".

    flock /work/cpu.lock python bench/attention_overlap.py [--seeds 10] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

import noisecraft
from noisecraft.metrics.attention_overlap import ink_mask, top_overlap


def measure(pipe, digit: int, seeds: int, steps: int, top: float = 0.2) -> dict:
    """Per-word overlaps (one list per word, one value per seed) for "a handwritten {digit}"."""
    result = pipe(
        f"a handwritten {digit}",
        seed=0,
        n=seeds,
        steps=steps,
        observe=noisecraft.Observer(attention=True),
    )
    rows: dict[str, list[float]] = {"ink": []}
    for image, maps in zip(result.tensors, result.observed.attention, strict=True):
        mask = ink_mask(image)
        rows["ink"].append(float(mask.float().mean()))
        for token, heat in zip(maps.tokens, maps.maps, strict=True):
            key = "digit" if token == str(digit) else token
            rows.setdefault(key, []).append(top_overlap(torch.from_numpy(heat), mask, top))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="images per digit (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = noisecraft.load("mnist-text")
    t0 = time.perf_counter()
    print(f"top 20 % of each word's map on the ink; seeds 0..{args.seeds - 1}, {args.steps} steps")
    print("| digit | ink | a | handwritten | digit | digit > a |")
    print("|---|---|---|---|---|---|")
    totals: dict[str, list[float]] = {}
    wins = 0
    for d in range(10):
        rows = measure(pipe, d, args.seeds, args.steps)
        win = sum(x > y for x, y in zip(rows["digit"], rows["a"], strict=True))
        wins += win
        for k, v in rows.items():
            totals.setdefault(k, []).extend(v)
        mean = {k: sum(v) / len(v) for k, v in rows.items()}
        print(
            f"| {d} | {mean['ink']:.3f} | {mean['a']:.3f} | {mean['handwritten']:.3f} | "
            f"{mean['digit']:.3f} | {win}/{args.seeds} |"
        )
    mean = {k: sum(v) / len(v) for k, v in totals.items()}
    print(
        f"| all | {mean['ink']:.3f} | {mean['a']:.3f} | {mean['handwritten']:.3f} | "
        f"{mean['digit']:.3f} | {wins}/{10 * args.seeds} |"
    )
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
