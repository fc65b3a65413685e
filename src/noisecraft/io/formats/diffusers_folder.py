"""diffusers Stable Diffusion 1.x / 2.x pipeline folders <-> :class:`LatentDiffusion`.

A diffusers folder (the layout ``StableDiffusionPipeline.save_pretrained`` writes)::

    model_index.json                  pipeline class and its components
    unet/config.json                  UNet2DConditionModel config
    unet/diffusion_pytorch_model.safetensors      (or .bin, .fp16.safetensors, sharded)
    vae/config.json, vae/diffusion_pytorch_model.safetensors       AutoencoderKL
    text_encoder/config.json, text_encoder/model.safetensors      transformers CLIPTextModel
    tokenizer/vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json
    scheduler/scheduler_config.json   the noise schedule and the default sampler

:func:`load_diffusers_folder` reads one into a :class:`LatentDiffusion`; weights go through
:mod:`.unet_keys` (U-Net), :func:`noisecraft.models.vae.from_diffusers_state_dict` (VAE, old
attention names too) and the transformers names of the text encoder (with or without
``text_model.``, which transformers 5 no longer writes); ``.bin`` files are read with
``torch.load(weights_only=True)`` only. :func:`save_diffusers_folder` writes a folder that
``diffusers.StableDiffusionPipeline.from_pretrained`` loads and that gives the same images.

The reference for every file is what diffusers 0.42 / transformers 5 write and read
(``ConfigMixin`` configs, ``ModelMixin`` weight names, ``DiffusionPipeline`` model index);
the schedule follows diffusers' schedulers (``beta_schedule`` linear / scaled_linear /
squaredcos_cap_v2 / sigmoid, ``trained_betas``, ``rescale_betas_zero_snr``).

The scheduler's class and its sampling options are kept in
``model.info.diffusion["scheduler"]``: ``{"class_name", "timestep_spacing", "steps_offset",
"use_karras_sigmas"`` (None where the file leaves them to the class default), ``"config"``
(the whole ``scheduler_config.json`` as read)``}``, so a caller can pick diffusers' default
sampler (e.g. ``GenerateRequest(scheduler_config=...)``); they do not change how noisecraft
samples. Saving writes that scheduler back (with the model's own
schedule), or else an ``EulerDiscreteScheduler`` with ``timestep_spacing: linspace``: the
diffusers scheduler that noisecraft's ``euler`` sampler reproduces step for step (so the
folder's default sampler has a noisecraft twin), and one that reads every schedule option
written here (trained betas, zero terminal SNR, v / x0 prediction).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from noisecraft.diffusion import NoiseSchedule
from noisecraft.errors import CheckpointError, ConfigError, NoisecraftError, OutputExistsError
from noisecraft.io.build import build_module
from noisecraft.io.checkpoint import CheckpointInfo
from noisecraft.io.formats.unet_keys import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from noisecraft.io.native import LATENT_KIND
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from noisecraft.models.tokenizer import CLIPTokenizer
from noisecraft.models.unet import UNet
from noisecraft.models.vae import AutoencoderKL, VAEConfig, from_diffusers_state_dict

#: The diffusers version whose loader the written folders are tested against.
DIFFUSERS_VERSION = "0.42.1"

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_PARTS_HINT = "a diffusers folder needs unet/, vae/, text_encoder/, tokenizer/ (and scheduler/)"

#: model_index ``_class_name`` values whose components are an SD 1.x / 2.x pipeline.
SUPPORTED_PIPELINES = frozenset(
    {
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionInpaintPipelineLegacy",
    }
)
_KNOWN_UNSUPPORTED = {
    "StableDiffusionXLPipeline": "SDXL",
    "StableDiffusionXLImg2ImgPipeline": "SDXL",
    "StableDiffusionXLInpaintPipeline": "SDXL",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "FLUX",
}
#: (safetensors stem, .bin stem) of each part's weights, as diffusers / transformers name them.
_WEIGHT_STEMS = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": ("model", "pytorch_model"),
}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
#: Keys of scheduler_config.json that carry the schedule; saving writes the model's own.
_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)
#: Sampling options kept in ``info.diffusion["scheduler"]`` (None: absent, the class default).
SCHEDULER_OPTIONS = ("timestep_spacing", "steps_offset", "use_karras_sigmas")
DEFAULT_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "timestep_spacing": "linspace",
    "steps_offset": 1,  # Stable Diffusion's published value; only "leading" spacing reads it
    "use_karras_sigmas": False,
    "interpolation_type": "linear",
}


# ============================================================================== reading


def load_diffusers_folder(
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    prediction: str | None = None,
    device: str | torch.device = "cpu",
) -> LatentDiffusion:
    """Read a diffusers SD 1.x / 2.x pipeline folder into a :class:`LatentDiffusion`.

    * ``variant``: read ``*.{variant}.safetensors`` weights (e.g. ``"fp16"``), as diffusers'
      ``from_pretrained(variant=...)``. Half-precision weights are widened to float32.
    * ``prediction``: "eps" / "v" / "x0" overrides the scheduler's ``prediction_type`` (some
      published folders carry a wrong one).
    * ``image_size`` is the U-Net's ``sample_size`` times the VAE's downsampling factor, the
      default size of diffusers' pipeline.

    Every problem (a missing part or weights file, an unsupported pipeline or config) raises
    :class:`CheckpointError` with a one-line message naming the path.
    """
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "not found"
        raise CheckpointError(f"diffusers folder {root} {what}; {_PARTS_HINT}")
    _check_model_index(root)
    for part in PARTS:
        if not (root / part).is_dir():
            raise CheckpointError(f"{root / part} not found; {_PARTS_HINT}")

    unet_cfg_path = root / "unet" / "config.json"
    unet_json = _read_json(unet_cfg_path)
    unet_config = unet_config_from_diffusers(unet_json, source=unet_cfg_path)
    vae_cfg_path = root / "vae" / "config.json"
    vae_config = vae_config_from_diffusers(_read_json(vae_cfg_path), source=vae_cfg_path)
    te_cfg_path = root / "text_encoder" / "config.json"
    te_config = text_encoder_config_from_transformers(_read_json(te_cfg_path), source=te_cfg_path)
    sched_path = root / "scheduler" / "scheduler_config.json"
    sched_json = _read_json(sched_path)
    schedule, sched_prediction = schedule_from_diffusers(sched_json, source=sched_path)
    if prediction is None:
        prediction = sched_prediction
    elif prediction not in _PREDICTIONS.values():
        raise ConfigError(f"prediction must be one of eps, v, x0, got {prediction!r}")
    tokenizer = _read_tokenizer(root / "tokenizer", te_config.max_positions)

    files, state = _read_weights(root / "unet", variant)
    unet = build_module(
        lambda: UNet(unet_config),
        unet_from_diffusers(state, unet_config, source=files[0]),
        what="U-Net",
        source=files[0],
        device=device,
    )
    del state
    files, state = _read_weights(root / "vae", variant)
    try:
        vae_state = from_diffusers_state_dict(state)
    except CheckpointError as e:
        raise CheckpointError(f"{files[0]}: {e}") from None
    vae = build_module(
        lambda: AutoencoderKL(vae_config), vae_state, what="VAE", source=files[0], device=device
    )
    del state, vae_state
    files, state = _read_weights(root / "text_encoder", variant)
    text_encoder = build_module(
        lambda: CLIPTextEncoder(te_config),
        _text_encoder_names(state),
        what="text encoder",
        source=files[0],
        device=device,
    )
    del state

    sample_size = unet_json.get("sample_size", 64)
    if isinstance(sample_size, (list, tuple)) and sample_size:
        sample_size = sample_size[0]  # (height, width): our default size is square
    if not isinstance(sample_size, int) or isinstance(sample_size, bool) or sample_size < 1:
        sample_size = 64
    image_size = sample_size * vae_config.downsample_factor
    scheduler_info = {
        "class_name": sched_json.get("_class_name"),
        **{k: sched_json.get(k) for k in SCHEDULER_OPTIONS},
        "config": dict(sched_json),  # as read, ``_class_name`` included
    }
    info = CheckpointInfo(
        kind=LATENT_KIND,
        config={
            "unet": unet_config.to_dict(),
            "vae": vae_config.to_dict(),
            "text_encoder": te_config.to_dict(),
        },
        diffusion={
            "schedule": schedule.to_config(),
            "prediction": prediction,
            "image_size": image_size,
            "vae_scaling_factor": vae_config.scaling_factor,
            "scheduler": scheduler_info,
            "source": {"format": "diffusers", "path": str(root)},
        },
    )
    try:
        return LatentDiffusion(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            schedule=schedule,
            prediction=prediction,
            image_size=image_size,
            info=info,
        )
    except NoisecraftError as e:
        raise CheckpointError(f"{root}: {e}") from None


def _check_model_index(root: Path) -> None:
    """Refuse pipelines other than SD 1.x / 2.x (``model_index.json`` may be absent)."""
    index_path = root / "model_index.json"
    if not index_path.is_file():
        return
    index = _read_json(index_path)
    name = index.get("_class_name")
    if name in SUPPORTED_PIPELINES:
        return
    family = _KNOWN_UNSUPPORTED.get(str(name))
    what = f"{name} ({family})" if family else str(name)
    raise CheckpointError(
        f"{index_path}: pipeline {what} is not supported yet; noisecraft reads Stable "
        f"Diffusion 1.x / 2.x folders ({', '.join(sorted(SUPPORTED_PIPELINES))})"
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} not found; {_PARTS_HINT}, each with its config file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable JSON file ({_one_line(e)})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} is not a JSON object; expected a diffusers config")
    return doc


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------------------- configs


def vae_config_from_diffusers(
    d: Mapping[str, Any], *, source: str | os.PathLike = "vae/config.json"
) -> VAEConfig:
    """Our :class:`VAEConfig` of a diffusers ``AutoencoderKL`` config dict.

    ``block_out_channels`` -> ``base_channels`` (the first) and ``channel_mult``;
    ``scaling_factor`` defaults to SD's 0.18215. Configs our VAE cannot express (other block
    types, no quant convs, a ``shift_factor``, which SD pipelines ignore) raise
    :class:`CheckpointError` naming ``source`` and the field.
    """

    def bad(field: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(
            f"{source}: VAE {field}={value!r} is not supported (noisecraft's VAE needs {expected})"
        )

    blocks = d.get("block_out_channels", (64,))
    if (
        not isinstance(blocks, (list, tuple))
        or not blocks
        or not all(isinstance(c, int) and c > 0 for c in blocks)
        or any(c % blocks[0] for c in blocks)
    ):
        raise bad("block_out_channels", blocks, "multiples of the first level's channels")
    n = len(blocks)
    for field, block in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        types = list(d.get(field, (block,)))
        if types != [block] * n:
            raise bad(field, types, f"{n} x {block}")
    for field, allowed in (
        ("act_fn", "silu"),
        ("use_quant_conv", True),
        ("use_post_quant_conv", True),
        ("shift_factor", None),
    ):
        if d.get(field, allowed) != allowed:
            raise bad(field, d.get(field), f"{field}={allowed!r}")
    scaling = d.get("scaling_factor", 0.18215)
    try:
        return VAEConfig(
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            base_channels=blocks[0],
            channel_mult=tuple(c // blocks[0] for c in blocks),
            num_res_blocks=d.get("layers_per_block", 1),
            z_channels=d.get("latent_channels", 4),
            double_z=True,
            norm_groups=d.get("norm_num_groups", 32),
            mid_attention=d.get("mid_block_add_attention", True),
            scaling_factor=0.18215 if scaling is None else scaling,
            shift_factor=None,
        )
    except NoisecraftError as e:
        raise CheckpointError(f"{source}: {e}") from None


def vae_config_to_diffusers(config: VAEConfig, *, sample_size: int | None = None) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config of our :class:`VAEConfig` (inverse of the above)."""
    if config.channel_mult[0] != 1 or not config.double_z or config.shift_factor is not None:
        raise ConfigError(
            "this VAE has no diffusers AutoencoderKL equivalent: it needs channel_mult[0] = 1, "
            f"double_z and no shift_factor (got {list(config.channel_mult)}, "
            f"{config.double_z}, {config.shift_factor})"
        )
    channels = [config.base_channels * m for m in config.channel_mult]
    odd = [c for c in channels if c % config.norm_groups]
    if odd:
        raise ConfigError(
            f"VAE norm_groups={config.norm_groups} does not divide {odd[0]} channels; diffusers' "
            "AutoencoderKL needs norm_groups that divides every level"
        )
    n = len(channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": channels,
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": config.scaling_factor,
        "shift_factor": None,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": config.mid_attention,
    }


def text_encoder_config_from_transformers(
    d: Mapping[str, Any], *, source: str | os.PathLike = "text_encoder/config.json"
) -> TextEncoderConfig:
    """Our :class:`TextEncoderConfig` of a transformers ``CLIPTextConfig`` dict
    (:meth:`TextEncoderConfig.from_transformers`), refusing other text models.

    An ``eos_token_id`` outside the vocabulary (transformers' default 49407 in a small test
    vocabulary; transformers itself only warns) is read as the legacy 2, pooling at the
    argmax id: only the pooled output depends on it, and SD pipelines do not use it.
    """
    model_type = d.get("model_type", "clip_text_model")
    if model_type not in ("clip_text_model", "clip"):
        raise CheckpointError(
            f"{source}: text encoder model_type {model_type!r} is not supported "
            "(noisecraft reads CLIP text encoders, model_type 'clip_text_model')"
        )
    if model_type == "clip":  # a whole CLIP model's config: the text part is nested
        d = d.get("text_config", {})
    eos, vocab = d.get("eos_token_id"), d.get("vocab_size", 49408)
    if isinstance(eos, int) and isinstance(vocab, int) and not 0 <= eos < vocab:
        d = {**d, "eos_token_id": 2}
    try:
        return TextEncoderConfig.from_transformers(d)
    except NoisecraftError as e:
        raise CheckpointError(f"{source}: {e}") from None


def text_encoder_config_to_transformers(
    config: TextEncoderConfig, tokenizer: CLIPTokenizer | None = None
) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` dict of our config. ``eos_token_id`` None (pool at the
    argmax id) is written as 2, the legacy value for which transformers does the same."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": config.vocab_size,
        "hidden_size": config.width,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "max_position_embeddings": config.max_positions,
        "hidden_act": config.activation,
        "layer_norm_eps": config.layer_norm_eps,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "projection_dim": config.width,
        "bos_token_id": tokenizer.bos_token_id if tokenizer is not None else 0,
        "eos_token_id": 2 if config.eos_token_id is None else config.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id if tokenizer is not None else 1,
        "dtype": "float32",
    }


def schedule_from_diffusers(
    d: Mapping[str, Any], *, source: str | os.PathLike = "scheduler/scheduler_config.json"
) -> tuple[NoiseSchedule, str]:
    """(schedule, prediction) of a diffusers scheduler config.

    As diffusers' schedulers: ``trained_betas`` wins over ``beta_schedule``; linear and
    scaled_linear (linear in sqrt(beta)) from ``beta_start`` to ``beta_end``,
    ``squaredcos_cap_v2`` the improved-DDPM cosine (s = 0.008, betas capped at 0.999),
    ``sigmoid`` as DDPMScheduler's; ``rescale_betas_zero_snr`` applies Lin et al. 2023.
    ``prediction_type`` epsilon / v_prediction / sample -> "eps" / "v" / "x0".
    """

    def bad(field: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(f"{source}: {field}={value!r} is not supported ({expected})")

    steps = d.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise bad("num_train_timesteps", steps, "an integer >= 2")
    start, end = d.get("beta_start", 0.0001), d.get("beta_end", 0.02)
    trained = d.get("trained_betas")
    kind = d.get("beta_schedule", "linear")
    try:
        if trained is not None:
            if not isinstance(trained, list) or len(trained) != steps:
                raise bad("trained_betas", "...", f"a list of num_train_timesteps={steps} betas")
            schedule = NoiseSchedule(torch.tensor(trained, dtype=torch.float64))
        elif kind == "linear":
            schedule = NoiseSchedule.linear(steps, start, end)
        elif kind == "scaled_linear":
            schedule = NoiseSchedule.scaled_linear(steps, start, end)
        elif kind == "squaredcos_cap_v2":
            schedule = NoiseSchedule.cosine(steps)
        elif kind == "sigmoid":
            schedule = NoiseSchedule.sigmoid(steps, start, end)
        else:
            raise bad("beta_schedule", kind, f"one of {', '.join(_BETA_SCHEDULES)}")
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {_one_line(e)}") from None
    if d.get("rescale_betas_zero_snr", False):
        schedule = schedule.rescale_zero_terminal_snr()
    prediction_type = d.get("prediction_type", "epsilon")
    if prediction_type not in _PREDICTIONS:
        raise bad("prediction_type", prediction_type, f"one of {', '.join(_PREDICTIONS)}")
    return schedule, _PREDICTIONS[prediction_type]


def schedule_to_diffusers(schedule: NoiseSchedule, prediction: str) -> dict[str, Any]:
    """The schedule keys of a diffusers scheduler config (inverse of the above).

    Named schedules with diffusers' parameters are written by name; any other is written
    as ``trained_betas`` (float64 values in JSON, read back exactly).
    """
    params = schedule.params
    base: NoiseSchedule | None = schedule
    out: dict[str, Any] = {
        "num_train_timesteps": schedule.num_steps,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": {v: k for k, v in _PREDICTIONS.items()}[prediction],
        "rescale_betas_zero_snr": schedule.zero_terminal_snr,
    }
    if schedule.name in ("linear", "scaled_linear") and set(params) == {"beta_start", "beta_end"}:
        out.update(beta_schedule=schedule.name, **params)
    elif schedule.name == "cosine" and params == {"s": 0.008, "max_beta": 0.999}:
        out["beta_schedule"] = "squaredcos_cap_v2"
    else:
        base = None
    if base is not None:
        # the named schedule must rebuild these exact betas (a schedule built by name may
        # still carry edited betas, e.g. from NoiseSchedule(betas, "linear", ...))
        rebuilt, _ = schedule_from_diffusers(out)
        if not torch.equal(rebuilt.betas, schedule.betas):
            base = None
    if base is None:
        out.update(
            beta_schedule="linear",
            trained_betas=[float(b) for b in schedule.betas],
            rescale_betas_zero_snr=False,
        )
    return out


# ---------------------------------------------------------------------------- tokenizer


def _special_token(folder: Path, name: str) -> str | None:
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / file
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(name)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


def _read_tokenizer(folder: Path, max_positions: int) -> CLIPTokenizer:
    """CLIP BPE tokenizer of a ``tokenizer/`` folder, with transformers' text clean-up (what
    diffusers' pipeline runs) and the folder's start / end / pad tokens.

    Reads ``vocab.json`` + ``merges.txt`` (transformers 4, published SD folders) or, failing
    those, the ``tokenizer.json`` of the `tokenizers` library (all transformers 5 writes).
    """
    kwargs: dict[str, Any] = {"cleanup": "transformers", "context_length": max_positions}
    specials = {n: _special_token(folder, n) for n in ("bos_token", "eos_token", "pad_token")}
    for name in ("bos_token", "eos_token"):
        if specials[name] is not None:
            kwargs[name] = specials[name]
    length = None
    with contextlib.suppress(CheckpointError):
        length = _read_json(folder / "tokenizer_config.json").get("model_max_length")
    if isinstance(length, int) and not isinstance(length, bool) and 3 <= length < max_positions:
        kwargs["context_length"] = length
    if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for file in (vocab_path, merges_path):
            if not file.is_file():
                raise CheckpointError(
                    f"{file} not found; a diffusers tokenizer/ folder needs vocab.json and "
                    "merges.txt (or tokenizer.json)"
                )
        try:
            tok = CLIPTokenizer.from_files(vocab_path, merges_path, **kwargs)
        except NoisecraftError as e:
            raise CheckpointError(f"{folder}: {e}") from None
    else:
        vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
        try:
            tok = CLIPTokenizer(vocab, merges, **kwargs)
        except NoisecraftError as e:
            raise CheckpointError(f"{folder / 'tokenizer.json'}: {e}") from None
    pad = specials["pad_token"]
    if pad is not None and pad in tok.vocab and tok.vocab[pad] != tok.pad_token_id:
        tok = CLIPTokenizer(tok.vocab, tok.merges, pad_token_id=tok.vocab[pad], **kwargs)
    return tok


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a `tokenizers` ``tokenizer.json`` holding a BPE model."""
    model = _read_json(path).get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise CheckpointError(f"{path} does not hold a BPE tokenizer model; expected CLIP's")
    vocab, raw = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(raw, list):
        raise CheckpointError(f"{path}: the BPE model has no vocab / merges")
    merges: list[tuple[str, str]] = []
    for item in raw:  # ["a", "b"] (tokenizers >= 0.20) or "a b"
        pair = item.split(" ") if isinstance(item, str) else item
        if not isinstance(pair, list) or len(pair) != 2:
            raise CheckpointError(f"{path}: merge {item!r} is not a pair of symbols")
        merges.append((pair[0], pair[1]))
    return vocab, merges


def _write_tokenizer(tokenizer: CLIPTokenizer, folder: Path) -> None:
    decoder = {i: t for t, i in tokenizer.vocab.items()}
    bos, eos = decoder[tokenizer.bos_token_id], decoder[tokenizer.eos_token_id]
    pad = decoder[tokenizer.pad_token_id]
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": pad}
    folder.mkdir()
    _write_json(folder / "vocab.json", dict(tokenizer.vocab))
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.merges)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": tokenizer.context_length,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": True,
            **specials,
        },
    )


# ---------------------------------------------------------------------------- weights


def _candidates(stem: str, bin_stem: str, variant: str | None) -> list[str]:
    if variant:
        return [
            f"{stem}.{variant}.safetensors",
            f"{stem}.safetensors.index.{variant}.json",
            f"{bin_stem}.{variant}.bin",
            f"{bin_stem}.bin.index.{variant}.json",
        ]
    return [
        f"{stem}.safetensors",
        f"{stem}.safetensors.index.json",
        f"{bin_stem}.bin",
        f"{bin_stem}.bin.index.json",
    ]


def _read_weights(folder: Path, variant: str | None) -> tuple[list[Path], dict[str, Tensor]]:
    """(files read, state dict) of one part: safetensors, ``.bin`` or a sharded index."""
    stem, bin_stem = _WEIGHT_STEMS[folder.name]
    names = _candidates(stem, bin_stem, variant)
    found = next((folder / n for n in names if (folder / n).is_file()), None)
    if found is None:
        what = f"{variant} weights" if variant else "weights"
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        hint = f" (found {', '.join(others)}; pass the matching variant)" if others else ""
        raise CheckpointError(f"{folder / names[0]} not found: no {what} in {folder}{hint}")
    if not found.name.endswith(".json"):
        return [found], _load_tensors(found)
    index = _read_json(found)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{found} has no weight_map; expected a sharded-weights index")
    shards = [folder / name for name in dict.fromkeys(weight_map.values())]
    state: dict[str, Tensor] = {}
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{shard} not found; {found} lists it as a shard")
        state.update(_load_tensors(shard))
    return [found, *shards], state


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"{path} could not be read ({_one_line(e)}); the file may be truncated or not "
            "a plain weights file"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def _text_encoder_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers CLIPTextModel keys (with or without ``text_model.``) -> ours."""
    return {
        k.removeprefix("text_model."): v
        for k, v in state.items()
        if not k.endswith("position_ids") and not k.startswith("text_projection.")
    }


# ============================================================================== writing


def save_diffusers_folder(
    model: LatentDiffusion, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write ``model`` as a diffusers ``StableDiffusionPipeline`` folder at ``path``.

    Weights are float32 ``.safetensors`` under diffusers / transformers names; configs,
    tokenizer files (``vocab.json``, ``merges.txt``, ``special_tokens_map.json``,
    ``tokenizer_config.json``), ``scheduler/scheduler_config.json`` (see the module docstring
    for the scheduler class) and ``model_index.json`` (``StableDiffusionInpaintPipeline`` for
    a 9-channel U-Net). diffusers conditions on the text encoder's last layer, so a model with
    ``clip_skip`` k > 1 is written with its first ``layers - k + 1`` layers (as SD 2.x
    folders keep 23 of OpenCLIP's 24): the folder gives the same images.

    Written into a temporary folder beside ``path``, then renamed onto it; an existing
    ``path`` is refused unless ``overwrite`` (then it is replaced only once the new folder is
    complete).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} is a file; choose a folder path for the diffusers model")
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path} exists; pass @overwrite to replace it or choose another folder",
            settings=["overwrite"],
        )
    if not isinstance(model.tokenizer, CLIPTokenizer):
        raise ConfigError(
            "save_diffusers_folder needs a noisecraft CLIPTokenizer to write tokenizer/, got "
            f"{type(model.tokenizer).__name__}"
        )
    parts = _diffusers_parts(model)  # every config error before anything is written
    with _staging_folder(path) as tmp:
        for name, (config, tensors, weights_name) in parts.items():
            (tmp / name).mkdir()
            _write_json(tmp / name / "config.json", config)
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                str(tmp / name / weights_name),
                metadata={"format": "pt"},
            )
        _write_tokenizer(model.tokenizer, tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        _write_json(tmp / "scheduler" / "scheduler_config.json", _scheduler_config(model))
        inpaint = model.unet.config.in_channels == 2 * model.latent_channels + 1
        _write_json(
            tmp / "model_index.json",
            {
                "_class_name": (
                    "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
                ),
                "_diffusers_version": DIFFUSERS_VERSION,
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "scheduler": ["diffusers", _scheduler_config(model)["_class_name"]],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
        )
    return path


def _diffusers_parts(model: LatentDiffusion) -> dict[str, tuple[dict, dict[str, Tensor], str]]:
    """(config, tensors, weights file name) of unet/, vae/ and text_encoder/."""
    f = model.vae.config.downsample_factor
    unet_config = unet_config_to_diffusers(
        model.unet.config, sample_size=max(model.image_size // f, 1)
    )
    unet_config["_diffusers_version"] = DIFFUSERS_VERSION
    unet_tensors = unet_to_diffusers(model.unet.state_dict(), model.unet.config)
    vae_config = vae_config_to_diffusers(model.vae.config, sample_size=model.image_size)
    vae_tensors = model.vae.to_diffusers_state_dict()

    te = model.text_encoder.config
    clip_skip = model.clip_skip if model.clip_skip is not None else te.clip_skip
    keep = te.layers - clip_skip + 1
    te_state = {
        k: v
        for k, v in model.text_encoder.state_dict().items()
        if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < keep
    }
    te_config = text_encoder_config_to_transformers(
        TextEncoderConfig.from_dict({**te.to_dict(), "layers": keep, "clip_skip": 1}),
        model.tokenizer,
    )
    te_tensors = {f"text_model.{k}": v for k, v in te_state.items()}
    return {
        "unet": (unet_config, unet_tensors, "diffusion_pytorch_model.safetensors"),
        "vae": (vae_config, vae_tensors, "diffusion_pytorch_model.safetensors"),
        "text_encoder": (te_config, te_tensors, "model.safetensors"),
    }


def _scheduler_config(model: LatentDiffusion) -> dict[str, Any]:
    """The scheduler the model came with (``info.diffusion["scheduler"]``), else Euler; the
    schedule keys always describe the model's own schedule and prediction."""
    saved = (model.info.diffusion.get("scheduler") if model.info else None) or {}
    if saved.get("class_name"):
        kept = saved.get("config") or {}
        config = {k: v for k, v in kept.items() if not k.startswith("_")}
        config["_class_name"] = saved["class_name"]
    else:
        config = dict(DEFAULT_SCHEDULER)
    config["_diffusers_version"] = DIFFUSERS_VERSION
    config.update(schedule_to_diffusers(model.schedule, model.prediction))
    return config


def _write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _staging_folder(path: Path) -> Iterator[Path]:
    """A temporary folder beside ``path``, renamed onto ``path`` on success.

    A directory cannot be renamed over a non-empty one, so an existing ``path`` is first
    moved aside, then removed once the new folder is in place (restored if that fails).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a plain mkdir would not
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "folder")
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old / "folder", path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "DEFAULT_SCHEDULER",
    "DIFFUSERS_VERSION",
    "SUPPORTED_PIPELINES",
    "load_diffusers_folder",
    "save_diffusers_folder",
    "schedule_from_diffusers",
    "schedule_to_diffusers",
    "text_encoder_config_from_transformers",
    "text_encoder_config_to_transformers",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
]
