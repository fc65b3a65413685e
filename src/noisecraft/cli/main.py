"""`noisecraft` command line (typer). User mistakes print ``error: ...`` and exit 2."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from noisecraft.cli import options as o
from noisecraft.errors import ConfigError, NoisecraftError, NoisecraftWarning

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="noisecraft: diffusion models from the math. Train, sample, look inside.",
    pretty_exceptions_enable=False,
)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="TOML recipe, e.g. configs/mnist.toml")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many steps")] = None,
    overwrite: Annotated[bool, typer.Option(help="start over in an existing run dir")] = False,
    allow_config_change: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-config-change",
            help="resume although these keys differ from the run's saved config "
            "(section.key, comma-separated or repeated); the run then no longer equals an "
            "uninterrupted one. run.*, train.max_steps, train.device and train.threads may "
            "always change",
        ),
    ] = None,
) -> None:
    """Train a model; resumes automatically when the run dir holds a checkpoint.

    Ctrl-C (or SIGTERM) finishes the step, saves a checkpoint and prints the command that
    resumes the run (exit code 130, or 143 for SIGTERM).
    """
    from noisecraft.cli.train_cmd import run_train

    run_train(config, set_ or [], max_steps, overwrite, allow_config_change)


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
    n: int | None,
    klass: int | None,
    out: Path,
    gif: Path | None,
    overwrite: bool,
    save_every: int = 0,
    device: str = "cpu",
    max_pixels: int | None = None,
    max_images: int | None = None,
    **settings: Any,
) -> list[Path]:
    """A grid (one row per class) from a pixel model through the API, with a progress bar,
    optionally a denoising GIF and saved intermediates. Returns the paths written."""
    import noisecraft
    from noisecraft.io.atomic import check_writable
    from noisecraft.io.write_errors import new_outputs_removed_on_error
    from noisecraft.viz.images import DenoisingRecorder, IntermediateWriter, save_gif, save_grid

    check_writable(out, overwrite=overwrite)
    if gif is not None:
        check_writable(gif, overwrite=overwrite)
    if save_every < 0:
        raise ConfigError(f"--save-every must be >= 0, got {save_every}")
    pipe = noisecraft.load(checkpoint, device=device, max_pixels=max_pixels, max_images=max_images)
    if pipe.kind != "pixel":
        raise ConfigError(
            f"{checkpoint} is a text-to-image model; draw from it with noisecraft generate"
        )
    k = pipe.model.num_classes
    n = (8 * k if k else 64) if n is None else n
    classes, nrow = _default_classes(n, k, klass)
    size = pipe.model.image_size
    scale = max(1, 256 // (nrow * size)) if size < 64 else 1
    recorder = DenoisingRecorder(nrow=nrow) if gif is not None else None
    inter = None
    folder = out.with_name(out.stem + "_steps")
    if save_every:
        check_writable(folder, overwrite=True, folder=True)
        inter = IntermediateWriter(folder, save_every, nrow, scale, overwrite=overwrite)

    def callback(d: dict) -> None:
        for watcher in (recorder, inter):
            if watcher is not None:
                watcher(d)

    # a failed or interrupted run leaves none of the outputs it started
    with new_outputs_removed_on_error(*[p for p in (out, gif, inter and folder) if p]):
        result = pipe(n=n, class_label=classes, callback=callback, progress=True, **settings)
        images = result.tensors
        req = result.request
        text = {
            "parameters": f"sampler: {req.spec.name}, steps: {req.steps}, cfg: {req.cfg}, "
            f"seed: {req.seed}, model: {checkpoint}"
        }
        written = [save_grid(images, out, nrow=nrow, scale=scale, overwrite=overwrite, text=text)]
        if recorder is not None:
            recorder.add(images, images)
            written.append(save_gif(recorder.frames, gif, scale=scale, overwrite=overwrite))
        if inter is not None:
            inter.finish(images)
            written.append(inter.folder)
    return written


@app.command()
def sample(
    checkpoint: Annotated[
        str, typer.Argument(help="model .safetensors, or 'mnist' for the shipped model")
    ] = "mnist",
    sampler: o.Sampler = None,
    steps: o.Steps = None,
    n: Annotated[int | None, typer.Option("--n", help="number of images")] = None,
    seed: o.Seed = None,
    cfg: o.Cfg = None,
    klass: Annotated[int | None, typer.Option("--class", help="draw only this class")] = None,
    schedule: o.Schedule = None,
    out: Annotated[Path, typer.Option(help="grid PNG to write")] = Path("grid.png"),
    gif: Annotated[Path | None, typer.Option(help="also write a denoising GIF here")] = None,
    device: o.Device = "cpu",
    save_every: Annotated[
        int,
        typer.Option(
            help="save x_t and predicted x0 every K steps, and the final images, into OUT_steps/"
        ),
    ] = 0,
    overwrite: o.Overwrite = False,
    max_pixels: o.MaxPixels = None,
    max_images: o.MaxImages = None,
) -> None:
    """Generate a grid of images from a pixel model (one row per class)."""
    settings = o.api_settings(locals(), ("sampler", "steps", "seed", "cfg", "schedule"))
    paths = run_sampling(
        checkpoint,
        n=n,
        klass=klass,
        out=out,
        gif=gif,
        overwrite=overwrite,
        save_every=save_every,
        device=device,
        max_pixels=max_pixels,
        max_images=max_images,
        **settings,
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
    """The main job: digits from the shipped models -- a class grid, a denoising GIF, and
    text-to-image digits.

    Earlier outputs are kept: a second run writes ``digits_2.png`` and so on
    unless ``--overwrite`` is given.
    """
    from noisecraft.api.shipped import SHIPPED_MODELS
    from noisecraft.io.atomic import check_writable, free_path

    grid, gif = out_dir / "digits.png", out_dir / "denoising.gif"
    text = out_dir / "text_digits.png"
    if not overwrite:
        grid, gif, text = free_path(grid), free_path(gif), free_path(text)
    for path in (grid, gif, text):  # all three before the first is drawn
        check_writable(path, overwrite=overwrite)
    paths = run_sampling(
        "mnist",
        n=None,
        klass=None,
        out=grid,
        gif=gif,
        overwrite=overwrite,
        sampler="dpmpp_2m",
        steps=steps,
        seed=seed,
        cfg=2.0,
    )
    typer.echo("one row per digit class 0-9 (classifier-free guidance 2.0, DPM++ 2M)")
    for p in paths:
        typer.echo(f"wrote {p.resolve()}")
    if SHIPPED_MODELS["mnist-text"].is_file():
        written = text_demo(text, steps, seed, overwrite)
        typer.echo('text-to-image (mini Stable Diffusion): row k is "a handwritten <k>"')
        typer.echo(f"wrote {written.resolve()}")


def text_demo(out: Path, steps: int, seed: int, overwrite: bool, per_row: int = 8) -> Path:
    """Ten prompts "a handwritten zero" ... "nine" through the shipped text-to-image model."""
    import noisecraft
    from noisecraft.training.captions import DIGIT_WORDS
    from noisecraft.viz.images import save_grid

    pipe = noisecraft.load("mnist-text")
    prompts = [f"a handwritten {w}" for w in DIGIT_WORDS for _ in range(per_row)]
    result = pipe(prompts, n=len(prompts), steps=steps, cfg=5.0, seed=seed, progress=True)
    text = {"parameters": f"prompts: a handwritten zero..nine, steps: {steps}, cfg: 5.0"}
    return save_grid(result.tensors, out, nrow=per_row, scale=4, overwrite=overwrite, text=text)


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
    from noisecraft.cli.serve_cmd import serve_command
    from noisecraft.cli.viz_cmd import viz_app

    app.command("convert")(convert_command)
    app.command("eval")(eval_command)
    app.command("generate")(generate_command)
    app.command("serve")(serve_command)
    app.add_typer(viz_app, name="viz")


_register_subcommands()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one line on stderr and exit code 2.

    Usage errors (unknown option or command, a value of the wrong type, a missing argument)
    and our own :class:`NoisecraftError` are printed here, one line each
    (:mod:`noisecraft.cli.usage`).
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
    from noisecraft.cli.usage import NoArgsIsHelpError, UsageError, usage_message

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        # not standalone: typer returns what --help and typer.Exit ask for and raises usage
        # errors, which become one line here instead of its usage box
        rv = app(args=argv, standalone_mode=False)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except NoArgsIsHelpError:  # `noisecraft` or `noisecraft viz` alone: the help, as before
        return 2
    except typer.Abort:  # end of input at a prompt
        print("aborted", file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"error: {usage_message(e, typer.main.get_command(app), argv)}", file=sys.stderr)
        return 2
    except NoisecraftError as e:
        print(f"error: {e.render(o.flag_names(e.settings))}", file=sys.stderr)
        return 2
    return rv if isinstance(rv, int) else 0


def run() -> None:
    """The ``noisecraft`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
