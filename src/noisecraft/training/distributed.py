"""Multi-process training with ``torchrun`` (DDP): gloo on CPU, nccl on CUDA.

``torchrun --nproc_per_node N -m noisecraft.cli.main train CONFIG`` sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`setup` reads them. Each process
takes an equal slice of the same global batch, so an update under N
processes equals the single-process update on that global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> DistInfo:
    """Join the process group named by torchrun's environment variables (no-op when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_gather_cat(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (in rank order)."""
    if not info.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def any_true(flags: list[bool], info: DistInfo, device: torch.device) -> list[bool]:
    """Each flag OR-ed over every rank (one ``all_reduce``), so that all ranks take the same
    branch: stop after this step, or fail together when rank 0 could not write."""
    if not info.enabled:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    """Leave the process group once every rank is here: a rank that destroys its gloo group
    while another is still in a collective with it can make that one abort (seen once in CI
    as ``terminate called without an active exception``, SIGABRT in rank 1)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
