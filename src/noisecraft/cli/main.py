"""`noisecraft` command line (typer). User mistakes print ``error: ...`` and exit 2."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from noisecraft.errors import ConfigError, NoisecraftError, NoisecraftWarning

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="noisecraft: diffusion models from the math. Train, sample, look inside.",
    pretty_exceptions_enable=False,
)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_MODELS = {
    "mnist": ASSETS / "mnist.safetensors",  # class-conditional pixel model
    "mnist-text": ASSETS / "mnist_text.safetensors",  # text-to-image latent model (mini SD)
}


def resolve_model(name: str) -> Path:
    """A checkpoint path, or the name of a shipped model (``mnist``, ``mnist-text``)."""
    if name in BUILTIN_MODELS and not Path(name).exists():
        path = BUILTIN_MODELS[name]
        if not path.is_file():
            raise ConfigError(
                f"the shipped model '{name}' is not in this install ({path} is missing); "
                "pass --model PATH of a model you trained (e.g. runs/mnist_text/model.safetensors)"
            )
        return path
    return Path(name)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="TOML recipe, e.g. configs/mnist.toml")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many steps")] = None,
    overwrite: Annotated[bool, typer.Option(help="start over in an existing run dir")] = False,
) -> None:
    """Train a model; resumes automatically when the run dir holds a checkpoint."""
    from noisecraft.training.config import load_config
    from noisecraft.training.trainer import Trainer

    cfg = load_config(config, set_ or [])
    trainer = Trainer(cfg, overwrite=overwrite)
    if trainer.dataset.skipped and trainer.dist.is_main:
        typer.echo(f"skipped {trainer.dataset.skipped} unreadable image(s) in {cfg.data.path}")
    if trainer.step and trainer.dist.is_main:
        typer.echo(f"resuming {trainer.run_dir} from step {trainer.step}")
    res = trainer.train(max_steps)
    if trainer.dist.is_main:
        typer.echo(
            f"trained to step {res.step} in {res.seconds:.0f} s ({res.samples_per_second:.1f} "
            f"samples/s); model: {res.run_dir / 'model.safetensors'}"
        )


def _default_classes(n: int, num_classes: int | None, klass: int | None) -> tuple[list | None, int]:
    """Labels and grid row length: one row per class unless ``--class`` picks one."""
    if num_classes is None:
        if klass is not None:
            raise ConfigError("this model is unconditional; leave out --class")
        return None, math.ceil(math.sqrt(n))
    if klass is not None:
        return [klass] * n, math.ceil(math.sqrt(n))
    per = math.ceil(n / num_classes)
    return [min(i // per, num_classes - 1) for i in range(n)], per


def run_sampling(
    checkpoint: str,
    *,
    sampler: str,
    steps: int,
    n: int | None,
    seed: int,
    cfg: float,
    klass: int | None,
    out: Path,
    gif: Path | None,
    overwrite: bool,
    spacing: str | None = None,
    device: str = "cpu",
    save_every: int = 0,
) -> list[Path]:
    """Sample from a checkpoint with a progress bar; write a grid (and a GIF). Returns the paths."""
    from tqdm.auto import tqdm

    from noisecraft.io.atomic import check_writable
    from noisecraft.pipelines import GenerateRequest, PixelDiffusion, generate
    from noisecraft.viz.images import (
        DenoisingRecorder,
        IntermediateWriter,
        save_gif,
        save_grid,
    )

    check_writable(out, overwrite=overwrite)
    if gif is not None:
        check_writable(gif, overwrite=overwrite)
    model = PixelDiffusion.load(resolve_model(checkpoint), device=device)
    k = model.num_classes
    if n is None:
        n = 8 * k if k else 64
    classes, nrow = _default_classes(n, k, klass)
    req = GenerateRequest(
        n=n, sampler=sampler, steps=steps, spacing=spacing, cfg=cfg, classes=classes, seed=seed
    )
    req.validate(model)
    recorder = DenoisingRecorder(nrow=nrow) if gif is not None else None
    scale = max(1, 256 // (nrow * model.image_size)) if model.image_size < 64 else 1
    if save_every < 0:
        raise ConfigError(f"--save-every must be >= 0, got {save_every}")
    inter = None
    if save_every:
        folder = out.with_name(out.stem + "_steps")
        inter = IntermediateWriter(folder, save_every, nrow, scale, overwrite=overwrite)
    with tqdm(total=steps, desc=f"sampling {n} images ({sampler}, {steps} steps)") as bar:

        def callback(d: dict) -> None:
            bar.update(1)
            if recorder is not None:
                recorder(d)
            if inter is not None:
                inter(d)

        images = generate(model, req, callback=callback)
    text = {
        "parameters": f"sampler: {sampler}, steps: {steps}, cfg: {cfg}, seed: {seed}, "
        f"model: {checkpoint}"
    }
    written = [save_grid(images, out, nrow=nrow, scale=scale, overwrite=overwrite, text=text)]
    if recorder is not None:
        recorder.add(images, images)
        written.append(save_gif(recorder.frames, gif, scale=scale, overwrite=overwrite))
    if inter is not None and inter.written:
        written.append(inter.folder)
    return written


@app.command()
def sample(
    checkpoint: Annotated[
        str, typer.Argument(help="model .safetensors, or 'mnist' for the shipped model")
    ] = "mnist",
    sampler: Annotated[str, typer.Option(help="see `noisecraft samplers`")] = "dpmpp_2m",
    steps: Annotated[int, typer.Option(help="sampling steps")] = 20,
    n: Annotated[int | None, typer.Option("--n", help="number of images")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    cfg: Annotated[float, typer.Option(help="classifier-free guidance scale (1 = off)")] = 2.0,
    klass: Annotated[int | None, typer.Option("--class", help="draw only this class")] = None,
    spacing: Annotated[
        str | None, typer.Option(help="linspace | leading | trailing | karras | exponential")
    ] = None,
    out: Annotated[Path, typer.Option(help="grid PNG to write")] = Path("grid.png"),
    gif: Annotated[Path | None, typer.Option(help="also write a denoising GIF here")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    save_every: Annotated[
        int, typer.Option(help="save x_t and predicted x0 every K steps into OUT_steps/")
    ] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace existing output files")] = False,
) -> None:
    """Generate a grid of images from a checkpoint (one row per class)."""
    paths = run_sampling(
        checkpoint,
        sampler=sampler,
        steps=steps,
        n=n,
        seed=seed,
        cfg=cfg,
        klass=klass,
        out=out,
        gif=gif,
        overwrite=overwrite,
        spacing=spacing,
        device=device,
        save_every=save_every,
    )
    for p in paths:
        typer.echo(f"wrote {p}")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option(help="where to write")] = Path("outputs"),
    steps: Annotated[int, typer.Option(help="sampling steps")] = 20,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="replace earlier demo images instead of numbering new ones")
    ] = False,
) -> None:
    """The main job: digits from the shipped MNIST model, a grid and a denoising GIF.

    Earlier outputs are kept: a second run writes ``digits_2.png`` and so on
    unless ``--overwrite`` is given.
    """
    from noisecraft.io.atomic import free_path

    out_dir.mkdir(parents=True, exist_ok=True)
    grid, gif = out_dir / "digits.png", out_dir / "denoising.gif"
    if not overwrite:
        grid, gif = free_path(grid), free_path(gif)
    paths = run_sampling(
        "mnist",
        sampler="dpmpp_2m",
        steps=steps,
        n=None,
        seed=seed,
        cfg=2.0,
        klass=None,
        out=grid,
        gif=gif,
        overwrite=overwrite,
    )
    typer.echo("one row per digit class 0-9 (classifier-free guidance 2.0, DPM++ 2M)")
    for p in paths:
        typer.echo(f"wrote {p.resolve()}")
    if BUILTIN_MODELS["mnist-text"].is_file():
        text = out_dir / "text_digits.png"
        written = text_demo(text if overwrite else free_path(text), steps, seed, overwrite)
        typer.echo('text-to-image (mini Stable Diffusion): row k is "a handwritten <k>"')
        typer.echo(f"wrote {written.resolve()}")


def text_demo(out: Path, steps: int, seed: int, overwrite: bool, per_row: int = 8) -> Path:
    """Ten prompts "a handwritten zero" ... "nine" through the shipped text-to-image model."""
    from tqdm.auto import tqdm

    from noisecraft.pipelines import GenerateRequest, LatentDiffusion, count_steps, generate
    from noisecraft.training.captions import DIGIT_WORDS
    from noisecraft.viz.images import save_grid

    model = LatentDiffusion.load(BUILTIN_MODELS["mnist-text"])
    prompts = [f"a handwritten {w}" for w in DIGIT_WORDS for _ in range(per_row)]
    req = GenerateRequest(n=len(prompts), prompts=prompts, steps=steps, cfg=5.0, seed=seed)
    with tqdm(total=count_steps(model, req), desc="text-to-image") as bar:
        images = generate(model, req, callback=lambda d: bar.update(1))
    text = {"parameters": f"prompts: a handwritten zero..nine, steps: {steps}, cfg: 5.0"}
    return save_grid(images, out, nrow=per_row, scale=4, overwrite=overwrite, text=text)


@app.command("samplers")
def list_samplers() -> None:
    """List the samplers: A1111 name, order, cost and default schedule."""
    from noisecraft.samplers import RECORDS

    typer.echo(
        f"{'name':<19} {'A1111 name':<18} {'kind':<13} {'order':>5} {'NFE/step':>8}  "
        f"{'schedule':<14} description"
    )
    for r in RECORDS:
        kind = "stochastic" if r.stochastic else "deterministic"
        schedule = r.default_schedule + ("*" if r.discard_penultimate_sigma else "")
        typer.echo(
            f"{r.name:<19} {r.display:<18} {kind:<13} {r.order:>5} {r.nfe_per_step:>8}  "
            f"{schedule:<14} {r.description}"
        )
    typer.echo(
        "schedule: the grid when none is asked for (A1111's 'Automatic'); * = built for "
        "steps + 1 with the second-to-last sigma dropped, as A1111. Any A1111 spelling works "
        '("DPM++ 2M Karras", "k_dpmpp_2m").'
    )


@app.command("plot-schedule")
def plot_schedule(
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("schedule.png"),
    num_steps: Annotated[int, typer.Option(help="T")] = 1000,
    overwrite: Annotated[bool, typer.Option(help="replace an existing file")] = False,
) -> None:
    """Plot beta, alpha-bar and log-SNR of the linear, cosine and SD schedules."""
    from noisecraft.diffusion import NoiseSchedule
    from noisecraft.viz.schedule_plot import plot_schedules

    if num_steps < 2:
        raise ConfigError(f"--num-steps must be at least 2, got {num_steps}")
    schedules = {
        "linear": NoiseSchedule.linear(num_steps),
        "cosine": NoiseSchedule.cosine(num_steps),
        "scaled_linear (SD)": NoiseSchedule.scaled_linear(num_steps),
    }
    typer.echo(f"wrote {plot_schedules(out, schedules, overwrite=overwrite)}")


def _register_subcommands() -> None:
    from noisecraft.cli.convert_cmd import convert_command
    from noisecraft.cli.eval_cmd import eval_command
    from noisecraft.cli.generate_cmd import generate_command
    from noisecraft.cli.viz_cmd import viz_app

    app.command("convert")(convert_command)
    app.command("eval")(eval_command)
    app.command("generate")(generate_command)
    app.add_typer(viz_app, name="viz")


_register_subcommands()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one line on stderr and exit code 2.

    typer/click handle usage errors themselves (usage + exit 2); our own
    :class:`NoisecraftError` passes through them and is printed here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always", NoisecraftWarning)
        warnings.showwarning = _one_line_warning
        return _main(argv)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings as ``warning: ...`` on stderr (on a line of its own, above a running
    progress bar); others in Python's usual form."""
    if issubclass(category, NoisecraftWarning):
        from tqdm import tqdm

        tqdm.write(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _main(argv: list[str] | None) -> int:
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except NoisecraftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The ``noisecraft`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
