"""Command-line options, each written once, named as the Python API names the setting.

A command declares a parameter as ``steps: Steps = None``; its name is the API setting
(``noisecraft.load`` or ``Pipeline.__call__``), so :func:`api_settings` hands the given values
to the API as they are. Errors from the API name settings; :func:`flag_names` shows them as
the flags the user typed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from noisecraft.errors import ConfigError

#: Python API setting -> how the command line names it, where not ``--`` + the name with
#: dashes.
FLAGS = {
    "prompt": "a prompt",
    "negative_prompt": "--negative",
    "init_image": "--init",
    "class_label": "--class",
    "width": "--size W",
    "height": "H",
    "source": "--from-png",
    "loras": "--lora",
    "observe": "--attention-steps",
    "control": "--controlnet",
    "control_images": "--control-image",
    "resize": "--control-resize",
}

#: The settings of ``noisecraft.load`` that commands expose.
LOAD_SETTINGS = (
    "vae",
    "device",
    "dtype",
    "low_memory",
    "fast",
    "offload",
    "compile",
    "tiny_decoder",
    "prediction",
    "arch",
    "threads",
    "max_pixels",
    "max_images",
    "lora_dir",
    "loras",
    "embedding_dir",
    "lcm_unet",
    "controlnet_dir",
)


def flag_names(settings: Iterable[str]) -> dict[str, str]:
    """The command-line name of each setting (for ``NoisecraftError.render``)."""
    return {s: FLAGS.get(s, "--" + s.replace("_", "-")) for s in settings}


def api_settings(values: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The given (not None) values among ``names``."""
    return {k: values[k] for k in names if values.get(k) is not None}


def parse_size(text: str | None) -> dict[str, int]:
    """``"512x768"`` -> {"width": 512, "height": 768}; None -> {}."""
    if text is None:
        return {}
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--size must be WIDTHxHEIGHT, e.g. 512x512; got '{text}'")
    return {"width": int(parts[0]), "height": int(parts[1])}


def parse_step_range(text: str | None) -> tuple[int, int] | None:
    """``"5:15"`` -> (5, 15) (steps 5..14); ``":10"`` -> (0, 10); None -> None."""
    if text is None:
        return None
    start, sep, end = text.replace(" ", "").partition(":")
    start = start or "0"
    if not sep or not (start.isascii() and start.isdigit() and end.isascii() and end.isdigit()):
        raise ConfigError(f"--attention-steps must be START:END, e.g. 0:10; got '{text}'")
    return int(start), int(end)


# ---------------------------------------------------------------------------- what to make
Prompt = Annotated[
    str | None, typer.Argument(help="what to draw (A1111 syntax: (word:1.2), BREAK)")
]
Negative = Annotated[str | None, typer.Option("--negative", help="negative prompt (what to avoid)")]
Steps = Annotated[int | None, typer.Option(help="sampling steps (default 20; --fast: 10)")]
Cfg = Annotated[
    float | None, typer.Option(help="guidance scale (default 7; 2 for class models; 1 = off)")
]
Seed = Annotated[
    int | None, typer.Option(help="seed of the first image; image i: seed+i; -1 = random")
]
Sampler = Annotated[
    str | None,
    typer.Option(help="see `noisecraft samplers`; A1111 names too (default dpmpp_2m)"),
]
Schedule = Annotated[
    str | None,
    typer.Option(
        "--schedule",
        "--spacing",
        help="A1111 Schedule type: karras | exponential | uniform (linspace) | leading | "
        "trailing; default: the sampler's own",
    ),
]
Size = Annotated[
    str | None, typer.Option(help="WIDTHxHEIGHT, multiples of the VAE factor (8 for SD)")
]
Init = Annotated[Path | None, typer.Option("--init", help="init image for img2img / inpainting")]
Strength = Annotated[
    float | None, typer.Option(help="img2img strength in [0, 1] (default 0.8; inpainting 1)")
]
Mask = Annotated[Path | None, typer.Option(help="inpainting mask, white = repaint")]
Count = Annotated[int, typer.Option("--n", help="number of images")]
GuidanceRescale = Annotated[
    float | None, typer.Option(help="guidance rescale phi in [0, 1] (Lin et al. 2023)")
]
ClassLabel = Annotated[int | None, typer.Option("--class", help="class label (class models)")]
Tiling = Annotated[
    bool | None,
    typer.Option(
        "--tiling/--no-tiling",
        help="decode the VAE in tiles (less memory); default: only above 1024x1024",
    ),
]
FastDecode = Annotated[
    bool,
    typer.Option(help="decode with a tiny TAESD-like decoder (fast, small quality cost)"),
]
Overwrite = Annotated[bool, typer.Option(help="replace existing output files")]
AttentionMapsDir = Annotated[
    Path | None,
    typer.Option(
        "--attention-maps",
        help="write a cross-attention heat map per prompt word (DAAM) and a grid to this folder",
    ),
]
AttentionSteps = Annotated[
    str | None,
    typer.Option(
        "--attention-steps", help="with --attention-maps: only steps START:END (end excluded)"
    ),
]
SaveEveryLatents = Annotated[
    int,
    typer.Option(
        "--save-every",
        help="save x_t and predicted x0 every K steps and at the end (raw latents, cheap "
        "preview and VAE decode, the channels on one scale) into OUT_steps/",
    ),
]
DenoisingGif = Annotated[
    Path | None,
    typer.Option(
        "--gif",
        help="also write a denoising GIF (x_t | predicted x0) here; every step unless "
        "--save-every K",
    ),
]
MaxPixels = Annotated[
    int | None,
    typer.Option(help="largest image allowed, in pixels (default 4194304 = 2048x2048)"),
]
MaxImages = Annotated[int | None, typer.Option(help="most images per call (default 1000)")]

# ---------------------------------------------------------------------------- how to load
Device = Annotated[str, typer.Option(help="cpu | cuda")]
VaeOption = Annotated[
    Path | None, typer.Option("--vae", help="a separate VAE file replacing the model's")
]
PredictionOption = Annotated[
    str | None, typer.Option(help="override the detected prediction type: eps | v")
]
ArchOption = Annotated[
    str | None, typer.Option(help="override the detected SD family of a single file: sd1 | sd2")
]
Dtype = Annotated[
    str,
    typer.Option(
        help="fp32 | fp16 | bf16 weights (fp16: CUDA, VAE fp32; bf16 on the CPU: the U-Net "
        "in bf16, faster on CPUs with avx512_bf16 / amx_bf16)"
    ),
]
Offload = Annotated[
    bool, typer.Option(help="keep weights in CPU memory, move each layer to --device to run it")
]
Fast = Annotated[
    bool,
    typer.Option(
        help="fast mode: DeepCache, int8 Linear layers, DPM++ 2M Karras 10 steps (unless "
        "--sampler/--steps), tiny decoder where one ships (docs/performance.md)"
    ),
]
TinyDecoder = Annotated[
    Path | None,
    typer.Option(
        help="tiny decoder for --fast-decode: a noisecraft file (shipped for mnist-text), "
        "TAESD's taesd_decoder.safetensors / .pth or a diffusers AutoencoderTiny folder"
    ),
]
LowMemory = Annotated[
    str | None,
    typer.Option(
        "--low-memory",
        help="fp16 | int8: store the weights so, widen each layer to fp32 as it runs (CPU); "
        "decodes in tiles unless --no-tiling",
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        help="torch.compile the U-Net (slower on CPU here, can pay on a GPU; docs/performance.md)"
    ),
]
Threads = Annotated[
    int,
    typer.Option(
        help="CPU threads (0: torch's default, one per core; 1 is faster on a busy machine)"
    ),
]
Loras = Annotated[
    list[str] | None,
    typer.Option(
        "--lora",
        metavar="FILE[:WEIGHT]",
        help="LoRA file applied to every image, FILE or FILE:WEIGHT (default 1); repeatable",
    ),
]
LoraDir = Annotated[
    Path | None,
    typer.Option(
        metavar="DIR", help="folder of LoRA files that <lora:NAME:WEIGHT> in a prompt names"
    ),
]
LcmUnet = Annotated[
    Path | None,
    typer.Option(
        "--lcm-unet",
        metavar="FILE",
        help="an LCM student U-Net (unet_fp16.safetensors of an lcm_distill run) in place of "
        "the model's; samples with LCM, 4 steps, CFG 1 by default (shipped: --model "
        "mnist-text-lcm)",
    ),
]
ControlnetDir = Annotated[
    Path | None,
    typer.Option(
        "--controlnet-dir",
        metavar="DIR",
        help="folder of ControlNet files / diffusers folders that --controlnet NAME (and "
        "--from-png) names",
    ),
]
EmbeddingDir = Annotated[
    Path | None,
    typer.Option(
        "--embedding-dir",
        "--embeddings-dir",
        help="folder of textual-inversion embeddings (.pt/.bin/.safetensors); a prompt uses "
        "one by its file name, as in A1111",
    ),
]

# ---------------------------------------------------------------------------- ControlNet
# Repeatable: the i-th value belongs to the i-th --controlnet; one value serves every unit.
ControlNets = Annotated[
    list[str] | None,
    typer.Option(
        "--controlnet",
        metavar="FILE",
        help="ControlNet file, diffusers folder or name in --controlnet-dir; repeatable "
        "(residuals summed)",
    ),
]
ControlImages = Annotated[
    list[Path] | None,
    typer.Option(
        "--control-image", metavar="IMG", help="control image of each --controlnet (or one for all)"
    ),
]
ControlWeights = Annotated[
    list[float] | None, typer.Option("--control-weight", help="conditioning scale (default 1)")
]
ControlStarts = Annotated[
    list[float] | None,
    typer.Option("--control-start", help="fraction of the steps where it starts (default 0)"),
]
ControlEnds = Annotated[
    list[float] | None,
    typer.Option("--control-end", help="fraction of the steps where it ends (default 1)"),
]
Preprocess = Annotated[
    list[str] | None,
    typer.Option(
        "--preprocess", help="canny | scribble | threshold | none (a ready hint; default)"
    ),
]
ControlResize = Annotated[
    list[str] | None,
    typer.Option(
        "--control-resize",
        help="crop (Crop and Resize, default) | resize (Just Resize) | fill (Resize and Fill)",
    ),
]
GuessMode = Annotated[
    bool,
    typer.Option(
        help="ControlNet without the prompt's guidance half (A1111: ControlNet is "
        "more important); every unit"
    ),
]
SaveHint = Annotated[
    bool, typer.Option(help="also write each unit's control image as OUT_control0.png, ...")
]


_CONTROL_FLAGS = {
    "image": "--control-image",
    "weight": "--control-weight",
    "start": "--control-start",
    "end": "--control-end",
    "preprocess": "--preprocess",
    "resize": "--control-resize",
    "guess_mode": "--guess-mode",
}


def control_units(
    models: list[str] | None, images: list[Path] | None, **per_unit: Any
) -> list[dict[str, Any]]:
    """The settings of each ``--controlnet`` unit: the i-th value of each option, or its one
    value for every unit (``per_unit``: setting -> list of values or None; a non-list value
    serves every unit)."""
    n = len(models or [])
    given = {k: v for k, v in per_unit.items() if v not in (None, [], False)}
    if not n:
        if images or given:
            flag = "--control-image" if images else _CONTROL_FLAGS[next(iter(given))]
            raise ConfigError(f"{flag} needs --controlnet FILE")
        return []
    lists = {"image": images, **given}
    units: list[dict[str, Any]] = [{"model": m} for m in models or []]
    for key, values in lists.items():
        if values is None:
            continue
        values = values if isinstance(values, list) else [values]
        if len(values) not in (1, n):
            flag = _CONTROL_FLAGS[key]
            raise ConfigError(
                f"{flag} was given {len(values)} times for {n} --controlnet; give it once "
                "(for every unit) or once per --controlnet"
            )
        for i, unit in enumerate(units):
            unit[key] = values[i if len(values) == n else 0]
    if images is None:
        raise ConfigError("--controlnet needs --control-image IMG (the control image)")
    return units
