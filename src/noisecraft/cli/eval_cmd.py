"""`noisecraft eval`: sample from a checkpoint and score it (FID, KID, IS, P/R, bits/dim)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from noisecraft.cli import options as o
from noisecraft.errors import ConfigError


def eval_command(
    checkpoint: Annotated[str, typer.Argument(help="model .safetensors, or 'mnist'")] = "mnist",
    metrics: Annotated[str, typer.Option(help="comma list of fid,kid,is,pr,bpd")] = "fid,kid,is,pr",
    n: Annotated[int, typer.Option("--n", help="number of samples")] = 5000,
    sampler: Annotated[str, typer.Option(help="see `noisecraft samplers`")] = "dpmpp_2m",
    schedule: o.Schedule = None,
    steps: Annotated[int, typer.Option(help="sampling steps")] = 20,
    cfg: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 2.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    features: Annotated[str, typer.Option(help="feature net: mnist | inception")] = "mnist",
    inception: Annotated[
        Path | None, typer.Option(help="path of pt_inception-2015-12-05-6726825d.pth")
    ] = None,
    bpd_timesteps: Annotated[
        int, typer.Option(help="evenly spaced t for the bpd estimate (0 = all T)")
    ] = 100,
    bpd_n: Annotated[int, typer.Option(help="real images for bits/dim")] = 256,
    batch: Annotated[int, typer.Option(help="sampling batch size")] = 500,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    out: Annotated[Path, typer.Option(help="JSON file to write")] = Path("eval.json"),
    overwrite: Annotated[bool, typer.Option(help="replace an existing JSON file")] = False,
) -> None:
    """Sample N images and compare them with the model's training data; print a table, write JSON.

    bits/dim is the variational bound (DDPM eq. 5) of real images under the model, with the
    null class for class-conditional models (the unconditional bound); with --bpd-timesteps K it
    is estimated from K evenly spaced terms (an estimate, reported as such).

    The JSON is written after each metric ("complete": false until all are done), so Ctrl-C
    keeps the metrics already computed.
    """
    import torch
    from tqdm.auto import tqdm

    from noisecraft.api.options import LoadOptions
    from noisecraft.api.shipped import resolve_model
    from noisecraft.cli.main import _default_classes
    from noisecraft.diffusion import vlb_terms
    from noisecraft.io.atomic import check_writable
    from noisecraft.io.native import load_pixel_diffusion
    from noisecraft.metrics.evaluate import _check_sizes, evaluate, parse_metrics
    from noisecraft.metrics.features import get_extractor
    from noisecraft.pipelines import GenerateRequest, generate
    from noisecraft.training.config import DataConfig
    from noisecraft.training.data import load_dataset

    names = parse_metrics(metrics)
    for flag, value, least in (("--n", n, 1), ("--batch", batch, 1), ("--bpd-n", bpd_n, 1)):
        if value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}")
    if bpd_timesteps < 0:
        raise ConfigError(
            f"--bpd-timesteps must be 0 (all T) or a number of timesteps, got {bpd_timesteps}"
        )
    LoadOptions(device=device)  # the API's device check: one line where there is no CUDA
    check_writable(out, overwrite=overwrite)
    if features == "inception" and inception is None:
        raise ConfigError(
            "--features inception needs --inception PATH: put pt_inception-2015-12-05-6726825d.pth "
            "(the standard FID weights) on disk and give its path"
        )
    model = load_pixel_diffusion(resolve_model(checkpoint), device=device)
    data_cfg = (model.info.training.get("data") if model.info else None) or {"name": "mnist"}
    real = load_dataset(DataConfig(**{**data_cfg, "limit": 0})).images
    extractor = None
    if set(names) - {"bpd"}:
        extractor = get_extractor(features, inception, device=device)
        # the size checks run before sampling, so a too-small --n fails at once
        _check_sizes(names, n, len(real), extractor.feature_dim, is_splits=1, pr_k=3)
    classes, _ = _default_classes(n, model.num_classes, None)
    if classes is not None:  # class-balanced, like the data
        classes = [i % model.num_classes for i in range(n)]
    req = GenerateRequest(
        n=n,
        sampler=sampler,
        spacing=schedule,
        steps=steps,
        cfg=cfg,
        classes=classes,
        seed=seed,
        batch_size=batch,
    )
    req.validate(model)
    settings = {
        "checkpoint": str(checkpoint),
        "n": n,
        "sampler": sampler,
        "schedule": req.spec.schedule,
        "steps": steps,
        "cfg": cfg,
        "seed": seed,
        "features": features,
        "bpd_timesteps": bpd_timesteps if "bpd" in names else None,
    }
    saved: dict[str, float] = {}

    def save(result: dict[str, float], *, complete: bool = False) -> None:
        """Write the metrics so far (atomically: a reader sees the old or the new JSON)."""
        _write_json(out, {**settings, "metrics": result, "complete": complete})
        saved.clear()
        saved.update(result)

    T = model.schedule.num_steps
    ts = None if bpd_timesteps == 0 else torch.linspace(0, T - 1, min(bpd_timesteps, T)).long()
    n_ts = T if ts is None else len(ts)

    def bpd_fn(x: torch.Tensor, bar) -> torch.Tensor:
        kw = {}
        if model.num_classes is not None:
            kw["class_labels"] = torch.full((len(x),), model.unet.null_class, device=device)
        return vlb_terms(
            model.unet,
            model.schedule,
            x.to(device),
            prediction=model.prediction,
            learned_variance=model.learned_variance,
            model_kwargs=kw,
            timesteps=None if ts is None else ts.tolist(),
            callback=lambda t: bar.update(1),
        )["total"].cpu()

    try:
        result: dict[str, float] = {}
        if extractor is not None:
            batches = -(-n // batch)
            with tqdm(total=steps * batches, desc=f"sampling {n} images") as bar:
                samples = generate(model, req, callback=lambda d: bar.update(1))
            result = evaluate(
                samples,
                real,
                metrics=[m for m in names if m != "bpd"],
                extractor=extractor,
                seed=seed,
                on_metric=save,
            )
        if "bpd" in names:
            parts = real[:bpd_n].split(64)
            desc = f"bits/dim ({len(parts)} batches x {n_ts} timesteps)"
            with torch.no_grad(), tqdm(total=len(parts) * n_ts, desc=desc) as bar:
                values = [bpd_fn(x, bar) for x in parts]
            result["bpd"] = float(torch.cat(values).mean())
        save(result, complete=True)
    except KeyboardInterrupt:
        if saved:
            typer.echo(
                f'interrupted: {", ".join(saved)} saved to {out} ("complete": false)', err=True
            )
        else:
            typer.echo(f"interrupted before the first metric; {out} not written", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"{'metric':<24} value")
    for k, v in result.items():
        typer.echo(f"{k:<24} {v:.4f}")
    typer.echo(f"wrote {out}")


def _write_json(path: Path, doc: dict) -> None:
    from noisecraft.io.atomic import atomic_path
    from noisecraft.io.write_errors import writing

    with writing(path), atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2))
