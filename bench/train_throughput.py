"""Training throughput: noisecraft vs denoising-diffusion-pytorch, measured in one process.

Run with ``make bench-train`` (it builds ``.bench-venv`` with torch 2.14.1 +
torchvision, which lucidrains' package needs, and installs noisecraft there
so both trainers run on the same torch). Both train on the same MNIST
digits (28x28, batch 64, fp32, one process, same thread count); timing
alternates between the two in rounds so that machine noise hits both alike.

Two comparisons are printed:
  * recipe vs default: our ``configs/mnist.toml`` network against lucidrains'
    ``Unet(dim=32, dim_mults=(1, 2, 2))`` (the closest their U-Net allows to 28x28);
  * size-matched: a noisecraft U-Net widened to lucidrains' parameter count
    (36 base channels instead of 32).
The ratio is samples/s (noisecraft) / samples/s (reference).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch


def lucidrains_step_fn(images: torch.Tensor, batch: int, dim: int):
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    torch.manual_seed(0)
    unet = Unet(dim=dim, dim_mults=(1, 2, 2), channels=1)
    diffusion = GaussianDiffusion(unet, image_size=28, timesteps=1000, objective="pred_noise")
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-4)
    x01 = (images + 1) / 2  # it normalises [0, 1] -> [-1, 1] itself
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(0, len(x01), (batch,), generator=g)
        loss = diffusion(x01[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in unet.parameters())


def noisecraft_step_fn(model_overrides: dict, run_dir: str):
    from noisecraft.training.config import load_config
    from noisecraft.training.trainer import Trainer

    cfg = load_config("configs/mnist.toml", [f"run.dir={run_dir!r}".replace("'", '"')])
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, **model_overrides),
        run=dataclasses.replace(cfg.run, progress=False, sample_every=0, checkpoint_every=0),
    )
    trainer = Trainer(cfg, overwrite=True)
    return trainer.train_step, sum(p.numel() for p in trainer.model.parameters()), trainer


def timed(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t0


def compare(name: str, ours, theirs, batch: int, rounds: int, steps: int) -> float:
    (our_step, our_params), (their_step, their_params) = ours, theirs
    for s in (our_step, their_step):  # warm-up
        timed(s, 2)
    ours_sps, theirs_sps = [], []
    for _ in range(rounds):
        ours_sps.append(steps * batch / timed(our_step, steps))
        theirs_sps.append(steps * batch / timed(their_step, steps))
    o, t = statistics.median(ours_sps), statistics.median(theirs_sps)
    print(
        f"{name:<22} noisecraft {our_params / 1e6:5.2f} M params {o:7.1f} samples/s | "
        f"denoising-diffusion-pytorch {their_params / 1e6:5.2f} M params {t:7.1f} samples/s | "
        f"ratio {o / t:4.2f}x"
    )
    return o / t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per timed round")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch 64, 28x28 MNIST, fp32 CPU")

    from noisecraft.training.config import DataConfig
    from noisecraft.training.data import load_dataset

    images = load_dataset(DataConfig(name="mnist")).images
    with tempfile.TemporaryDirectory() as tmp:
        step, params, trainer = noisecraft_step_fn({}, f"{tmp}/a")
        ref = lucidrains_step_fn(images, 64, dim=32)
        compare("recipe vs dim=32", (step, params), ref, 64, args.rounds, args.steps)
        # widen ours to their parameter count (36 base channels: 1.40 M against 1.41 M)
        wide = {"model_channels": 36, "norm_groups": 4, "head_channels": 36}
        step2, params2, _ = noisecraft_step_fn(wide, f"{tmp}/b")
        compare("size-matched", (step2, params2), ref, 64, args.rounds, args.steps)


if __name__ == "__main__":
    main()
