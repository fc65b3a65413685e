"""What the worker does for one generation request: engine calls, saving, interrupt / skip.

A request of ``n_iter`` x ``batch_size`` images is ``n_iter`` engine calls of
``batch_size`` images (call ``it`` starting at seed ``seed + it * batch_size``: the images
equal those of one call of all of them, since each image draws from its own seed). Each
image is saved in the outputs folder as soon as its call ends.

Interrupt (POST /interrupt) stops sampling at the next step: the images of the calls that
finished are answered (and were saved); the call being sampled is dropped, and so are the
calls after it. Skip (POST /skip) drops the call being sampled and goes on with the next.
A1111 instead decodes the half-sampled latents of the interrupted call; noisecraft answers
only finished images, each of which equals the image its parameters make again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from noisecraft.api import Pipeline
from noisecraft.server.a1111 import Plan
from noisecraft.server.host import ModelHost
from noisecraft.server.jobs import Interrupted, Job, Skipped
from noisecraft.server.outputs import OutputFolder


@dataclass
class Outcome:
    """The images a request made, with their infotexts, seeds and saved files."""

    images: list[Image.Image] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    model: str = ""
    interrupted: bool = False
    skipped: int = 0


def preview_of(pipe: Pipeline) -> Any:
    """The job's preview function: an x0 estimate -> a small PIL image (the tiny decoder
    when the model has one, else the linear latent -> RGB map)."""
    mode = "tiny" if pipe.model_has_tiny_decoder else "cheap"
    return lambda denoised: pipe.preview(denoised, mode)


def run_plan(job: Job, plan: Plan, host: ModelHost, outputs: OutputFolder) -> Outcome:
    """Run ``plan`` on the worker (module docstring)."""
    if plan.model is not None and not plan.restore_model:
        host.select(plan.model)  # the request's model stays, as A1111 does
    # with restore (A1111's default) the selected model stays what it was: the next job
    # runs on it again (loading it back then)
    return _run(job, plan, host.use(plan.model), outputs)


def _run(job: Job, plan: Plan, pipe: Pipeline, outputs: OutputFolder) -> Outcome:
    out = Outcome(model=pipe.name)
    job.preview_fn = preview_of(pipe)
    job.batch_count = plan.n_iter
    job.total = 0
    for it in range(plan.n_iter):
        job.batch_no = it

        def on_step(d: dict, it: int = it) -> None:
            if not job.total:
                job.total = int(d["total"]) * plan.n_iter
            job.on_step(d, it * int(d["total"]))

        try:
            job.check()
            result = pipe(n=plan.batch_size, seed=plan.seeds(it), callback=on_step, **plan.settings)
        except Skipped:
            out.skipped += 1
            continue
        except Interrupted:
            out.interrupted = True
            break
        for image, text, seed in zip(result.images, result.infotexts, result.seeds, strict=True):
            out.paths.append(outputs.save(image, text, seed))
            out.images.append(image)
            out.infotexts.append(text)
            out.seeds.append(seed)
    return out


__all__ = ["Outcome", "preview_of", "run_plan"]
