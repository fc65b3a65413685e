"""A request's sampler choice, parsed once: the record, the schedule, the discard rule.

:func:`parse_sampler` turns a sampler spelling plus an optional schedule into a frozen
:class:`SamplerSpec`; the generate core, the diffusers translation and the PNG infotext all
read that one object. The grid rule is AUTOMATIC1111's "Schedule type: Automatic":

- an explicit schedule (a name's trailing "Karras" / "Exponential", or the ``schedule``
  argument: a request's ``spacing``, an infotext's ``Schedule type``) wins;
- otherwise the record's ``default_schedule`` (karras for DPM++ 2M, exponential for
  DPM++ 2M SDE / 3M SDE, linspace for A1111's "model default" samplers);
- and where the record says so (DPM2, DPM2 a, DPM++ 3M SDE) the grid is built for
  ``steps + 1`` and its second-to-last sigma dropped, whatever the schedule (A1111's
  ``discard_next_to_last_sigma``), so the last step goes to 0 from a larger sigma.

When a diffusers scheduler config governs (imported SD models), only the explicit schedule
counts and the config decides the rest (:mod:`noisecraft.pipelines.diffusers_schedulers`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from noisecraft.diffusion.schedule import NoiseSchedule
from noisecraft.diffusion.sigmas import SPACINGS, make_sigmas
from noisecraft.errors import unknown_name
from noisecraft.samplers.registry import SamplerRecord, lookup

#: sigma spacing -> AUTOMATIC1111's ``Schedule type`` label. "Uniform" is A1111's label of
#: the model's own grid, noisecraft's linspace; Leading / Trailing / LCM are noisecraft's
#: labels of diffusers' spacings (A1111 has none).
SCHEDULE_LABELS = {
    "linspace": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "leading": "Leading",
    "trailing": "Trailing",
    "lcm": "LCM",
}

#: Words accepted for a schedule (lower case) -> spacing; None is "Automatic".
_SCHEDULE_WORDS: dict[str, str | None] = {
    **{s: s for s in SPACINGS},
    **{label.lower(): s for s, label in SCHEDULE_LABELS.items()},
    "automatic": None,
}


def schedule_from_text(text: str | None) -> str | None:
    """The spacing a schedule word names ("karras", "Uniform", "linspace", ...); None for
    None, "" and "Automatic"."""
    if text is None or not text.strip():
        return None
    key = text.strip().lower()
    if key not in _SCHEDULE_WORDS:
        raise unknown_name("schedule type", text, (*SPACINGS, *SCHEDULE_LABELS.values()))
    return _SCHEDULE_WORDS[key]


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler choice, resolved.

    * ``record``: the sampler (:class:`~noisecraft.samplers.registry.SamplerRecord`).
    * ``explicit_schedule``: the spacing asked for, or None ("Automatic").
    * ``automatic_schedule``: the grid "Automatic" means when no diffusers config governs
      (the record's A1111 default; "linspace" for PNGs of earlier noisecraft versions).
    * ``discard_penultimate_sigma``: drop the grid's second-to-last sigma (module docstring).
    """

    record: SamplerRecord
    explicit_schedule: str | None
    automatic_schedule: str
    discard_penultimate_sigma: bool

    def __post_init__(self) -> None:
        for value in (self.explicit_schedule, self.automatic_schedule):
            if value is not None and value not in SPACINGS:
                raise unknown_name("sigma spacing", value, SPACINGS)

    @property
    def name(self) -> str:
        """The canonical sampler name."""
        return self.record.name

    @property
    def function(self) -> Callable:
        """The sampler function."""
        return self.record.function

    @property
    def stochastic(self) -> bool:
        return self.record.stochastic

    @property
    def schedule(self) -> str:
        """The spacing of the grid noisecraft's own rules build."""
        return self.explicit_schedule or self.automatic_schedule

    def with_schedule(self, schedule: str | None) -> SamplerSpec:
        """This spec with ``schedule`` (any word :func:`schedule_from_text` takes) as the
        explicit schedule; None or "Automatic" keeps it as it is."""
        spacing = schedule_from_text(schedule)
        return self if spacing is None else replace(self, explicit_schedule=spacing)

    def sigmas(
        self, schedule: NoiseSchedule, steps: int, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """The ``steps + 1`` decreasing sigmas (ending in 0) this choice samples on."""
        if not self.discard_penultimate_sigma:
            return make_sigmas(schedule, steps, self.schedule, dtype=dtype)
        sigmas = make_sigmas(schedule, steps + 1, self.schedule, dtype=dtype)
        return torch.cat([sigmas[:-2], sigmas[-1:]])

    def infotext(self, diffusers: bool = False) -> tuple[str, str | None]:
        """(``Sampler``, ``Schedule type`` or None) for an A1111 infotext.

        As A1111 writes it: the resolved schedule's label whenever the grid is not the
        model default (DPM++ 2M -> "Karras"; linspace for a sampler whose default is not
        linspace -> "Uniform"), nothing for the model default. ``diffusers``: a diffusers
        config chose the grid; then only an explicit schedule is written.
        """
        if diffusers:
            spacing = self.explicit_schedule
        else:
            spacing = self.schedule
            if spacing == "linspace" and self.record.default_schedule == "linspace":
                spacing = None
        return self.record.display, None if spacing is None else SCHEDULE_LABELS[spacing]

    def discard_note(self, diffusers: bool = False) -> bool | None:
        """``Discard penultimate sigma`` for an infotext: the rule in use where it differs
        from the record's A1111 default (A1111 writes "True" when its setting forces it on),
        else None (nothing to write)."""
        if diffusers or self.discard_penultimate_sigma == self.record.discard_penultimate_sigma:
            return None
        return self.discard_penultimate_sigma

    def __str__(self) -> str:
        label = SCHEDULE_LABELS.get(self.explicit_schedule or "")
        return self.record.display + (f" {label}" if label else "")


def parse_sampler(
    name: str, schedule: str | None = None, *, discard_penultimate_sigma: bool | None = None
) -> SamplerSpec:
    """Parse a sampler choice once.

    ``name``: any spelling (canonical, A1111's "DPM++ 2M" / "DPM++ 2M Karras" /
    "k_dpmpp_2m", ComfyUI's); ``schedule``: a spacing or ``Schedule type`` label, which wins
    over the name's trailing word (None / "Automatic": the name's word or the record's
    default); ``discard_penultimate_sigma``: None = the record's rule.
    """
    record, suffix = lookup(name)
    explicit = schedule_from_text(schedule) or suffix
    discard = record.discard_penultimate_sigma
    if discard_penultimate_sigma is not None:
        discard = bool(discard_penultimate_sigma)
    return SamplerSpec(record, explicit, record.default_schedule, discard)


def as_spec(sampler: str | SamplerSpec, schedule: str | None = None) -> SamplerSpec:
    """``sampler`` as a spec: parsed if it is a name, with ``schedule`` as its explicit
    schedule when given."""
    if isinstance(sampler, SamplerSpec):
        return sampler.with_schedule(schedule)
    return parse_sampler(sampler, schedule)


__all__ = [
    "SCHEDULE_LABELS",
    "SamplerSpec",
    "as_spec",
    "parse_sampler",
    "schedule_from_text",
]
