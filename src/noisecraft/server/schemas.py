"""Request and response bodies of the ``/sdapi/v1`` endpoints, with AUTOMATIC1111's field
names and meanings (``modules/api/models.py`` of stable-diffusion-webui).

A field left at its default (mostly None) takes the engine's default (the model's size,
its sampler / steps / CFG; :meth:`noisecraft.api.Pipeline.defaults`), not A1111's 512 x 512
/ Euler / 50 steps. What each field does, and which are refused when set, is listed in
docs/server.md and applied by :mod:`noisecraft.server.a1111`. Unknown fields are ignored,
as A1111 does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerationFields(_Body):
    """The fields txt2img and img2img share."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(
        default_factory=dict,
        description="extensions' arguments; 'controlnet' (args: units) is reserved for "
        "ControlNet, not available yet",
    )


class TextToImageRequest(GenerationFields):
    """POST /sdapi/v1/txt2img."""

    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class ImageToImageRequest(GenerationFields):
    """POST /sdapi/v1/img2img: ``init_images`` (base64 PNG / JPEG / WebP, with or without a
    ``data:`` prefix; the first is used), ``mask`` (white = repaint) and the inpainting
    fields."""

    init_images: list[str] = Field(default_factory=list)
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False
    denoising_strength: float | None = 0.75


class GenerationResponse(_Body):
    """What txt2img and img2img answer: base64 PNGs (each with its ``parameters`` text),
    the request as read, and ``info``: a JSON string (``infotexts``, ``seed``,
    ``all_seeds``, ..., and noisecraft's ``files``: where each image was saved)."""

    images: list[str]
    parameters: dict[str, Any]
    info: str


class ProgressState(_Body):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(_Body):
    """GET /sdapi/v1/progress."""

    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class PNGInfoRequest(_Body):
    image: str


class PNGInfoResponse(_Body):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class SamplerItem(_Body):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(_Body):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class SDModelItem(_Body):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class LoraItem(_Body):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class EmbeddingItem(_Body):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int
    vectors: int


class EmbeddingsResponse(_Body):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class ScriptsList(_Body):
    txt2img: list[str]
    img2img: list[str]


__all__ = [
    "EmbeddingItem",
    "EmbeddingsResponse",
    "GenerationFields",
    "GenerationResponse",
    "ImageToImageRequest",
    "LoraItem",
    "PNGInfoRequest",
    "PNGInfoResponse",
    "ProgressResponse",
    "ProgressState",
    "SDModelItem",
    "SamplerItem",
    "ScriptsList",
    "SchedulerItem",
    "TextToImageRequest",
]
