"""AUTOMATIC1111's request fields <-> the engine's settings, and A1111's ``info`` JSON.

This module only translates; every default and check of a setting is the engine's
(:class:`noisecraft.api.Pipeline`). The translation, field by field (docs/server.md):

* ``prompt`` / ``negative_prompt`` (``<lora:NAME:W>`` tags included), ``steps``,
  ``cfg_scale`` -> ``cfg``, ``width`` / ``height``, ``sampler_name`` (or the older
  ``sampler_index``; any A1111 spelling, "DPM++ 2M Karras" too) -> ``sampler``,
  ``scheduler`` ("Automatic", "Karras", ...) -> ``schedule``; a field left out (None) is the
  engine's default for the model, not A1111's 512 x 512 / Euler / 50 steps.
* ``seed`` (-1: one random seed for the request), ``batch_size`` images per engine call and
  ``n_iter`` calls: image ``i`` of the request has seed ``seed + i`` (A1111's ``all_seeds``).
* ``eta`` goes to the samplers that take one (ancestral / SDE / DDIM), as A1111 passes it
  (with no ``sampler_name``, the engine's default sampler runs with its own eta).
* ``CLIP_stop_at_last_layers`` (an option, or in ``override_settings``) -> ``clip_skip``;
  ``override_settings.sd_model_checkpoint`` runs the request on that model (switched back
  afterwards unless ``override_settings_restore_afterwards`` is false).
* img2img: the first of ``init_images`` -> ``init_image`` (resized to width x height as
  A1111's "Just resize", ``resize_mode`` 0), ``denoising_strength`` -> ``strength``,
  ``mask`` -> ``mask`` (``inpainting_mask_invert`` 1 inverts it; ``mask_blur`` blurs it as
  A1111 does), ``inpainting_fill`` 1 ("original") and ``inpaint_full_res`` false ("whole
  picture") are what the engine's inpainting is.
* ``restore_faces``, ``do_not_save_*``, ``save_images``, ``image_cfg_scale``, ``styles``
  (empty), ``hr_*`` (with ``enable_hr`` false) are ignored: every image is saved anyway.

A field that would change the image in a way the engine cannot (hires fix, variation seeds,
seamless tiling, "only masked" inpainting, other fills, scripts, sampler noise overrides) is
refused with a one-line 422 that names it, rather than silently ignored.

``alwayson_scripts``: the ``controlnet`` entry (``{"args": [unit, ...]}``, the ControlNet
extension's format; :func:`controlnet_units`) becomes the engine's ControlNet units
(:mod:`noisecraft.server.controlnet_units`); any other script is refused (422).
"""

from __future__ import annotations

import inspect
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from noisecraft._version import __version__
from noisecraft.api.pipeline import RANDOM_SEED_RANGE
from noisecraft.errors import ConfigError
from noisecraft.pipelines.png_params import parse_parameters
from noisecraft.samplers import as_spec
from noisecraft.server.config import ServerConfig
from noisecraft.server.controlnet_units import controls_of
from noisecraft.server.images import blur_mask, decode_image
from noisecraft.server.schemas import GenerationFields, ImageToImageRequest, TextToImageRequest

#: The options of GET / POST /sdapi/v1/options this server knows.
OPTIONS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")


@dataclass(frozen=True)
class Plan:
    """One request, translated: the engine settings of each call (``settings``, without
    ``n`` and ``seed``), the first ``seed``, ``batch_size`` images per call, ``n_iter``
    calls, and the model to run on (None: the current one)."""

    kind: str
    settings: dict[str, Any]
    seed: int
    batch_size: int
    n_iter: int
    model: str | None = None
    restore_model: bool = True
    send_images: bool = True
    echo: dict[str, Any] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return self.batch_size * self.n_iter

    def seeds(self, it: int) -> int:
        """The first seed of call ``it``."""
        return self.seed + it * self.batch_size


def _refuse(message: str) -> ConfigError:
    return ConfigError(message)


def _unsupported(name: str, why: str) -> ConfigError:
    return _refuse(f"{name} is not supported by this server ({why}); leave it at its default")


def _script_args(key: str, value: Any) -> list[Any]:
    """The ``args`` list of one ``alwayson_scripts`` entry (``{"args": [...]}`` or the list
    itself; null = none), or a 422 for anything else (a number, a string)."""
    args = value.get("args", []) if isinstance(value, dict) else value
    if args is None:
        return []
    if not isinstance(args, list):
        raise _refuse(
            f'alwayson_scripts.{key}: expected {{"args": [...]}} or a list, '
            f"got {type(args).__name__}"
        )
    return args


def controlnet_units(alwayson_scripts: dict[str, Any]) -> list[Any]:
    """The ControlNet units of ``alwayson_scripts`` (the ``controlnet`` entry, any case;
    units with ``enabled`` false dropped). The ControlNet branch maps them to the engine."""
    units: list[Any] = []
    for key, value in alwayson_scripts.items():
        if key.lower() != "controlnet":
            continue
        for unit in _script_args(key, value):
            if isinstance(unit, dict) and unit.get("enabled", True) is False:
                continue
            if unit in (None, False):
                continue
            units.append(unit)
    return units


def _check_scripts(req: GenerationFields) -> None:
    if req.script_name:
        raise _unsupported("script_name", "no scripts are installed")
    for key, value in req.alwayson_scripts.items():
        if key.lower() == "controlnet":
            continue
        if any(a not in (None, False) for a in _script_args(key, value)):
            raise _refuse(
                f"alwayson_scripts.{key}: no such script on this server; only 'controlnet' "
                "(the ControlNet extension's units)"
            )


def _check_common(req: GenerationFields, config: ServerConfig) -> None:
    _check_scripts(req)
    if req.styles:
        raise _unsupported("styles", "write the style into the prompt")
    if req.subseed_strength:
        raise _unsupported("subseed_strength", "variation seeds")
    if req.seed_resize_from_h > 0 or req.seed_resize_from_w > 0:
        raise _unsupported("seed_resize_from_h/w", "resized seeds")
    if req.tiling:
        raise _unsupported("tiling", "seamless tiling")
    if req.refiner_checkpoint not in (None, "", "None"):
        raise _unsupported("refiner_checkpoint", "refiner models")
    if req.disable_extra_networks:
        raise _unsupported("disable_extra_networks", "<lora:...> tags are always read")
    if req.s_churn or req.s_tmin or req.s_min_uncond:
        raise _unsupported("s_churn / s_tmin / s_min_uncond", "sampler noise overrides")
    if req.s_tmax not in (None, 0.0) and not math.isinf(req.s_tmax):
        raise _unsupported("s_tmax", "sampler noise overrides")
    if req.s_noise not in (None, 1.0):
        raise _unsupported("s_noise", "sampler noise overrides")
    for name in ("batch_size", "n_iter"):
        if getattr(req, name) < 1:
            raise _refuse(f"{name} must be at least 1, got {getattr(req, name)}")
    if req.batch_size * req.n_iter > config.max_images:
        raise _refuse(
            f"batch_size x n_iter = {req.batch_size * req.n_iter} images is more than this "
            f"server makes in one request ({config.max_images}); ask for fewer"
        )
    if req.steps is not None and req.steps > config.max_steps:
        raise _refuse(
            f"steps = {req.steps} is more than this server allows ({config.max_steps}); "
            "ask for fewer"
        )
    unknown = sorted(set(req.override_settings) - set(OPTIONS))
    if unknown:
        raise _refuse(
            f"override_settings: unknown option(s) {', '.join(unknown)}; this server knows "
            f"{', '.join(OPTIONS)}"
        )


def clip_skip_of(value: Any) -> int:
    """``CLIP_stop_at_last_layers`` as an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise _refuse(f"CLIP_stop_at_last_layers must be an integer, got {value!r}")
    if value < 1:
        raise _refuse(f"CLIP_stop_at_last_layers must be at least 1, got {value}")
    return int(value)


def _settings(req: GenerationFields, clip_skip: int | None) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if req.prompt:  # "" is the engine's default for a text model; a class model takes none
        settings["prompt"] = req.prompt
    if req.negative_prompt:
        settings["negative_prompt"] = req.negative_prompt
    sampler = req.sampler_name or req.sampler_index
    if req.scheduler:
        settings["schedule"] = req.scheduler
    if sampler:
        settings["sampler"] = sampler
        function = as_spec(sampler, req.scheduler).record.function
        if req.eta is not None and "eta" in inspect.signature(function).parameters:
            settings["eta"] = req.eta
    for ours, theirs in (("steps", "steps"), ("cfg", "cfg_scale")):
        value = getattr(req, theirs)
        if value is not None:
            settings[ours] = value
    for name in ("width", "height"):
        if getattr(req, name) is not None:
            settings[name] = getattr(req, name)
    override = req.override_settings.get("CLIP_stop_at_last_layers")
    if override is not None:
        clip_skip = clip_skip_of(override)
    if clip_skip is not None:
        settings["clip_skip"] = clip_skip
    return settings


def _seed(seed: int) -> int:
    return random.randrange(RANDOM_SEED_RANGE) if seed == -1 else seed


def txt2img_plan(req: TextToImageRequest, config: ServerConfig, clip_skip: int | None) -> Plan:
    """The plan of a txt2img request (module docstring), or a one-line 422 error."""
    _check_common(req, config)
    if req.enable_hr:
        raise _unsupported("enable_hr", "the hires fix")
    return _plan("txt2img", req, _settings(req, clip_skip), config)


def img2img_plan(req: ImageToImageRequest, config: ServerConfig, clip_skip: int | None) -> Plan:
    """The plan of an img2img / inpainting request (module docstring)."""
    _check_common(req, config)
    if not req.init_images:
        raise _refuse("init_images is empty; send the picture to change (base64 PNG)")
    if req.initial_noise_multiplier not in (None, 1.0):
        raise _unsupported("initial_noise_multiplier", "the engine's noise is not scaled")
    if req.latent_mask:
        raise _unsupported("latent_mask", "a second mask")
    settings = _settings(req, clip_skip)
    limits = {"max_bytes": config.max_image_bytes, "max_pixels": config.max_pixels}
    init = decode_image(req.init_images[0], "init_images[0]", **limits)
    size = (settings.get("width") or init.width, settings.get("height") or init.height)
    init = _resized(init, size, req.resize_mode, "init image")
    settings.update(init_image=init, width=size[0], height=size[1])
    if req.denoising_strength is not None:
        settings["strength"] = req.denoising_strength
    if req.mask:
        if req.inpainting_fill != 1:
            raise _refuse(
                f"inpainting_fill = {req.inpainting_fill} is not supported; the engine's "
                "inpainting starts from the original picture: send inpainting_fill 1"
            )
        if req.inpaint_full_res:
            raise _refuse(
                "inpaint_full_res (only masked) is not supported; send inpaint_full_res false "
                "(whole picture)"
            )
        mask = decode_image(req.mask, "mask", **limits).convert("L")
        mask = _resized(mask, size, req.resize_mode, "mask")
        if req.inpainting_mask_invert:
            mask = Image.eval(mask, lambda v: 255 - v)
        blur_x, blur_y = (
            (req.mask_blur, req.mask_blur)
            if req.mask_blur is not None
            else (
                req.mask_blur_x,
                req.mask_blur_y,
            )
        )
        if blur_x or blur_y:
            mask = blur_mask(mask, blur_x, blur_y)
        settings["mask"] = mask
    return _plan("img2img", req, settings, config)


def _resized(im: Image.Image, size: tuple[int, int], mode: int, what: str) -> Image.Image:
    if im.size == tuple(size):
        return im
    if mode != 0:
        raise _unsupported(
            f"resize_mode {mode} for a {what} of another size", "only 0, just resize"
        )
    return im.resize(size, resample=Image.Resampling.LANCZOS)


def _plan(kind: str, req: GenerationFields, settings: dict[str, Any], config: ServerConfig) -> Plan:
    units = controlnet_units(req.alwayson_scripts)
    if units:  # the ControlNet extension's units (server/controlnet_units.py)
        settings["control"] = controls_of(units, config)
    model = req.override_settings.get("sd_model_checkpoint")
    echo = req.model_dump(exclude={"init_images", "mask"})
    return Plan(
        kind=kind,
        settings=settings,
        seed=_seed(req.seed),
        batch_size=req.batch_size,
        n_iter=req.n_iter,
        model=None if model is None else str(model),
        restore_model=req.override_settings_restore_afterwards,
        send_images=req.send_images,
        echo=echo,
    )


def info_json(
    plan: Plan,
    infotexts: list[str],
    seeds: list[int],
    files: list[str],
    *,
    model: str,
    interrupted: bool,
    skipped: int,
) -> str:
    """A1111's ``info``: a JSON string describing the images (from their infotexts), plus
    noisecraft's ``files`` (each image's path in the outputs folder), ``interrupted`` and
    ``skipped_batches``."""
    first = parse_parameters(infotexts[0]) if infotexts else {}
    prompts = [parse_parameters(t).get("prompt", "") for t in infotexts]
    negatives = [parse_parameters(t).get("negative_prompt", "") for t in infotexts]
    s = plan.settings
    info = {
        "prompt": first.get("prompt", s.get("prompt", "")),
        "all_prompts": prompts,
        "negative_prompt": first.get("negative_prompt", s.get("negative_prompt", "")),
        "all_negative_prompts": negatives,
        "seed": seeds[0] if seeds else plan.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": first.get("width", s.get("width")),
        "height": first.get("height", s.get("height")),
        "sampler_name": first.get("sampler"),
        "scheduler": first.get("schedule_type", "Automatic"),
        "cfg_scale": first.get("cfg_scale"),
        "steps": first.get("steps"),
        "batch_size": plan.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model,
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.get("denoising_strength"),
        "extra_generation_params": first.get("extra", {}),
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": first.get("clip_skip", 1),
        "is_using_inpainting_conditioning": False,
        "version": f"noisecraft {__version__}",
        "files": files,
        "interrupted": interrupted,
        "skipped_batches": skipped,
    }
    return json.dumps(info)


__all__ = [
    "OPTIONS",
    "Plan",
    "clip_skip_of",
    "controlnet_units",
    "img2img_plan",
    "info_json",
    "txt2img_plan",
]
