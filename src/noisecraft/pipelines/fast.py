"""Fast mode: opt-in speed-ups of sampling, each with a measured quality cost (docs/performance.md).

* :class:`FastMode` -- what ``GenerateRequest(fast=...)`` turns on inside :func:`generate`:
  DeepCache feature caching (:mod:`noisecraft.pipelines.deepcache`; Ma et al. 2023), plus the
  sampler / step count that :meth:`FastMode.request` and the CLI's ``--fast`` use when none
  is given: DPM++ 2M with Karras sigmas, 10 steps -- the fewest steps whose FID on the
  shipped class model stays within the 20-step reference (docs/samplers.md: 0.51 at 10 NFE
  against 0.97 for the default DPM++ 2M 20 steps and 0.48 for DPM++ 2M Karras 20 steps).
* int8 weights (:func:`noisecraft.nn.quantize.quantize_int8`, dynamic int8 quantisation of
  the Linear layers): a model transform, not a request option; ``LatentDiffusion.int8()``
  applies it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from noisecraft.errors import ConfigError
from noisecraft.pipelines.deepcache import DeepCacheConfig

#: The fast-mode sampler and steps (see the module docstring for the source of the choice).
FAST_SAMPLER = "dpmpp_2m"
FAST_SPACING = "karras"
FAST_STEPS = 10


@dataclass(frozen=True)
class FastMode:
    """Fast-mode settings. ``deepcache``: None = off; ``sampler`` / ``spacing`` / ``steps``:
    the defaults :meth:`request` (and ``noisecraft generate --fast``) fill in."""

    deepcache: DeepCacheConfig | None = DeepCacheConfig(interval=2, branch=2)
    sampler: str = FAST_SAMPLER
    spacing: str | None = FAST_SPACING
    steps: int = FAST_STEPS

    def request(self, **fields: Any) -> Any:
        """A ``GenerateRequest`` in fast mode: ``fields`` as given, and this mode's sampler,
        spacing and steps where ``fields`` names none (a sampler given without spacing keeps
        that sampler's own spacing)."""
        from noisecraft.pipelines.generate import GenerateRequest

        if "sampler" not in fields:
            fields.setdefault("spacing", self.spacing)
        fields.setdefault("sampler", self.sampler)
        fields.setdefault("steps", self.steps)
        return GenerateRequest(fast=self, **fields)


#: The fast-mode default: DeepCache N = 2, branch 2 (branch 1 costs the class model's FID:
#: 29 against 0.79; docs/performance.md); DPM++ 2M Karras, 10 steps.
FAST = FastMode()


def as_fast_mode(value: FastMode | bool | None) -> FastMode | None:
    """``True`` = :data:`FAST`, ``False`` / None = off, a :class:`FastMode` as is."""
    if value is None or value is False:
        return None
    if value is True:
        return FAST
    if isinstance(value, FastMode):
        return value
    raise ConfigError(f"fast must be true, false or a FastMode, got {value!r}")


__all__ = ["FAST", "FastMode", "as_fast_mode"]
