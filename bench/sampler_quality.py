"""Sampler quality table: FID (MNIST features) against the number of network evaluations.

For every registered sampler and each budget of NFE (network function
evaluations; classifier-free guidance batches both passes into one, so an NFE
here is one batched U-Net call), sample ``--n`` class-balanced digits from the
shipped model (or ``--model``), compute FID against the 5,000 MNIST digits with
the shipped MNIST feature net, and write ``docs/samplers.md`` (table, plot,
recommendation). DDPM at 1000 steps is the reference row.

    python bench/sampler_quality.py                   # CPU: slow (hours at the defaults)
    python bench/sampler_quality.py --device cuda     # a GPU: minutes

Steps per budget: ``steps = max(1, NFE // nfe_per_step)`` from the sampler records
(Heun, DPM2 and the other 2-call samplers use two evaluations per step; their last step
to sigma 0 is a single Euler evaluation, so they spend one NFE less than the budget).

``--spacings``: a named spacing runs every sampler on that grid as it is (without
AUTOMATIC1111's discard-penultimate-sigma rule); ``auto`` runs each sampler on its own A1111
default grid ("Schedule type: Automatic", with the discard rule where the sampler has it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from noisecraft.api.options import LoadOptions
from noisecraft.errors import NoisecraftError
from noisecraft.io.native import load_pixel_diffusion
from noisecraft.metrics.features import mnist_extractor
from noisecraft.metrics.frechet import fid_from_features
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.samplers import REGISTRY, parse_sampler
from noisecraft.training.config import DataConfig
from noisecraft.training.data import load_dataset

NOTE = (
    "Why Heun, DPM2, PLMS and DPM++ 3M SDE fail at small budgets here: the cosine schedule's "
    "first sigma is about 4096 (betas clipped at 0.999), and with few steps the first step "
    "jumps from it to a sigma near 10. x0 = x - sigma * eps turns a small eps error into a "
    "large one there; first-order samplers only carry it over (and the pixel models clip "
    "x0 to [-1, 1]), but higher-order corrections and multistep extrapolation across that "
    "one step amplify it. Karras spacing shortens the first step and rescues them from "
    "about 20 NFE on."
)

ASSET = Path(__file__).resolve().parent.parent / "src/noisecraft/assets/mnist.safetensors"


#: Heading of the hand-written section of docs/samplers.md that regenerating keeps.
KEPT_SECTION = "## Matching diffusers"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=str(ASSET))
    ap.add_argument("--n", type=int, default=2000, help="samples per cell")
    ap.add_argument("--nfe", default="5,10,20,50,100")
    ap.add_argument("--samplers", default=",".join(REGISTRY))
    ap.add_argument(
        "--spacings",
        default="linspace,karras",
        help="sigma spacings to try for every sampler (one table row each); 'auto' = the "
        "sampler's A1111 default grid",
    )
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--ddpm-steps", type=int, default=1000, help="reference row (0 = skip)")
    ap.add_argument("--out", default="docs/samplers.md")
    ap.add_argument("--json", default="docs/samplers.json")
    args = ap.parse_args()
    try:  # the API's device check: one line, not a traceback, where there is no CUDA
        LoadOptions(device=args.device)
    except NoisecraftError as e:
        print(f"error: {e.render({'device': '--device'})}", file=sys.stderr)
        sys.exit(2)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 numbers, as on the CPU
        torch.backends.cudnn.allow_tf32 = False

    model = load_pixel_diffusion(args.model, device=args.device)
    extractor = mnist_extractor(device=args.device)
    real = extractor(load_dataset(DataConfig(name="mnist")).images)
    k = model.num_classes or 1
    classes = [i % k for i in range(args.n)] if model.num_classes else None

    def fid_of(sampler: str, steps: int, spacing: str = "linspace") -> tuple[float, float]:
        if spacing == "auto":
            spec = parse_sampler(sampler)
        else:  # the grid as named, without A1111's discard rule
            spec = parse_sampler(sampler, spacing, discard_penultimate_sigma=False)
        req = GenerateRequest(
            n=args.n,
            sampler=spec,
            steps=steps,
            cfg=args.cfg,
            classes=classes,
            seed=0,
            batch_size=args.batch,
        )
        t0 = time.perf_counter()
        images = generate(model, req)
        secs = time.perf_counter() - t0
        return fid_from_features(extractor(images), real), secs

    budgets = [int(b) for b in args.nfe.split(",")]
    results: dict[str, dict[int, dict]] = {}
    for spacing in args.spacings.split(","):
        for sampler in args.samplers.split(","):
            per_step = REGISTRY[sampler].nfe_per_step
            name = sampler if spacing == "linspace" else f"{sampler} ({spacing})"
            results[name] = {}
            for nfe in budgets:
                steps = max(1, nfe // per_step)
                fid, secs = fid_of(sampler, steps, spacing)
                results[name][nfe] = {"steps": steps, "fid": fid, "seconds": secs}
                print(
                    f"{name:<26} NFE {nfe:>4} steps {steps:>4}  FID {fid:8.3f}  ({secs:.1f} s)",
                    flush=True,
                )
    reference = None
    if args.ddpm_steps:
        fid, secs = fid_of("ddpm", args.ddpm_steps)
        reference = {"steps": args.ddpm_steps, "fid": fid, "seconds": secs}
        print(f"ddpm reference   steps {args.ddpm_steps}  FID {fid:.3f}  ({secs:.1f} s)")
    write_report(args, budgets, results, reference)


def write_report(args, budgets, results, reference) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    plot = out.with_suffix(".png")
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in results.items():
        style = "--" if "(" in name else "-"
        ax.plot(budgets, [row[b]["fid"] for b in budgets], style, marker="o", label=name)
    if reference:
        ax.axhline(reference["fid"], color="k", ls="--", label=f"ddpm {reference['steps']} steps")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("FID (MNIST features)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot, dpi=110)

    best = {b: min(results, key=lambda s, b=b: results[s][b]["fid"]) for b in budgets}
    lines = [
        "# Samplers: quality against cost",
        "",
        f"FID (features of the shipped MNIST classifier, {args.n} class-balanced samples vs the "
        f"5,000 MNIST digits) of the shipped model `{Path(args.model).name}`, "
        f"classifier-free guidance {args.cfg}, seed 0; rows without a suffix use linspace "
        "sigma spacing, the others the spacing named (as it is, without A1111's "
        "discard-penultimate-sigma rule; 'auto': the sampler's A1111 default grid). "
        "Lower is better. Regenerate with:",
        "",
        "```bash",
        f"python bench/sampler_quality.py --n {args.n} --nfe {args.nfe} --cfg {args.cfg} "
        f"--spacings {args.spacings} --samplers {args.samplers} --device {args.device}",
        "```",
        "",
        "| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for name, row in results.items():
        cells = []
        for b in budgets:
            cell = f"{row[b]['fid']:.2f}"
            cells.append(f"**{cell}**" if best[b] == name else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if reference:
        lines += [
            "",
            f"Reference: DDPM with {reference['steps']} steps: FID {reference['fid']:.2f}.",
        ]
    lines += ["", "## Which sampler at which budget", ""]
    for b in budgets:
        fid = results[best[b]][b]["fid"]
        rel = f" ({fid / reference['fid']:.2f}x the 1000-step DDPM FID)" if reference else ""
        lines.append(f"- {b} NFE: **{best[b]}**, FID {fid:.2f}{rel}")
    lines += ["", NOTE, "", f"![FID against NFE]({plot.name})", ""]
    kept = out.read_text().partition(KEPT_SECTION)[1:] if out.exists() else ("", "")
    if kept[0]:  # a hand-written section after the table (not measured here) stays
        lines += [kept[0] + kept[1].rstrip("\n"), ""]
    out.write_text("\n".join(lines))
    Path(args.json).write_text(
        json.dumps({"args": vars(args), "results": results, "reference": reference}, indent=1)
    )
    print(f"wrote {out}, {plot}, {args.json}")


if __name__ == "__main__":
    main()
