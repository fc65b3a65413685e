"""`noisecraft viz ...`: figures that show what the diffusion process does.

``viz forward`` draws the forward-noising strip of one image (improved DDPM fig. 3);
``viz vlb`` plots a checkpoint's variational-bound terms per timestep (improved DDPM fig. 2).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from noisecraft.errors import CheckpointError, ConfigError, DataError, unknown_name

if TYPE_CHECKING:
    from PIL import Image

viz_app = typer.Typer(
    help="Seeing inside: forward-noising strips and per-timestep VLB plots.",
    no_args_is_help=True,
)

# scikit-image samples that ship with the package (no download needed)
SKIMAGE_SAMPLES = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "moon",
    "page",
    "rocket",
    "text",
)
_MNIST = re.compile(r"mnist:(?:index=)?(\d+)")
_MNIST_CLASS = re.compile(r"mnist:class=(\d+)")


def _skimage_image(name: str) -> Image.Image:
    import numpy as np
    from PIL import Image

    try:
        from skimage import data as skdata
    except ImportError:
        raise DataError(
            f"image '{name}' not found; it is not a file, and scikit-image sample names "
            "(astronaut, camera, ...) need `pip install scikit-image`"
        ) from None
    if name not in SKIMAGE_SAMPLES:
        raise unknown_name("image (no such file or scikit-image sample)", name, SKIMAGE_SAMPLES)
    try:
        arr = np.asarray(getattr(skdata, name)())
    except Exception as e:  # a sample that needs a download, or an older scikit-image
        raise DataError(f"scikit-image sample '{name}' could not be loaded ({e})") from None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    im = Image.fromarray(arr)
    return im.convert("RGB") if im.mode == "RGBA" else im


@functools.cache
def _mnist():
    from noisecraft.training.config import DataConfig
    from noisecraft.training.data import load_mnist

    return load_mnist(DataConfig(name="mnist", class_conditional=True))


def _mnist_image(index: int) -> Image.Image:
    from PIL import Image

    images = _mnist().images
    if not 0 <= index < len(images):
        raise ConfigError(
            f"mnist:{index} is out of range; use mnist:N with 0 <= N < {len(images)} (an index), "
            "or mnist:class=K for a digit K"
        )
    arr = ((images[index, 0] + 1.0) * 127.5).round().clamp(0, 255).byte().numpy()
    return Image.fromarray(arr)


def _mnist_class_image(digit: int) -> Image.Image:
    """The first shipped MNIST image of class ``digit``."""
    labels = _mnist().labels
    found = (labels == digit).nonzero()
    if not len(found):
        raise ConfigError(f"mnist:class={digit}: MNIST classes are the digits 0 to 9")
    return _mnist_image(int(found[0, 0]))


def load_source_image(spec: str) -> Image.Image:
    """An image file, ``mnist:N`` (the shipped MNIST image at index N), ``mnist:class=K`` (the
    first one of digit K) or a scikit-image sample name."""
    from PIL import Image, UnidentifiedImageError

    path = Path(spec).expanduser()
    if path.is_file():
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB") if im.mode in ("RGBA", "P", "CMYK", "YCbCr") else im
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{spec} is not a readable image ({type(e).__name__}: {e})") from None
    if path.exists():
        raise DataError(f"{spec} is not a file; give an image file, mnist:N or a sample name")
    m = _MNIST.fullmatch(spec)
    if m:
        return _mnist_image(int(m.group(1)))
    m = _MNIST_CLASS.fullmatch(spec)
    if m:
        return _mnist_class_image(int(m.group(1)))
    if spec.startswith("mnist:"):
        raise ConfigError(
            f"'{spec}': write mnist:class=K for a digit K (e.g. mnist:class=7) or mnist:N for "
            "the image at index N"
        )
    if re.fullmatch(r"[a-z_]+", spec):
        return _skimage_image(spec)
    raise DataError(
        f"image {spec} not found; give an image file, mnist:N or a scikit-image sample name"
    )


@viz_app.command("forward")
def forward_command(
    image: Annotated[
        str,
        typer.Argument(
            help="image file; mnist:class=K (the first MNIST digit K, e.g. mnist:class=7) or "
            "mnist:N (the MNIST image at index N, not the digit N); or a scikit-image sample "
            "(astronaut, camera)"
        ),
    ],
    steps: Annotated[
        str | None,
        typer.Option(help="comma list of t; default 0,50,100,250,500,750,999 (scaled to T)"),
    ] = None,
    schedule: Annotated[
        list[str] | None,
        typer.Option(help="linear | cosine | scaled_linear | sigmoid; repeat for one row each"),
    ] = None,
    num_steps: Annotated[int, typer.Option(help="T, the number of training timesteps")] = 1000,
    size: Annotated[int, typer.Option(help="resize (shorter side) and centre-crop to this")] = 64,
    seed: Annotated[int, typer.Option(help="seed of the one noise draw shared by all tiles")] = 0,
    labels: Annotated[bool, typer.Option(help="label each tile with t and alpha-bar")] = True,
    out: Annotated[Path, typer.Option(help="image to write")] = Path("forward.png"),
    overwrite: Annotated[bool, typer.Option(help="replace an existing file")] = False,
) -> None:
    """The forward-noising strip: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps at each t.

    One noise draw eps is used for every tile, so the same noise fades in; with several
    --schedule there is one row per schedule (improved DDPM fig. 3: linear vs cosine).
    """
    from noisecraft.diffusion import NoiseSchedule
    from noisecraft.io.atomic import check_writable
    from noisecraft.viz.forward_strip import (
        default_steps,
        image_to_tensor,
        parse_steps,
        save_forward_strip,
    )

    if num_steps < 2:
        raise ConfigError(f"--num-steps must be at least 2, got {num_steps}")
    if size < 1:
        raise ConfigError(f"--size must be at least 1, got {size}")
    ts = parse_steps(steps, num_steps) if steps is not None else default_steps(num_steps)
    names = [n for s in (schedule or ["cosine"]) for n in s.split(",") if n]
    schedules = [NoiseSchedule.from_name(n, num_steps=num_steps) for n in names]
    check_writable(out, overwrite=overwrite)
    x0 = image_to_tensor(load_source_image(image), size)
    path = save_forward_strip(
        out, x0, schedules, ts, seed=seed, labels=labels, row_names=names, overwrite=overwrite
    )
    typer.echo(f"wrote {path}")


def _data_config(model, data: str | None, checkpoint: str):
    """The checkpoint's recorded DataConfig (or ``--data``), at the model's size and channels."""
    from noisecraft.training.config import DataConfig
    from noisecraft.training.data import LOADERS

    recorded = model.info.training.get("data") if model.info else None
    known = {f.name for f in dataclasses.fields(DataConfig)}
    d = {k: v for k, v in (recorded or {}).items() if k in known}
    if data is not None:
        if data in LOADERS and data != "folder":
            d = {"name": data}
        else:
            d = {**d, "name": "folder", "path": data}
    elif recorded is None:
        raise CheckpointError(
            f"{checkpoint} does not record its training data; pass --data mnist|digits|FOLDER"
        )
    channels = model.unet.config.in_channels
    return DataConfig(
        **{**d, "image_size": model.image_size, "channels": channels, "class_conditional": False}
    )


@viz_app.command("vlb")
def vlb_command(
    checkpoint: Annotated[str, typer.Argument(help="model .safetensors, or 'mnist'")],
    n: Annotated[int, typer.Option("--n", help="number of real images")] = 64,
    batch: Annotated[int, typer.Option(help="images per forward pass")] = 64,
    timesteps: Annotated[
        int,
        typer.Option(
            help="evaluate t = 0 and K-1 evenly spaced t in [1, T-1]; the rest interpolated"
        ),
    ] = 50,
    seed: Annotated[int, typer.Option(help="seed of the noise draws")] = 0,
    data: Annotated[
        str | None,
        typer.Option(help="use these images instead of the recorded ones: mnist|digits|FOLDER"),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    out: Annotated[Path, typer.Option(help="plot to write (png, pdf, svg)")] = Path("vlb.png"),
    csv: Annotated[
        Path | None,
        typer.Option(help="CSV to write, one row per evaluated t; default: OUT with .csv"),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace existing files")] = False,
) -> None:
    """Plot the variational-bound terms L_t (bits/dim) per timestep; print the total bits/dim.

    The images are the first N of the dataset the checkpoint was trained on (recorded in its
    metadata); held-out images are not distinguished yet, so this is the bound on training
    data. Class-conditional models are scored with the null class (the unconditional bound).
    With --timesteps K < T the total is an estimate: the unevaluated terms are interpolated.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from noisecraft.api.options import LoadOptions
    from noisecraft.api.shipped import resolve_model
    from noisecraft.diffusion import vlb_terms
    from noisecraft.io.atomic import check_writable
    from noisecraft.io.native import load_pixel_diffusion
    from noisecraft.io.write_errors import new_outputs_removed_on_error
    from noisecraft.training.data import load_dataset
    from noisecraft.viz.vlb_plot import VLBCurve, plot_vlb, vlb_timesteps, write_vlb_csv

    if n < 1 or batch < 1:
        raise ConfigError(f"--n and --batch must be at least 1, got {n} and {batch}")
    LoadOptions(device=device)  # the API's device check: one line where there is no CUDA
    csv = out.with_suffix(".csv") if csv is None else csv
    check_writable(out, overwrite=overwrite)
    check_writable(csv, overwrite=overwrite)
    if out.resolve() == csv.resolve():
        raise ConfigError("--out and --csv name the same file; give two different paths")
    model = load_pixel_diffusion(resolve_model(checkpoint), device=device)
    T = model.schedule.num_steps
    ts = vlb_timesteps(T, timesteps)
    cfg = _data_config(model, data, checkpoint)
    try:
        images = load_dataset(dataclasses.replace(cfg, limit=n)).images
    except DataError as e:
        raise DataError(f"{e} (dataset of {checkpoint}; pass --data to use other images)") from None
    if len(images) < n:
        typer.echo(f"the dataset has only {len(images)} images; using all of them")
    kw = {}
    gen = torch.Generator(device=device).manual_seed(seed)
    terms, prior = [], []
    parts = images.split(batch)
    desc = f"VLB ({len(parts)} batches x {len(ts)} timesteps)"
    with torch.no_grad(), tqdm(total=len(parts) * len(ts), desc=desc) as bar:
        for x in parts:
            x = x.to(device)
            if model.num_classes is not None:
                kw = {"class_labels": torch.full((len(x),), model.unet.null_class, device=device)}
            res = vlb_terms(
                model.unet,
                model.schedule,
                x,
                prediction=model.prediction,
                learned_variance=model.learned_variance,
                model_kwargs=kw,
                timesteps=ts,
                generator=gen,
                callback=lambda t: bar.update(1),
            )
            terms.append(res["terms"].double().cpu())
            prior.append(res["prior"].double().cpu())
    all_terms = torch.cat(terms).numpy()
    curve = VLBCurve(
        timesteps=tuple(ts),
        terms=all_terms.mean(axis=0),
        std=all_terms.std(axis=0),
        prior=float(torch.cat(prior).mean()),
        num_steps=T,
        n=len(all_terms),
        abar=model.schedule.alphas_cumprod[ts].numpy(),
    )
    if not np.isfinite(curve.terms).all():
        raise ConfigError("some VLB terms are not finite; the checkpoint's weights may be broken")
    total = curve.total()
    typer.echo(f"evaluated {len(ts)} of {T} timesteps on {curve.n} images ({cfg.name})")
    typer.echo(f"L_T (prior) {curve.prior:.4g}   L_0 (decoder) {curve.terms[0]:.4g} bits/dim")
    if curve.exact:
        typer.echo(f"total: {total:.4f} bits/dim (exact: all {T} terms)")
    else:
        typer.echo(
            f"total: {total:.4f} bits/dim (estimate: {len(ts)} of {T} terms evaluated, "
            "the rest interpolated)"
        )
    with new_outputs_removed_on_error(out, csv):  # both or neither
        plot_vlb(out, curve, overwrite=overwrite)
        write_vlb_csv(csv, curve, overwrite=overwrite)
    typer.echo(f"wrote {csv}")
    typer.echo(f"wrote {out}")
