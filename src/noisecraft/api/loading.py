"""``noisecraft.load``: a model file (or a shipped model's name) to a ready :class:`Pipeline`.

How a model is loaded is policy that every surface shares, so it lives here, once:

* ``low_memory="fp16" | "int8"``: weights *stored* narrow and widened layer by layer on the
  CPU (:mod:`noisecraft.pipelines.lowmem`); the VAE then decodes in tiles by default.
* ``dtype="fp16" | "bf16"``: weights kept in half precision (for CUDA; the VAE stays fp32
  under fp16, :func:`~noisecraft.models.latent_diffusion.vae_dtype_for`). On the CPU,
  ``"bf16"`` stores the U-Net's weights in bf16 (its matmuls and convolutions then run in
  bf16; the text encoder and VAE, one call each per image, stay fp32, and so does the
  sampler's arithmetic): 1.5-1.7x faster per U-Net pass on a CPU with bf16 instructions,
  about 1 % relative difference per pass (docs/performance.md "bf16 on the CPU"). A CPU
  without them (:func:`~noisecraft.nn.cpu_features.bf16_missing`) gets a one-line
  :class:`~noisecraft.errors.NoisecraftWarning`: bf16 still works there, emulated, slower
  than fp32.
* ``offload=True``: weights stay in CPU memory, each layer visits ``device`` for its forward
  (:mod:`noisecraft.pipelines.offload`).
* ``fast=True``: fast mode (docs/performance.md): int8 Linear layers on a float32 CPU model,
  DeepCache while sampling, DPM++ 2M Karras in 10 steps unless asked otherwise, and the tiny
  decoder where one ships.
* ``tiny_decoder``: a TAESD-like decoder file for fast decoding (True: the shipped one), or
  TAESD's own (``taesd_decoder.safetensors`` / ``.pth``, a diffusers ``AutoencoderTiny``
  folder; :func:`~noisecraft.io.native.load_tiny_decoder`).
* ``compile=True``: the U-Net through ``torch.compile`` (:mod:`noisecraft.pipelines.compile`).
* ``threads``: torch's CPU threads for this process (0 = torch's default).
* ``loras=[(path, weight), ...]``: LoRA files applied to every call (merged into the weights
  before fast mode quantises them); ``lora_dir``: the folder where ``<lora:NAME:W>`` prompt
  tags find their files (A1111's ``--lora-dir``). See :mod:`noisecraft.api.loras`.
* ``embedding_dir``: a folder of textual-inversion embeddings; a prompt uses one by its
  file's name, as in A1111 (:mod:`noisecraft.adapters.embedding_set`).
* ``controlnet_dir``: a folder of ControlNet files / diffusers folders that a call's
  ``Control(model=NAME)`` names (and a replayed infotext); :mod:`noisecraft.api.controls`.

:class:`~noisecraft.api.options.LoadOptions` checks every one of them, and how they combine,
before anything loads.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from noisecraft.api.embeddings import embedding_set
from noisecraft.api.limits import Limits
from noisecraft.api.loras import PipelineLoRAs
from noisecraft.api.options import LoadOptions
from noisecraft.api.pipeline import Pipeline
from noisecraft.api.shipped import DEFAULT_MODEL, is_shipped, resolve_model, shipped_tiny_decoder
from noisecraft.errors import ConfigError, NoisecraftWarning
from noisecraft.io.build import cast_floating_
from noisecraft.io.formats.auto import load_any
from noisecraft.io.native import load_tiny_decoder
from noisecraft.io.shipped import SHIPPED_EMBEDDING_DIR, shipped_lcm_unet
from noisecraft.models import LatentDiffusion
from noisecraft.nn.cpu_features import bf16_missing


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    vae: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    low_memory: str | None = None,
    fast: bool = False,
    offload: bool = False,
    compile: bool = False,
    tiny_decoder: str | os.PathLike | bool | None = None,
    prediction: str | None = None,
    arch: str | None = None,
    threads: int = 0,
    max_pixels: int | None = None,
    max_images: int | None = None,
    lora_dir: str | os.PathLike | None = None,
    loras: Sequence[Any] = (),
    embedding_dir: str | os.PathLike | None = None,
    lcm_unet: str | os.PathLike | None = None,
    controlnet_dir: str | os.PathLike | None = None,
) -> Pipeline:
    """Load a model and return a :class:`~noisecraft.api.pipeline.Pipeline` that generates.

    ``model``: a native ``.safetensors``, an SD 1.x / 2.x single file (``.safetensors`` /
    ``.ckpt``), a diffusers folder, or a shipped model's name (``"mnist-text"``, the default,
    or ``"mnist"``). The other options are described in the module docstring; ``vae``
    replaces the model's VAE, ``prediction`` ("eps" / "v") and ``arch`` ("sd1" / "sd2")
    override what is detected from a single file. ``max_pixels`` / ``max_images`` raise or
    lower what one call may ask for (:class:`~noisecraft.api.limits.Limits`; a request that
    does not fit the machine's memory is refused either way).
    """
    limits = Limits(
        **{
            k: v
            for k, v in (("max_pixels", max_pixels), ("max_images", max_images))
            if v is not None
        }
    )
    options = LoadOptions(
        device=device,
        dtype=dtype,
        low_memory=low_memory,
        fast=fast,
        offload=offload,
        compile=compile,
        vae=vae,
        tiny_decoder=tiny_decoder,
        prediction=prediction,
        arch=arch,
        threads=threads,
        lora_dir=lora_dir,
        loras=loras,
        embedding_dir=embedding_dir,
        lcm_unet=lcm_unet if lcm_unet is not None else shipped_lcm_unet(model),
        controlnet_dir=controlnet_dir,
    )
    if threads:
        torch.set_num_threads(threads)
    path = resolve_model(model)
    decoder = _tiny_decoder_file(model, options)  # a missing one is said before the load
    adapters = PipelineLoRAs(options.lora_dir)
    net = _with_tiny_decoder(_load_weights(path, options, adapters), decoder, device)
    if compile:
        from noisecraft.pipelines.compile import compile_unet

        net = compile_unet(net)
    if embedding_dir is not None:
        embedding_set(net, embedding_dir)
    if is_shipped(model):
        _with_shipped_embeddings(net)
    return Pipeline(
        net,
        name=Path(model).stem,
        options=options,
        limits=limits,
        decoder_name=None if decoder is None else decoder.stem,
        loras=adapters,
    )


def _with_shipped_embeddings(net: Any) -> None:
    """A shipped model knows the embeddings shipped for it (``lucky`` for mnist-text), unless
    the embedding folder has one of the same name."""
    files = sorted(SHIPPED_EMBEDDING_DIR.glob("*.safetensors"))
    if not files or getattr(net, "text_encoder", None) is None:
        return
    ti = embedding_set(net)
    for path in files:
        if path.stem not in ti.names:
            ti.load(path)


def _load_weights(path: Path, o: LoadOptions, adapters: PipelineLoRAs) -> Any:
    """The model in the memory layout the options ask for (low memory, dtype, offload, int8),
    with the load-time LoRAs merged (before int8)."""
    if o.low_memory is not None:  # weights stored fp16 / int8, each layer widened as it runs
        from noisecraft.pipelines.lowmem import load_low_memory

        net = load_low_memory(
            path, o.low_memory, vae_path=o.vae, prediction=o.prediction, arch=o.arch
        )
        _merge_loras(net, o, adapters)
        return net
    cpu_bf16 = o.dtype == "bf16" and o.device == "cpu" and not o.offload
    net = load_any(
        path,
        device="cpu" if o.offload else o.device,
        vae=o.vae,
        prediction=o.prediction,
        arch=o.arch,
        # the U-Net straight from the file to bf16: no float32 copy of it on the way
        unet_dtype=torch.bfloat16 if cpu_bf16 else torch.float32,
    )
    latent = isinstance(net, LatentDiffusion)
    uses = (("fast", o.fast), ("dtype", o.dtype != "fp32"), ("offload", o.offload))
    for name, used in (*uses, ("lcm_unet", o.lcm_unet is not None)):
        if used and not latent:
            raise ConfigError(
                f"@{name} is for latent (Stable Diffusion-type) models", settings=[name]
            )
    if o.lcm_unet is not None:  # a distilled LCM student in place of the U-Net
        from noisecraft.adapters.lcm_student import apply_lcm_student

        net = apply_lcm_student(net, o.lcm_unet)
    if cpu_bf16:
        _warn_if_slow_bf16()
        # load_any built the U-Net in bf16 already, so this casts only an LCM student's U-Net
        # (its file's pages go as they are cast); text encoder and VAE stay fp32
        cast_floating_(net.unet, torch.bfloat16)
    elif o.dtype != "fp32":  # weights stored in the dtype they run in (VAE: vae_dtype_for)
        net = net.to(dtype=o.torch_dtype)
    if o.offload:  # weights stay in CPU memory; each layer visits the device for its forward
        from noisecraft.pipelines.offload import offload_latent_diffusion

        net = offload_latent_diffusion(net, o.device)
    _merge_loras(net, o, adapters)
    if o.fast and o.dtype == "fp32" and not o.offload and o.device == "cpu":
        net = net.int8(inplace=True)  # dynamic int8 Linear layers (a CPU kernel), no copy
        adapters.freeze(
            "LoRAs are merged into the weights before fast mode quantises them to int8, so "
            "they cannot change on this pipeline: give them when loading (@loras) or load "
            "without @fast",
            net,
        )
    return net


def _warn_if_slow_bf16() -> None:
    """The one-line warning of bf16 on a CPU without bf16 instructions (it works, slowly)."""
    missing = bf16_missing()
    if missing is not None:
        warnings.warn(
            f"dtype bf16 on the CPU: {missing}, so bf16 is emulated and slower than fp32; "
            "load with dtype fp32",
            NoisecraftWarning,
            stacklevel=3,
        )


def _merge_loras(net: Any, o: LoadOptions, adapters: PipelineLoRAs) -> None:
    """Merge the load-time LoRAs into ``net`` where its weights live."""
    if not o.loras:
        return
    if not isinstance(net, LatentDiffusion):
        raise ConfigError(
            "@loras are for latent (Stable Diffusion-type) models", settings=["loras"]
        )
    from noisecraft.pipelines.lowmem import quantize_per_channel

    adapters.bind(net, quantize_per_channel)
    for lora_path, weight in o.loras:
        adapters.load(lora_path, weight)


def _tiny_decoder_file(model: str | os.PathLike, o: LoadOptions) -> Path | None:
    """The tiny decoder file asked for: a file, the shipped one (True, or None in fast mode
    where one ships), or None."""
    wanted = o.tiny_decoder
    if wanted is None and o.fast:
        return shipped_tiny_decoder(model)
    if wanted is None or wanted is False:
        return None
    if wanted is not True:
        return Path(wanted)
    shipped = shipped_tiny_decoder(model)
    if shipped is None:
        raise ConfigError(
            f"@fast_decode needs @tiny_decoder FILE for {model} (none ships with it; train "
            "one: noisecraft train configs/mnist_tiny_decoder.toml with latent.vae set to "
            "this model)",
            settings=["fast_decode", "tiny_decoder"],
        )
    return shipped


def _with_tiny_decoder(net: Any, path: Path | None, device: str) -> Any:
    """``net`` with the tiny decoder of ``path`` (none when None)."""
    if path is None:
        return net
    if not isinstance(net, LatentDiffusion):
        raise ConfigError(
            "@tiny_decoder is for latent models (they have a VAE)", settings=["tiny_decoder"]
        )
    return net.replace(tiny_decoder=load_tiny_decoder(path, device=device))


__all__ = ["load"]
