"""The endpoints that generate and control generation: txt2img, img2img, progress,
interrupt, skip (AUTOMATIC1111's ``/sdapi/v1`` shapes)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from noisecraft.server.a1111 import img2img_plan, txt2img_plan
from noisecraft.server.images import encode_image
from noisecraft.server.schemas import (
    GenerationResponse,
    ImageToImageRequest,
    ProgressResponse,
    ProgressState,
    TextToImageRequest,
)
from noisecraft.server.state import ServerState

router = APIRouter(prefix="/sdapi/v1", tags=["generation"])


def state_of(request: Request) -> ServerState:
    return request.app.state.noisecraft


@router.post("/txt2img", response_model=GenerationResponse)
async def txt2img(body: TextToImageRequest, request: Request) -> GenerationResponse:
    """Text to image. Fields left out take the model's defaults (docs/server.md)."""
    s = state_of(request)
    plan = txt2img_plan(body, s.config, s.host.clip_skip)
    return await s.generate(plan)


@router.post("/img2img", response_model=GenerationResponse)
async def img2img(body: ImageToImageRequest, request: Request) -> GenerationResponse:
    """Image to image and inpainting (``mask``: white = repaint)."""
    s = state_of(request)
    plan = await run_in_threadpool(img2img_plan, body, s.config, s.host.clip_skip)
    return await s.generate(plan)


@router.get("/progress", response_model=ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False) -> ProgressResponse:
    """The running job's progress (0..1 over all its batches), its estimated seconds left
    and a cheap preview of the current x0 estimate (base64 PNG)."""
    s = state_of(request)
    job = s.jobs.current
    if job is None:
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState())
    per_batch = job.total // max(1, job.batch_count) if job.total else 0
    image = None
    latest, preview = job.latest, job.preview_fn
    if not skip_current_image and latest is not None and preview is not None:
        image = encode_image(await run_in_threadpool(preview, latest))
    return ProgressResponse(
        progress=job.progress,
        eta_relative=job.eta_relative(),
        state=ProgressState(
            skipped=job.skipped,
            interrupted=job.interrupted,
            job=job.name,
            job_count=s.jobs.waiting + 1,
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            job_no=job.batch_no,
            sampling_step=job.step - job.batch_no * per_batch if per_batch else job.step,
            sampling_steps=per_batch,
        ),
        current_image=image,
    )


@router.post("/interrupt")
async def interrupt(request: Request) -> dict:
    """Stop the running job at its next sampler step; it answers the images it finished."""
    state_of(request).jobs.interrupt()
    return {}


@router.post("/skip")
async def skip(request: Request) -> dict:
    """Drop the batch being sampled; the job goes on with its next batch."""
    state_of(request).jobs.skip()
    return {}


__all__ = ["router"]
