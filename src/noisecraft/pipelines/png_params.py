"""Generation parameters in a PNG ``parameters`` text chunk, in AUTOMATIC1111's format.

What A1111's ``create_infotext`` writes (and its ``parse_generation_parameters`` reads)::

    a photo of a cat, sitting
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1234, \
Size: 512x512, Model: sd15, Denoising strength: 0.6, Version: noisecraft 0.1.0

Line 1.. the prompt (may span lines), then ``Negative prompt: ...`` when there is one, then
one line of ``key: value`` pairs joined by ``", "`` in A1111's order. A value that holds a
comma, a colon or a newline is written as a JSON string (A1111's ``quote``). Keys that
noisecraft adds: ``Guidance rescale`` (Lin et al. 2023's phi, as diffusers'
``guidance_rescale``) and ``Eta``. ``Sampler`` / ``Schedule type`` come from the request's
:class:`~noisecraft.samplers.SamplerSpec` (:func:`sampler_display`): A1111's display name,
and the label of the grid whenever it is not the model default (``Karras``,
``Exponential``, ``Uniform`` for linspace where the sampler's default is another grid;
``Leading`` / ``Trailing`` for diffusers' spacings). ``Discard penultimate sigma`` is
written, as A1111 does, where the rule differs from the sampler's own.

Parsing follows A1111: each prompt line is stripped, the last line holds the parameters
when it has at least three ``key: value`` pairs, older infotexts that put the schedule into
the sampler name ("DPM++ 2M Karras") are understood, and a missing ``Schedule type`` means
"Automatic" -- except in PNGs written by noisecraft (``Version: noisecraft ...``), where it
means the linspace grid without A1111's discard rule: what noisecraft 0.1.0 used for every
sampler before it followed A1111's per-sampler defaults, and what it still writes no
``Schedule type`` for (:func:`sampler_from_display`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from noisecraft._version import __version__
from noisecraft.errors import ConfigError, NoisecraftError
from noisecraft.samplers import SCHEDULE_LABELS, SamplerSpec, as_spec, parse_sampler
from noisecraft.samplers.spec import schedule_from_text

#: The ``Version`` prefix of infotexts noisecraft writes.
NOISECRAFT_VERSION_PREFIX = "noisecraft"

# A1111's infotext_utils.re_param_code: key, then a JSON string or anything up to a comma.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE = "Negative prompt:"

#: Keys of :func:`format_parameters` and the infotext labels they are written under.
_FIELDS = (
    ("steps", "Steps"),
    ("sampler", "Sampler"),
    ("schedule_type", "Schedule type"),
    ("cfg_scale", "CFG scale"),
    ("seed", "Seed"),
    ("size", "Size"),
    ("model", "Model"),
    ("denoising_strength", "Denoising strength"),
    ("clip_skip", "Clip skip"),
    ("guidance_rescale", "Guidance rescale"),
    ("eta", "Eta"),
    ("discard_penultimate_sigma", "Discard penultimate sigma"),
)
_TYPES: dict[str, type] = {
    "Steps": int,
    "CFG scale": float,
    "Seed": int,
    "Denoising strength": float,
    "Clip skip": int,
    "Guidance rescale": float,
    "Eta": float,
    "Discard penultimate sigma": bool,
}


def quote(value: Any) -> str:
    """A1111's ``quote``: a JSON string if the value holds ``,``, ``:`` or a newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """Inverse of :func:`quote` (A1111's ``unquote``)."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, str) else text


def sampler_display(
    sampler: str | SamplerSpec, spacing: str | None = None, *, diffusers: bool = False
) -> tuple[str, str | None]:
    """(A1111 sampler name, ``Schedule type`` or None) of a sampler choice
    (:meth:`SamplerSpec.infotext`; ``diffusers``: a diffusers scheduler config chose the
    grid, so only an explicit schedule is written).

    >>> sampler_display("dpmpp_2m_karras")
    ('DPM++ 2M', 'Karras')
    >>> sampler_display("dpmpp_2m")  # Automatic is Karras for DPM++ 2M, as in A1111
    ('DPM++ 2M', 'Karras')
    >>> sampler_display("Euler a")
    ('Euler a', None)
    """
    return as_spec(sampler, spacing).infotext(diffusers)


def sampler_from_display(
    sampler: str,
    schedule_type: str | None = None,
    *,
    version: str | None = None,
    discard: bool | None = None,
) -> SamplerSpec:
    """The sampler choice of an infotext's ``Sampler`` / ``Schedule type`` / ``Version`` /
    ``Discard penultimate sigma``.

    Accepts A1111's current form (``Sampler: DPM++ 2M, Schedule type: Karras``) and the older
    one with the schedule in the name (``Sampler: DPM++ 2M Karras``). Without a schedule
    (or with "Automatic") the sampler's A1111 default applies, except in an infotext written
    by noisecraft (``version`` "noisecraft ..."), where no schedule means linspace without
    the discard rule (module docstring), so that its PNGs replay to the same image. noisecraft
    before 0.2 never discarded a sigma, whatever the schedule.
    """
    try:
        explicit = schedule_from_text(schedule_type)
    except NoisecraftError:
        raise ConfigError(
            f"unknown Schedule type '{schedule_type}' in the PNG parameters; noisecraft "
            f"knows {', '.join(SCHEDULE_LABELS.values())} (and Automatic)"
        ) from None
    spec = parse_sampler(sampler, explicit, discard_penultimate_sigma=discard)
    words = (version or "").strip().lower().split()
    ours = bool(words) and words[0] == NOISECRAFT_VERSION_PREFIX
    before_0_2 = ours and len(words) > 1 and words[1].startswith("0.1")
    if ours and spec.explicit_schedule is None:
        spec = replace(spec, automatic_schedule="linspace")
    if (ours and spec.explicit_schedule is None) or before_0_2:
        spec = replace(spec, discard_penultimate_sigma=bool(discard))  # None: never discarded
    return spec


def format_parameters(
    prompt: str,
    negative_prompt: str = "",
    *,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    schedule_type: str | None = None,
    model: str | None = None,
    denoising_strength: float | None = None,
    clip_skip: int | None = None,
    guidance_rescale: float | None = None,
    eta: float | None = None,
    discard_penultimate_sigma: bool | None = None,
    extra: Mapping[str, Any] | None = None,
    version: str | None = f"noisecraft {__version__}",
) -> str:
    """The ``parameters`` text of one image, exactly as A1111's ``create_infotext`` lays it out.

    ``sampler`` / ``schedule_type`` are written as given (use :func:`sampler_display` for
    A1111's names, and :meth:`SamplerSpec.discard_note` for ``discard_penultimate_sigma``);
    ``None`` values are left out; ``clip_skip`` 1 and ``guidance_rescale`` 0 too (A1111 omits
    the defaults). ``extra`` adds more ``key: value`` pairs before ``Version``.
    """
    values: dict[str, Any] = {
        "Steps": int(steps),
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": float(cfg_scale),
        "Seed": int(seed),
        "Size": f"{int(width)}x{int(height)}",
        "Model": model,
        "Denoising strength": None if denoising_strength is None else float(denoising_strength),
        "Clip skip": None if clip_skip is None or clip_skip <= 1 else int(clip_skip),
        "Guidance rescale": None if not guidance_rescale else float(guidance_rescale),
        "Eta": None if eta is None else float(eta),
        "Discard penultimate sigma": (
            None if discard_penultimate_sigma is None else bool(discard_penultimate_sigma)
        ),
        **dict(extra or {}),
        "Version": version,
    }
    line = ", ".join(
        k if k == v else f"{k}: {quote(v)}" for k, v in values.items() if v is not None
    )
    negative = f"\n{NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_parameters(text: str) -> dict[str, Any]:
    """Read a ``parameters`` text (A1111's ``parse_generation_parameters``), typed.

    Returns ``prompt``, ``negative_prompt`` and, where present, ``steps``, ``sampler``,
    ``schedule_type``, ``cfg_scale``, ``seed``, ``width``, ``height``, ``model``,
    ``denoising_strength``, ``clip_skip``, ``guidance_rescale``, ``eta``,
    ``discard_penultimate_sigma``, ``version``, and
    ``extra``: every other pair as ``{label: string}``. A value that is not of its type
    raises a one-line :class:`ConfigError`.
    """
    if not isinstance(text, str):
        raise ConfigError("PNG parameters must be text")
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE):
            in_negative = True
            line = line[len(NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    raw: dict[str, str] = {}
    for key, value in _RE_PARAM.findall(last):
        raw[key] = unquote(value) if value[:1] == '"' and value[-1:] == '"' else value
    labels = {label: field for field, label in _FIELDS}
    extra: dict[str, str] = {}
    for key, value in raw.items():
        if key == "Size":
            m = _RE_SIZE.match(value.strip())
            if m is None:
                raise ConfigError(f"PNG parameters: Size '{value}' is not WIDTHxHEIGHT")
            out["width"], out["height"] = int(m[1]), int(m[2])
        elif key == "Version":
            out["version"] = value
        elif key in labels:
            out[labels[key]] = _typed(key, value)
        else:
            extra[key] = value
    out["extra"] = extra
    return out


def _typed(key: str, value: str) -> Any:
    kind = _TYPES.get(key)
    if kind is None:
        return value
    if kind is bool:
        word = value.strip().lower()
        if word not in ("true", "false"):
            raise ConfigError(f"PNG parameters: {key} '{value}' is not True or False")
        return word == "true"
    try:
        return kind(value.strip())
    except ValueError:
        name = "an integer" if kind is int else "a number"
        raise ConfigError(f"PNG parameters: {key} '{value}' is not {name}") from None


__all__ = [
    "format_parameters",
    "parse_parameters",
    "quote",
    "sampler_display",
    "sampler_from_display",
    "unquote",
]
