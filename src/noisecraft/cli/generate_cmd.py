"""`noisecraft generate`: text-to-image, img2img and inpainting, one PNG per image.

A thin shell over :func:`noisecraft.load` and :class:`~noisecraft.api.pipeline.Pipeline`:
each option is an API setting of the same name (:mod:`noisecraft.cli.options`). Every PNG
carries a ``parameters`` text chunk in AUTOMATIC1111's format; ``--from-png IMAGE`` reads it
back and makes the same image again (:meth:`Pipeline.replay`), options given on the command
line overriding what it says. ``--lora FILE[:WEIGHT]`` (repeatable) and ``<lora:NAME:W>`` in
the prompt with ``--lora-dir`` apply LoRAs (:mod:`noisecraft.api.loras`). ``--controlnet FILE
--control-image IMG`` (repeatable, with ``--control-weight`` / ``--control-start`` /
``--control-end`` / ``--preprocess`` / ``--control-resize`` per unit) adds ControlNet units
(:mod:`noisecraft.api.controls`); with ``--from-png`` the control images are given again.
Seeing inside (:class:`~noisecraft.pipelines.observe.Observer`): ``--attention-maps DIR``
(a heat map per prompt word), ``--save-every K`` (the latents every K steps into
``OUT_steps/``) and ``--gif PATH`` (the denoising as an animation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from noisecraft.cli import options as o
from noisecraft.errors import ConfigError

#: The settings of ``Pipeline.__call__`` that ``generate`` exposes (besides --size).
CALL_SETTINGS = (
    "prompt",
    "negative_prompt",
    "steps",
    "cfg",
    "seed",
    "sampler",
    "schedule",
    "init_image",
    "strength",
    "mask",
    "n",
    "guidance_rescale",
    "class_label",
    "tiling",
)


def generate_command(
    prompt: o.Prompt = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="model file or folder (latent or pixel); default: mnist-text"),
    ] = None,
    negative_prompt: o.Negative = None,
    steps: o.Steps = None,
    cfg: o.Cfg = None,
    seed: o.Seed = None,
    sampler: o.Sampler = None,
    schedule: o.Schedule = None,
    size: o.Size = None,
    init_image: o.Init = None,
    strength: o.Strength = None,
    mask: o.Mask = None,
    n: o.Count = 1,
    guidance_rescale: o.GuidanceRescale = None,
    class_label: o.ClassLabel = None,
    out: Annotated[Path, typer.Option(help="PNG to write; more images: OUT_1.png, ...")] = Path(
        "image.png"
    ),
    overwrite: o.Overwrite = False,
    attention_maps: o.AttentionMapsDir = None,
    attention_steps: o.AttentionSteps = None,
    save_every: o.SaveEveryLatents = 0,
    gif: o.DenoisingGif = None,
    from_png: Annotated[
        Path | None, typer.Option("--from-png", help="re-create the image described in this PNG")
    ] = None,
    device: o.Device = "cpu",
    vae: o.VaeOption = None,
    prediction: o.PredictionOption = None,
    arch: o.ArchOption = None,
    dtype: o.Dtype = "fp32",
    offload: o.Offload = False,
    tiling: o.Tiling = None,
    fast: o.Fast = False,
    fast_decode: o.FastDecode = False,
    tiny_decoder: o.TinyDecoder = None,
    low_memory: o.LowMemory = None,
    compile: o.Compile = False,
    threads: o.Threads = 0,
    max_pixels: o.MaxPixels = None,
    max_images: o.MaxImages = None,
    loras: o.Loras = None,
    lora_dir: o.LoraDir = None,
    embedding_dir: o.EmbeddingDir = None,
    lcm_unet: o.LcmUnet = None,
    controlnet: o.ControlNets = None,
    control_image: o.ControlImages = None,
    control_weight: o.ControlWeights = None,
    control_start: o.ControlStarts = None,
    control_end: o.ControlEnds = None,
    preprocess: o.Preprocess = None,
    control_resize: o.ControlResize = None,
    guess_mode: o.GuessMode = False,
    save_hint: o.SaveHint = False,
    controlnet_dir: o.ControlnetDir = None,
) -> None:
    """Generate images from a prompt (text-to-image, --init img2img, --mask inpainting)."""
    import noisecraft
    from noisecraft.api.result import hint_output_paths, output_paths
    from noisecraft.api.shipped import DEFAULT_MODEL
    from noisecraft.io.atomic import check_writable

    given = locals()
    settings = {**o.api_settings(given, CALL_SETTINGS), **o.parse_size(size)}
    units = _control_units(given, from_png is not None)
    if units:
        settings["control"] = [noisecraft.Control(**u) for u in units]
    elif control_image and from_png is not None:  # the recorded units, their images again
        settings["control_images"] = list(control_image)
    for path in output_paths(out, n):  # refuse before the (slow) load
        check_writable(path, overwrite=overwrite)
    for path in hint_output_paths(out, len(controlnet or [])) if save_hint else []:
        check_writable(path, overwrite=overwrite)
    steps_range = o.parse_step_range(attention_steps)
    if attention_maps is not None:
        check_writable(attention_maps, overwrite=True, folder=True)
    elif steps_range is not None:
        raise ConfigError("--attention-steps needs --attention-maps OUT_DIR")
    if save_every < 0:
        raise ConfigError(f"--save-every must be 0 (off) or a step count >= 1, got {save_every}")
    steps_dir = out.with_name(out.stem + "_steps") if save_every else None
    gifs = output_paths(gif, n) if gif is not None else []
    for path in gifs:
        check_writable(path, overwrite=overwrite)
    if steps_dir is not None:
        check_writable(steps_dir, overwrite=True, folder=True)
    if attention_maps is not None or save_every or gifs:
        every = save_every or (1 if gifs else 0)
        settings["observe"] = noisecraft.Observer(
            attention=attention_maps is not None, steps=steps_range, every=every
        )
    if fast_decode:
        settings["fast_decode"] = True
        given["tiny_decoder"] = tiny_decoder or True  # the shipped one unless given
    load = o.api_settings(given, o.LOAD_SETTINGS)
    if from_png is not None:  # the modes the image was made in, unless the command says
        from noisecraft.api.infotext import load_options_of, read_parameters

        recorded = load_options_of(read_parameters(from_png))
        load = {**recorded, **{k: v for k, v in load.items() if v is not False}}
    pipe = noisecraft.load(model or DEFAULT_MODEL, **load)
    if from_png is not None:
        result = pipe.replay(from_png, progress=True, **settings)
    else:
        result = pipe(progress=True, **settings)
    for path in result.save(out, overwrite=overwrite, hints=save_hint):
        typer.echo(f"wrote {path}")
    if attention_maps is not None:
        _write_attention_maps(result, attention_maps, overwrite)
    latents = result.observed.latents if result.observed is not None else None
    for i, steps in enumerate(latents or []):
        if steps_dir is not None:
            target = steps_dir if len(latents) == 1 else steps_dir / str(i)
            steps.save(target, overwrite=overwrite)
            typer.echo(f"wrote {len(steps.steps)} steps of latents into {target}")
        if gifs:
            typer.echo(f"wrote {steps.save_gif(gifs[i], overwrite=overwrite)}")


def _control_units(given: dict, replaying: bool) -> list[dict]:
    """The ``--controlnet`` units of the command line (none: a replay may keep its own)."""
    if replaying and not given["controlnet"]:
        return []
    return o.control_units(
        given["controlnet"],
        given["control_image"],
        weight=given["control_weight"],
        start=given["control_start"],
        end=given["control_end"],
        preprocess=given["preprocess"],
        resize=given["control_resize"],
        guess_mode=given["guess_mode"],
    )


def _write_attention_maps(result: object, folder: Path, overwrite: bool) -> None:
    """Image i's maps into ``folder`` (one image) or ``folder/i`` (several)."""
    maps = result.observed.attention  # type: ignore[attr-defined]
    for i, m in enumerate(maps):
        if m is None:
            typer.echo(f"no attention was recorded for image {i} (no step in the range)")
            continue
        target = folder if len(maps) == 1 else folder / str(i)
        paths = m.save(target, overwrite=overwrite)
        typer.echo(f"wrote {len(paths) - 1} attention maps and {paths[-1]}")
