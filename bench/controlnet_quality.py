"""Does the shipped canny ControlNet (``mnist_canny``) steer the mini SD? Measured on held-out
digits: the 1,000 MNIST digits (100 per class) that neither the ControlNet
(configs/mnist_controlnet.toml trains on ``data.split = "train"``) nor the shipped classifier
was trained on (:func:`noisecraft.metrics.mnist_net.heldout_split`).

Each held-out digit (32x32, padded as in training) becomes a canny hint by the pipeline's own
preprocessor; image i is generated from it with seed i, 20 steps of DPM++ 2M (Karras).

* (a) empty prompt: the share of outputs the shipped classifier reads as the hint's digit,
  with the ControlNet (weight 1) and without (the base alone: chance, ~10 %);
* (b) edge overlap: the F1 of the output's canny edges against the hint within 1 px
  (:mod:`noisecraft.metrics.edge_overlap`), with and without the ControlNet;
* (c) a conflicting prompt, "a handwritten 3" at CFG 5, with the hints of held-out 7s: the
  share read as 7 and as 3 at weights 1.0, 0.5, 0.2 and 0 (no ControlNet); ``--picture``
  writes the grid of docs/controlnet/conflict.png.

With an empty prompt both halves of classifier-free guidance are the same (prompt "" and
negative prompt "", the same hint), so (a) and (b) run at CFG 1, which gives the same images
at half the work.

    python bench/controlnet_quality.py                      # n = 1000, about 10 min on 2 cores
    python bench/controlnet_quality.py --n 200 --picture docs/controlnet/conflict.png
    python bench/controlnet_quality.py --controlnet runs/mnist_controlnet/model.safetensors
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import Tensor

from noisecraft.io.controlnet_files import load_controlnet
from noisecraft.io.native import load_latent_diffusion
from noisecraft.io.shipped import SHIPPED_CONTROLNET_DIR, resolve_model
from noisecraft.metrics.digit_shape import read_digits
from noisecraft.metrics.edge_overlap import edge_f1
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.pipelines.control import ControlInput
from noisecraft.training.config import DataConfig
from noisecraft.training.data import load_dataset
from noisecraft.training.tasks.controlnet import image_hints

SHIPPED = SHIPPED_CONTROLNET_DIR / "mnist_canny.safetensors"
CONFLICT_PROMPT = "a handwritten 3"
CONFLICT_WEIGHTS = (1.0, 0.5, 0.2, 0.0)


class PerImageHints:
    """A ControlNet called with one hint per image of the batch (``hints`` (B, 3, H, W)),
    repeated over the halves of a CFG batch (conditional first, both in image order); the
    unit's own (1, 3, H, W) hint is a placeholder. Lets one :func:`generate` call give every
    image its own hint; ``tests/test_controlnet_trained.py`` checks it against one call per
    image."""

    def __init__(self, net: Any, hints: Tensor):
        self.net, self.hints = net, hints
        self.skip_channels = net.skip_channels  # what the pipeline checks against the U-Net
        self.controlnet_config = net.controlnet_config

    def parameters(self):
        return self.net.parameters()

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, hint: Tensor, **kw: Any):
        reps = x.shape[0] // self.hints.shape[0]
        hints = self.hints.to(x.device, x.dtype).repeat(reps, 1, 1, 1)
        return self.net(x, t, context, hints, **kw)


def heldout_digits(n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` held-out digits (32x32 in [-1, 1]) and labels, classes interleaved
    (digit i has class i % 10 while every class has digits left)."""
    ds = load_dataset(DataConfig(name="mnist", image_size=32, pad=2, split="heldout"))
    labels = ds.labels
    rank = torch.zeros_like(labels)
    for c in range(10):
        where = (labels == c).nonzero().flatten()
        rank[where] = torch.arange(len(where))
    order = torch.argsort(rank * 10 + labels)[:n]
    return ds.images[order], labels[order]


def controlled(
    model: Any,
    net: Any,
    hints: Tensor,
    *,
    prompt: str = "",
    weight: float = 1.0,
    seeds: list[int],
    cfg: float = 1.0,
    steps: int = 20,
    sampler: str = "dpmpp_2m",
) -> Tensor:
    """Image i from hint i and seed i, one batch (``net`` None or ``weight`` 0: no control)."""
    n = len(seeds)
    controls = ()
    if net is not None and weight != 0:
        h, w = hints.shape[-2:]
        unit = ControlInput(PerImageHints(net, hints), torch.zeros(1, 3, h, w), weight=weight)
        controls = (unit,)
    req = GenerateRequest(
        n=n,
        prompts=[prompt],
        sampler=sampler,
        steps=steps,
        cfg=cfg,
        seeds=seeds,
        batch_size=n,
        controls=controls,
    )
    return generate(model, req)


def hint_scores(images: Tensor, digits: Tensor, hints: Tensor) -> dict[str, float]:
    """(a) the share read as ``digits``; (b) mean edge F1 of the canny edges against
    ``hints`` (within 1 px)."""
    read = read_digits(images)
    edges = image_hints(images, "canny")[:, 0]
    target = hints[:, 0] > 0.5
    return {
        "read": (read == digits).float().mean().item(),
        "f1": edge_f1(edges, target).mean().item(),
        "f1_exact": edge_f1(edges, target, tolerance=0).mean().item(),
    }


def conflict_reads(
    model: Any, net: Any, hints: Tensor, seeds: list[int], weights=CONFLICT_WEIGHTS, cfg=5.0
) -> dict[float, tuple[float, float, Tensor]]:
    """(c) weight -> (share read as 7, share read as 3, images) for "a handwritten 3" with
    the hints of 7s."""
    out = {}
    for w in weights:
        images = controlled(
            model, net, hints, prompt=CONFLICT_PROMPT, weight=w, seeds=seeds, cfg=cfg
        )
        read = read_digits(images)
        out[w] = ((read == 7).float().mean().item(), (read == 3).float().mean().item(), images)
    return out


def conflict_grid(hints: Tensor, results: dict, rows: int, path: str, scale: int = 3) -> None:
    """One row per hint: the hint, then the outputs at each weight; nearest-upscaled."""
    from PIL import Image

    tiles = []
    for i in range(rows):
        tiles.append(hints[i, :1] * 2 - 1)
        tiles += [results[w][2][i] for w in results]
    grid = torch.stack(tiles)  # (rows * cols, 1, 32, 32)
    cols = 1 + len(results)
    g = grid.reshape(rows, cols, 32, 32).permute(0, 2, 1, 3).reshape(rows * 32, cols * 32)
    g = torch.nn.functional.pad(g, (0, 0, 0, 0), value=-1)
    img = ((g + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    Image.fromarray(img, "L").resize((cols * 32 * scale, rows * 32 * scale), Image.NEAREST).save(
        path
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="held-out digits for (a) and (b)")
    ap.add_argument("--n-conflict", type=int, default=100, help="held-out 7s for (c)")
    ap.add_argument("--controlnet", default=str(SHIPPED))
    ap.add_argument("--picture", default=None, help="write the (c) grid here (PNG)")
    args = ap.parse_args()
    model = load_latent_diffusion(resolve_model("mnist-text"))
    net = load_controlnet(args.controlnet, model.unet.config)
    images, digits = heldout_digits(args.n)
    hints = image_hints(images, "canny").float().expand(-1, 3, -1, -1)
    seeds = list(range(args.n))
    real = hint_scores(images, digits, hints)
    print(f"held-out digits: {args.n}; classifier on the real digits: {real['read']:.1%}")
    print(
        "\n| empty prompt, 20 DPM++ 2M steps | (a) read as the hint's digit "
        "| (b) edge F1 within 1 px | edge F1, exact pixels |"
    )
    print("|---|---:|---:|---:|")
    for label, use in (("mnist-text alone", None), ("mnist-text + mnist_canny (weight 1)", net)):
        t0 = time.perf_counter()
        s = hint_scores(controlled(model, use, hints, seeds=seeds), digits, hints)
        secs = time.perf_counter() - t0
        print(f"| {label} | {s['read']:.1%} | {s['f1']:.3f} | {s['f1_exact']:.3f} | ({secs:.0f} s)")

    every, labels = heldout_digits(1000)
    sevens = every[labels == 7][: args.n_conflict]
    h7 = image_hints(sevens, "canny").float().expand(-1, 3, -1, -1)
    res = conflict_reads(model, net, h7, list(range(len(sevens))))
    print(
        f'\n| "{CONFLICT_PROMPT}", hint of a 7 (n = {len(sevens)}, CFG 5) | read as 7 | read as 3 |'
    )
    print("|---|---:|---:|")
    for w, (r7, r3, _) in res.items():
        label = f"weight {w}" if w else "no ControlNet"
        print(f"| {label} | {r7:.1%} | {r3:.1%} |")
    if args.picture:
        conflict_grid(h7, res, 6, args.picture)
        print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
