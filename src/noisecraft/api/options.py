"""How to load a model: the options of :func:`noisecraft.load`, checked once.

The options themselves are described in :mod:`noisecraft.api.loading`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from noisecraft.api.loras import lora_spec
from noisecraft.errors import ConfigError, unknown_name
from noisecraft.pipelines.lowmem import WEIGHT_FORMATS

#: ``dtype`` names -> torch dtypes
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model (module docstring); checked on creation."""

    device: str = "cpu"
    dtype: str = "fp32"
    low_memory: str | None = None
    fast: bool = False
    offload: bool = False
    compile: bool = False
    vae: str | os.PathLike | None = None
    tiny_decoder: str | os.PathLike | bool | None = None
    prediction: str | None = None
    arch: str | None = None
    threads: int = 0
    lora_dir: str | os.PathLike | None = None
    loras: tuple[tuple[Path, float], ...] = ()
    embedding_dir: str | os.PathLike | None = None
    lcm_unet: str | os.PathLike | None = None
    controlnet_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if isinstance(self.loras, (str, os.PathLike)):
            raise ConfigError(
                "@loras is a list of LoRA files (or (file, weight) pairs)", settings=["loras"]
            )
        object.__setattr__(self, "loras", tuple(lora_spec(item) for item in self.loras))
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise ConfigError(f"@lora_dir {self.lora_dir} is not a folder", settings=["lora_dir"])
        if self.dtype not in DTYPES:
            raise unknown_name("dtype", self.dtype, DTYPES, setting="dtype")
        if self.low_memory is not None:
            if self.low_memory not in WEIGHT_FORMATS:
                raise unknown_name(
                    "weight format", self.low_memory, WEIGHT_FORMATS, setting="low_memory"
                )
            if self.dtype != "fp32" or self.offload or self.device != "cpu":
                raise ConfigError(
                    "@low_memory runs on the CPU in fp32: leave out @dtype, @offload, @device",
                    settings=["low_memory", "dtype", "offload", "device"],
                )
        if self.compile and (self.fast or self.low_memory is not None or self.offload):
            raise ConfigError(
                "@compile does not mix with @fast, @low_memory or @offload (they run the "
                "U-Net's layers one by one, outside the compiled graph); drop one of them",
                settings=["compile", "fast", "low_memory", "offload"],
            )
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(
                f"@threads must be 0 (torch's default) or more, got {self.threads!r}",
                settings=["threads"],
            )
        _check_device(self.device)
        if self.lcm_unet is not None:
            if not os.path.isfile(self.lcm_unet):
                raise ConfigError(
                    f"@lcm_unet {self.lcm_unet} is not a file; give the unet_fp16.safetensors "
                    "an lcm_distill run wrote",
                    settings=["lcm_unet"],
                )
            if self.low_memory is not None:
                raise ConfigError(
                    "@lcm_unet replaces the U-Net at full precision; load without @low_memory "
                    "(the student needs only 4 steps)",
                    settings=["lcm_unet", "low_memory"],
                )
        if self.controlnet_dir is not None and not os.path.isdir(self.controlnet_dir):
            raise ConfigError(
                f"@controlnet_dir {self.controlnet_dir} is not a folder; give the folder that "
                "holds the ControlNet files",
                settings=["controlnet_dir"],
            )
        if self.embedding_dir is not None and not os.path.isdir(self.embedding_dir):
            raise ConfigError(
                f"@embedding_dir {self.embedding_dir} is not a folder; give the folder that "
                "holds the embedding files",
                settings=["embedding_dir"],
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"@device must be cpu or cuda (or cuda:N), got {device!r}", settings=["device"]
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"@device {device}: this machine has no CUDA GPU; use cpu", settings=["device"]
        )
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"@device must be cpu or cuda, got {device!r}", settings=["device"])


__all__ = ["DTYPES", "LoadOptions"]
