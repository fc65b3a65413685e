"""What one server holds: its config, the model catalog and host, the job queue, the outputs
folder; and the one way a generation request runs (queue -> worker -> response)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from noisecraft.server.a1111 import Plan, info_json
from noisecraft.server.config import ServerConfig
from noisecraft.server.host import ModelHost
from noisecraft.server.images import encode_png_file
from noisecraft.server.jobs import Job, JobQueue
from noisecraft.server.models import ModelCatalog
from noisecraft.server.outputs import OutputFolder
from noisecraft.server.runner import run_plan
from noisecraft.server.schemas import GenerationResponse


@dataclass
class ServerState:
    config: ServerConfig
    catalog: ModelCatalog
    host: ModelHost
    jobs: JobQueue
    outputs: OutputFolder

    @classmethod
    def create(cls, config: ServerConfig) -> ServerState:
        catalog = ModelCatalog(config.models_dir)
        return cls(
            config=config,
            catalog=catalog,
            host=ModelHost(config, catalog),
            jobs=JobQueue(config.queue_size),
            outputs=OutputFolder(config.outputs_dir),
        )

    async def run(self, name: str, fn: Any) -> Any:
        """Queue ``fn(job)`` on the worker and wait for its result (429 when full)."""
        job = self.jobs.submit(name, fn)
        # shielded: a client that goes away does not cancel its job (its images are saved)
        return await asyncio.shield(asyncio.wrap_future(job.future))

    async def generate(self, plan: Plan) -> GenerationResponse:
        """Run a generation plan; the images are saved even if the client has gone."""

        def work(job: Job) -> Any:
            return run_plan(job, plan, self.host, self.outputs)

        outcome = await self.run(plan.kind, work)
        images = (
            [encode_png_file(p.read_bytes()) for p in outcome.paths] if plan.send_images else []
        )
        info = info_json(
            plan,
            outcome.infotexts,
            outcome.seeds,
            [self.outputs.relative(p) for p in outcome.paths],
            model=outcome.model,
            interrupted=outcome.interrupted,
            skipped=outcome.skipped,
        )
        return GenerationResponse(images=images, parameters=plan.echo, info=info)


__all__ = ["ServerState"]
