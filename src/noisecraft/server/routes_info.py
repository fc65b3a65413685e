"""The endpoints that list and configure: samplers, schedulers, models, options, LoRAs,
embeddings, scripts, png-info, refresh-checkpoints (AUTOMATIC1111's ``/sdapi/v1`` shapes)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Request
from starlette.concurrency import run_in_threadpool

from noisecraft.api.loras import PipelineLoRAs
from noisecraft.errors import ConfigError
from noisecraft.pipelines.png_params import parse_parameters
from noisecraft.samplers import RECORDS, SCHEDULE_LABELS
from noisecraft.server.a1111 import OPTIONS, clip_skip_of
from noisecraft.server.images import decode_image
from noisecraft.server.jobs import Job
from noisecraft.server.routes_generate import state_of
from noisecraft.server.schemas import (
    EmbeddingItem,
    EmbeddingsResponse,
    LoraItem,
    PNGInfoRequest,
    PNGInfoResponse,
    SamplerItem,
    SchedulerItem,
    ScriptsList,
    SDModelItem,
)

router = APIRouter(prefix="/sdapi/v1", tags=["info"])


@router.get("/samplers", response_model=list[SamplerItem])
async def samplers() -> list[SamplerItem]:
    """The samplers, by A1111 display name; aliases are the other spellings accepted."""
    return [
        SamplerItem(
            name=r.display,
            aliases=[r.name, *r.a1111_names[1:], *r.aliases],
            options={"scheduler": r.default_schedule},
        )
        for r in RECORDS
    ]


@router.get("/schedulers", response_model=list[SchedulerItem])
async def schedulers() -> list[SchedulerItem]:
    """The schedule types (``scheduler`` field); "automatic": the sampler's own."""
    items = [SchedulerItem(name="automatic", label="Automatic")]
    for spacing, label in SCHEDULE_LABELS.items():
        items.append(SchedulerItem(name=label.lower(), label=label, aliases=[spacing]))
    return items


@router.get("/sd-models", response_model=list[SDModelItem])
async def sd_models(request: Request) -> list[SDModelItem]:
    """The models: the shipped ones and those of the models folder, by name."""
    return [
        SDModelItem(title=e.title, model_name=e.name, filename=e.filename)
        for e in state_of(request).catalog.entries
    ]


@router.post("/refresh-checkpoints")
async def refresh_checkpoints(request: Request) -> None:
    """Read the models folder again."""
    state_of(request).catalog.refresh()


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    """The options this server has: ``sd_model_checkpoint``, ``CLIP_stop_at_last_layers``."""
    host = state_of(request).host
    return {
        "sd_model_checkpoint": host.current_name,
        "sd_checkpoint_hash": None,
        "CLIP_stop_at_last_layers": host.clip_skip or 1,
    }


@router.post("/options")
async def set_options(request: Request, options: dict[str, Any] = Body(...)) -> bool:
    """Set options. ``sd_model_checkpoint`` switches the model: the switch is queued
    behind the running jobs and answered when the model is loaded."""
    s = state_of(request)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)}; this server knows {', '.join(OPTIONS)}"
        )
    clip = options.get("CLIP_stop_at_last_layers")
    clip_skip = None if clip is None else clip_skip_of(clip)
    name = options.get("sd_model_checkpoint")
    if name is not None:
        entry = s.catalog.get(
            str(name), "sd_model_checkpoint"
        )  # an unknown name is refused before queueing

        def switch(job: Job) -> None:
            s.host.select(entry.name)
            s.host.use()

        await s.run("switch model", switch)
    if clip_skip is not None:
        s.host.clip_skip = clip_skip
    return True


@router.post("/png-info", response_model=PNGInfoResponse)
async def png_info(body: PNGInfoRequest, request: Request) -> PNGInfoResponse:
    """The text chunks of a PNG; ``info``: its ``parameters``, parsed in ``parameters``."""
    c = state_of(request).config
    im = await run_in_threadpool(
        decode_image, body.image, "image", max_bytes=c.max_image_bytes, max_pixels=c.max_pixels
    )
    items = {k: v for k, v in im.info.items() if isinstance(k, str) and isinstance(v, str)}
    info = items.pop("parameters", "")
    return PNGInfoResponse(
        info=info, items=items, parameters=parse_parameters(info) if info else {}
    )


@router.get("/loras", response_model=list[LoraItem])
async def loras(request: Request) -> list[LoraItem]:
    """The LoRAs ``<lora:NAME:W>`` finds: the LoRA folder's and the shipped ones."""
    files = PipelineLoRAs(state_of(request).config.lora_dir).available()
    return [LoraItem(name=n, alias=n, path=p.name) for n, p in sorted(files.items())]


@router.get("/embeddings", response_model=EmbeddingsResponse)
async def embeddings(request: Request) -> EmbeddingsResponse:
    """The textual-inversion embeddings the current model knows (read on the worker)."""
    s = state_of(request)

    def listing(job: Job) -> EmbeddingsResponse:
        pipe = s.host.use()
        ti = getattr(pipe.model, "textual_inversion", None)
        loaded: dict[str, EmbeddingItem] = {}
        for name in ti.names if ti is not None else []:
            e = ti.get(name)
            if e is not None:
                loaded[name] = EmbeddingItem(shape=e.width, vectors=e.count)
        return EmbeddingsResponse(loaded=loaded, skipped={})

    return await s.run("embeddings", listing)


@router.get("/scripts", response_model=ScriptsList)
async def scripts() -> ScriptsList:
    """No scripts (ControlNet, when it comes, is an ``alwayson_scripts`` entry)."""
    return ScriptsList(txt2img=[], img2img=[])


__all__ = ["router"]
