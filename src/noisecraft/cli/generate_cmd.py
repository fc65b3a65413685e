"""`noisecraft generate`: text-to-image, img2img and inpainting, one PNG per image.

Every PNG carries a ``parameters`` text chunk in AUTOMATIC1111's format
(:mod:`noisecraft.pipelines.png_params`); ``--from-png IMAGE`` reads it back and makes the
same image again (same model, same device). Options given on the command line override the
values read from the PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from noisecraft.cli.options import ArchOption, PredictionOption, VaeOption
from noisecraft.errors import ConfigError, unknown_name

if TYPE_CHECKING:
    from noisecraft.samplers import SamplerSpec

DEFAULTS: dict[str, Any] = {"steps": 20, "sampler": "dpmpp_2m", "seed": 0}
DEFAULT_CFG = {"latent": 7.0, "pixel": 2.0}
#: ``--dtype`` names -> torch dtype names
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: The tiny decoder ``--fast-decode`` uses for a shipped model when no --tiny-decoder is given
#: (configs/mnist_tiny_decoder.toml).
SHIPPED_TINY_DECODERS = {"mnist-text": "mnist_text_tiny_decoder.safetensors"}


def parse_size(text: str) -> tuple[int, int]:
    """``"512x768"`` -> (width 512, height 768)."""
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--size must be WIDTHxHEIGHT, e.g. 512x512; got '{text}'")
    return int(parts[0]), int(parts[1])


def output_paths(out: Path, n: int) -> list[Path]:
    """``out``, then ``out_1.png``, ``out_2.png``, ... (one per image)."""
    out = Path(out)
    suffix = out.suffix or ".png"
    first = out if out.suffix else out.with_suffix(suffix)
    return [first] + [out.with_name(f"{out.stem}_{i}{suffix}") for i in range(1, n)]


def _open_image(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found; give the path of an image file")
    try:
        im = Image.open(path)
        im.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"cannot read {what} {path} ({e}); give a PNG or JPEG image") from None
    return im


def load_image(path: Path, channels: int = 3):
    """An image file as a (1, C, H, W) float tensor in [-1, 1]."""
    import numpy as np
    import torch

    im = _open_image(path, "--init image").convert("L" if channels == 1 else "RGB")
    arr = np.asarray(im, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1.0


def load_mask(path: Path):
    """A mask image as (1, 1, H, W) in [0, 1]; white = repaint."""
    import numpy as np
    import torch

    im = _open_image(path, "--mask").convert("L")
    return torch.from_numpy(np.asarray(im, dtype=np.float32))[None, None] / 255.0


def read_png_parameters(path: Path) -> dict[str, Any]:
    """The parsed ``parameters`` chunk of a PNG (one-line error if there is none)."""
    from noisecraft.pipelines.png_params import parse_parameters

    im = _open_image(path, "--from-png image")
    text = getattr(im, "text", {}).get("parameters") or im.info.get("parameters")
    if not text:
        raise ConfigError(
            f"{path} has no 'parameters' text chunk; give a PNG written by noisecraft "
            "generate (or AUTOMATIC1111)"
        )
    return parse_parameters(text)


def write_png(image, path: Path, parameters: str, *, overwrite: bool) -> Path:
    """One (C, H, W) image in [-1, 1] as a PNG with a ``parameters`` text chunk, atomically."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from noisecraft.io.atomic import atomic_path, check_writable
    from noisecraft.viz.images import to_uint8

    path = check_writable(path, overwrite=overwrite)
    arr = to_uint8(image[None])[0]
    info = PngInfo()
    info.add_text("parameters", parameters)
    im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", pnginfo=info)
    return path


def generate_command(
    prompt: Annotated[
        str | None, typer.Argument(help="what to draw (A1111 syntax: (word:1.2), BREAK)")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="model .safetensors (latent or pixel); default: mnist-text"),
    ] = None,
    negative: Annotated[
        str | None, typer.Option("--negative", help="negative prompt (what to avoid)")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="sampling steps (default 20)")] = None,
    cfg: Annotated[
        float | None, typer.Option(help="guidance scale (default 7; 2 for pixel models)")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="seed of the first image; image i: seed+i")
    ] = None,
    sampler: Annotated[
        str | None,
        typer.Option(help="see `noisecraft samplers`; A1111 names too (default dpmpp_2m)"),
    ] = None,
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT, multiples of 8")] = None,
    init: Annotated[Path | None, typer.Option(help="init image for img2img / inpainting")] = None,
    strength: Annotated[
        float | None, typer.Option(help="img2img strength in [0, 1] (default 0.8; inpainting 1)")
    ] = None,
    mask: Annotated[Path | None, typer.Option(help="inpainting mask, white = repaint")] = None,
    n: Annotated[int, typer.Option("--n", help="number of images")] = 1,
    guidance_rescale: Annotated[
        float | None, typer.Option(help="guidance rescale phi in [0, 1] (Lin et al. 2023)")
    ] = None,
    klass: Annotated[int | None, typer.Option("--class", help="class label (pixel models)")] = None,
    out: Annotated[Path, typer.Option(help="PNG to write; more images: OUT_1.png, ...")] = Path(
        "image.png"
    ),
    overwrite: Annotated[bool, typer.Option(help="replace existing files")] = False,
    from_png: Annotated[
        Path | None, typer.Option("--from-png", help="re-create the image described in this PNG")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    vae: VaeOption = None,
    prediction: PredictionOption = None,
    arch: ArchOption = None,
    dtype: Annotated[
        str,
        typer.Option(help="fp32 | fp16 | bf16 weights (half precision: CUDA; VAE fp32 for fp16)"),
    ] = "fp32",
    offload: Annotated[
        bool, typer.Option(help="keep weights in CPU memory, move each layer to --device to run it")
    ] = False,
    tiling: Annotated[
        bool | None,
        typer.Option(
            "--tiling/--no-tiling",
            help="decode the VAE in tiles (less memory); default: only above 1024x1024",
        ),
    ] = None,
    fast: Annotated[
        bool,
        typer.Option(
            help="fast mode: DeepCache, int8 Linear layers, DPM++ 2M Karras 10 steps (unless "
            "--sampler/--steps), tiny decoder where one ships (docs/performance.md)"
        ),
    ] = False,
    fast_decode: Annotated[
        bool,
        typer.Option(help="decode with a tiny TAESD-like decoder (fast, small quality cost)"),
    ] = False,
    tiny_decoder: Annotated[
        Path | None,
        typer.Option(help="tiny decoder .safetensors for --fast-decode (shipped for mnist-text)"),
    ] = None,
    low_memory: Annotated[
        str | None,
        typer.Option(
            "--low-memory",
            help="fp16 | int8: store the weights so, widen each layer to fp32 as it runs (CPU); "
            "decodes in tiles unless --no-tiling",
        ),
    ] = None,
    compile: Annotated[
        bool,
        typer.Option(
            help="torch.compile the U-Net (slower on CPU here, can pay on a GPU; "
            "docs/performance.md)"
        ),
    ] = False,
    threads: Annotated[
        int,
        typer.Option(
            help="CPU threads (0: torch's default, one per core; 1 is faster on a busy machine)"
        ),
    ] = 0,
) -> None:
    """Generate images from a prompt (text-to-image, --init img2img, --mask inpainting)."""
    paths = run_generate(
        prompt=prompt,
        model=model,
        negative=negative,
        steps=steps,
        cfg=cfg,
        seed=seed,
        sampler=sampler,
        size=size,
        init=init,
        strength=strength,
        mask=mask,
        n=n,
        guidance_rescale=guidance_rescale,
        klass=klass,
        out=out,
        overwrite=overwrite,
        from_png=from_png,
        device=device,
        vae=vae,
        prediction=prediction,
        arch=arch,
        dtype=dtype,
        offload=offload,
        tiling=tiling,
        fast=fast,
        fast_decode=fast_decode,
        tiny_decoder=tiny_decoder,
        low_memory=low_memory,
        compile=compile,
        threads=threads,
    )
    for p in paths:
        typer.echo(f"wrote {p}")


def diffusers_scheduler_config(net: Any, sampler: str | SamplerSpec) -> dict[str, Any] | None:
    """The diffusers scheduler config an imported Stable Diffusion model samples with, so
    that a seed gives the image diffusers gives: the folder's own ``scheduler_config.json``,
    or SD 1.5's for a single file. None (noisecraft's own rules) for native models and for
    samplers diffusers has no scheduler for (e.g. heun)."""
    from noisecraft.io.formats.single_file import SingleFileInfo
    from noisecraft.pipelines.diffusers_schedulers import SD15_SCHEDULER_CONFIG
    from noisecraft.samplers import as_spec

    info = getattr(net, "info", None)
    if info is None or as_spec(sampler).record.diffusers_scheduler is None:
        return None
    saved = info.diffusion.get("scheduler")
    if saved:
        return dict(saved["config"])
    if isinstance(info, SingleFileInfo):
        return dict(SD15_SCHEDULER_CONFIG)
    return None


def _with_tiny_decoder(net: Any, model: str, path: Path | None, latent: bool, device: str) -> Any:
    """``net`` with the tiny decoder of --tiny-decoder (or the shipped one of a shipped model)."""
    if not latent:
        raise ConfigError("--fast-decode / --tiny-decoder are for latent models (they have a VAE)")
    from noisecraft.cli.main import ASSETS
    from noisecraft.models.tiny_decoder import load_tiny_decoder

    if path is None:
        if model not in SHIPPED_TINY_DECODERS or Path(model).exists():
            raise ConfigError(
                f"--fast-decode needs --tiny-decoder FILE for {model} (train one: noisecraft "
                "train configs/mnist_tiny_decoder.toml with latent.vae set to this model)"
            )
        path = ASSETS / SHIPPED_TINY_DECODERS[model]
    decoder = load_tiny_decoder(path, device=device)
    return net.replace(tiny_decoder=decoder)


def run_generate(
    *,
    prompt: str | None,
    model: str | None,
    negative: str | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    seed: int | None = None,
    sampler: str | None = None,
    size: str | None = None,
    init: Path | None = None,
    strength: float | None = None,
    mask: Path | None = None,
    n: int = 1,
    guidance_rescale: float | None = None,
    klass: int | None = None,
    out: Path = Path("image.png"),
    overwrite: bool = False,
    from_png: Path | None = None,
    device: str = "cpu",
    vae: Path | None = None,
    prediction: str | None = None,
    arch: str | None = None,
    dtype: str = "fp32",
    offload: bool = False,
    tiling: bool | None = None,
    fast: bool = False,
    fast_decode: bool = False,
    tiny_decoder: Path | None = None,
    low_memory: str | None = None,
    compile: bool = False,
    threads: int = 0,
) -> list[Path]:
    """What ``noisecraft generate`` does; returns the paths written."""
    import torch
    from tqdm.auto import tqdm

    from noisecraft.cli.main import resolve_model
    from noisecraft.io.atomic import check_writable
    from noisecraft.pipelines import GenerateRequest, LatentDiffusion, count_steps, generate
    from noisecraft.pipelines import load_model as load_any
    from noisecraft.pipelines.fast import FAST
    from noisecraft.pipelines.png_params import (
        format_parameters,
        sampler_display,
        sampler_from_display,
    )
    from noisecraft.samplers import parse_sampler

    png: dict[str, Any] = read_png_parameters(from_png) if from_png is not None else {}
    if model is None:
        model = "mnist-text"  # the shipped text-to-image model
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    if threads < 0:
        raise ConfigError(f"--threads must be 0 (torch's default) or more, got {threads}")
    if compile and (fast or low_memory is not None or offload):
        raise ConfigError(
            "--compile does not mix with --fast, --low-memory or --offload (they run the "
            "U-Net's layers one by one, outside the compiled graph); drop one of them"
        )
    if threads:
        torch.set_num_threads(threads)
    width = height = None
    if size is not None:
        width, height = parse_size(size)
    elif "width" in png:
        width, height = png["width"], png["height"]
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise ConfigError(f"--strength must be in [0, 1], got {strength}")
    if strength is not None and init is None:
        raise ConfigError("--strength needs --init IMAGE")
    if mask is not None and init is None:
        raise ConfigError("--mask needs --init IMAGE (the picture to inpaint)")
    if init is None and png.get("denoising_strength") is not None:
        raise ConfigError(
            f"{from_png} was made by img2img (Denoising strength: {png['denoising_strength']}); "
            "pass the same --init IMAGE (and --mask) again"
        )
    paths = output_paths(out, n)
    for p in paths:
        check_writable(p, overwrite=overwrite)

    if dtype not in DTYPES:
        raise unknown_name("--dtype", dtype, DTYPES)
    if low_memory is not None:  # weights stored fp16 / int8, each layer widened as it runs
        from noisecraft.pipelines.lowmem import WEIGHT_FORMATS, load_low_memory

        if low_memory not in WEIGHT_FORMATS:
            raise unknown_name("--low-memory", low_memory, WEIGHT_FORMATS)
        if dtype != "fp32" or offload or device != "cpu":
            raise ConfigError(
                "--low-memory runs on the CPU in fp32: drop --dtype/--offload/--device"
            )
        net = load_low_memory(
            resolve_model(model), low_memory, vae_path=vae, prediction=prediction, arch=arch
        )
        tiling = True if tiling is None else tiling  # the decoder's activations: 4 tiles
    else:
        net = load_any(
            resolve_model(model),
            device="cpu" if offload else device,
            vae=vae,
            prediction=prediction,
            arch=arch,
        )
    latent = isinstance(net, LatentDiffusion)
    if (dtype != "fp32" or offload) and not latent:
        raise ConfigError("--dtype and --offload are for latent (Stable Diffusion-type) models")
    if dtype != "fp32":  # weights stored in the dtype they run in (VAE: vae_dtype_for)
        net = net.to(dtype=getattr(torch, DTYPES[dtype]))
    if offload:  # weights stay in CPU memory; each layer visits --device for its forward
        from noisecraft.pipelines.offload import offload_latent_diffusion

        net = offload_latent_diffusion(net, device)
    if fast:
        if not latent:
            raise ConfigError("--fast is for latent (Stable Diffusion-type) models")
        if dtype == "fp32" and low_memory is None and not offload and device == "cpu":
            net = net.int8(inplace=True)  # dynamic int8 Linear layers (a CPU kernel), no copy
        fast_decode = fast_decode or tiny_decoder is not None or model in SHIPPED_TINY_DECODERS
    if fast_decode or tiny_decoder is not None:
        net = _with_tiny_decoder(net, model, tiny_decoder, latent, device)
    if compile:
        from noisecraft.pipelines.compile import compile_unet

        net = compile_unet(net)
    if latent and png.get("clip_skip") is not None:
        net = net.replace(clip_skip=int(png["clip_skip"]))
    if sampler is not None:  # the sampler choice, parsed once
        spec = parse_sampler(sampler)
    elif "sampler" in png:
        spec = sampler_from_display(
            png["sampler"],
            png.get("schedule_type"),
            version=png.get("version"),
            discard=png.get("discard_penultimate_sigma"),
        )
    elif fast:
        spec = parse_sampler(FAST.sampler, FAST.spacing)
    else:
        spec = parse_sampler(DEFAULTS["sampler"])
    default_steps = FAST.steps if fast else DEFAULTS["steps"]
    prompt = prompt if prompt is not None else png.get("prompt")
    negative = negative if negative is not None else png.get("negative_prompt", "")
    first_seed = seed if seed is not None else png.get("seed", DEFAULTS["seed"])
    cfg_scale = (
        cfg
        if cfg is not None
        else png.get("cfg_scale", DEFAULT_CFG["latent" if latent else "pixel"])
    )
    if not latent and (prompt or negative):
        raise ConfigError("this model takes --class, not a prompt")
    if klass is None and "Class" in png.get("extra", {}):
        try:
            klass = int(png["extra"]["Class"])
        except ValueError:
            raise ConfigError(
                f"PNG parameters: Class '{png['extra']['Class']}' is not an integer"
            ) from None
    init_image = mask_image = None
    if init is not None:
        channels = net.vae.config.in_channels if latent else net.unet.config.in_channels
        init_image = load_image(init, channels)
        if strength is None:
            strength = png.get("denoising_strength")
    if mask is not None:
        mask_image = load_mask(mask)
    req = GenerateRequest(
        n=n,
        sampler=spec,
        scheduler_config=diffusers_scheduler_config(net, spec),
        steps=steps if steps is not None else png.get("steps", default_steps),
        fast=FAST if fast else None,
        vae_tiling=tiling,
        cfg=float(cfg_scale),
        classes=None if klass is None else [klass] * n,
        seed=int(first_seed),
        seeds=[int(first_seed) + i for i in range(n)],
        eta=png.get("eta"),
        prompts=[prompt] if latent else None,
        negative_prompt=negative if latent else "",
        guidance_rescale=float(
            guidance_rescale if guidance_rescale is not None else png.get("guidance_rescale", 0.0)
        ),
        width=width,
        height=height,
        init_image=init_image,
        strength=strength,
        mask=mask_image,
        fast_decode=fast_decode,
    )
    req.validate(net)
    total = count_steps(net, req)
    with tqdm(
        total=total, desc=f"generating {n} image(s) ({req.sampler}, {req.steps} steps)"
    ) as bar:
        images = generate(net, req, callback=lambda d: bar.update(1))

    diffusers = req.scheduler_config is not None
    display, schedule = sampler_display(req.spec, diffusers=diffusers)
    clip_skip = None
    if latent:
        clip_skip = net.clip_skip or net.text_encoder.config.clip_skip
    written = []
    for i, (image, path) in enumerate(zip(images, paths, strict=True)):
        text = format_parameters(
            req.image_prompts()[i] if latent else "",
            req.image_negative_prompts()[i] if latent else "",
            steps=req.steps,
            sampler=display,
            schedule_type=schedule,
            cfg_scale=req.cfg,
            seed=req.image_seeds()[i],
            width=image.shape[-1],
            height=image.shape[-2],
            model=Path(model).stem,
            denoising_strength=req.effective_strength(),
            clip_skip=clip_skip,
            guidance_rescale=req.guidance_rescale,
            eta=req.eta,
            discard_penultimate_sigma=req.spec.discard_note(diffusers),
            extra={"Class": klass} if klass is not None else None,
        )
        written.append(write_png(image, path, text, overwrite=overwrite))
    return written
