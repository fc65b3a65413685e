"""Valid ranges of the numbers in a training recipe, checked in one place.

Each frozen config dataclass of :mod:`noisecraft.training.config` lists its numeric fields
with a :class:`Int` or :class:`Float` range and calls :func:`check_numbers` from its
``__post_init__``, so a value out of range is refused however the config is made (TOML,
``--set``, ``dataclasses.replace``, the Python API), before anything is built or written.
Every float must be finite: ``nan`` and ``inf`` are TOML literals, and ``train.lr = nan``
would otherwise train a model of NaNs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from noisecraft.errors import ConfigError


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Int:
    """An integer in ``lo..hi`` (``hi`` None: no upper bound)."""

    lo: int
    hi: int | None = None

    def problem(self, v: Any) -> str | None:
        if not _is_int(v):
            return "must be an integer"
        if v < self.lo or (self.hi is not None and v > self.hi):
            return f"must be {self._text()}"
        return None

    def _text(self) -> str:
        if self.hi is None:
            return f"at least {self.lo}"
        return f"an integer in {self.lo}..{self.hi}"


@dataclass(frozen=True)
class Float:
    """A finite number in ``[lo, hi]``; ``lo_open`` / ``hi_open`` exclude the bound."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def problem(self, v: Any) -> str | None:
        if not _is_number(v):
            return "must be a number"
        if not math.isfinite(v):
            return "must be a finite number"
        low_bad = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        high_bad = self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
        if low_bad or high_bad:
            return f"must be {self._text()}"
        return None

    def _text(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{_num(self.lo)}, {_num(self.hi)}{right}"


def _num(x: float | None) -> str:
    return f"{x:g}"


def check_numbers(config: Any, section: str, **ranges: Int | Float) -> None:
    """Raise :class:`ConfigError` naming ``section.field`` for the first field of ``config``
    outside its range."""
    for name, rule in ranges.items():
        value = getattr(config, name)
        problem = rule.problem(value)
        if problem:
            raise ConfigError(f"{section}.{name} {problem}, got {value!r}")


def check_choice(config: Any, section: str, name: str, choices: Iterable[str]) -> None:
    """Raise :class:`ConfigError` when ``config.name`` is not one of ``choices``."""
    choices = tuple(choices)
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(f"{section}.{name} must be one of: {', '.join(choices)}; got {value!r}")


def non_finite(value: Any, where: str) -> None:
    """Refuse a ``nan`` / ``inf`` anywhere in a (nested) TOML value: ``where`` names it."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            non_finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for v in value:
            non_finite(v, where)


__all__ = ["Float", "Int", "check_choice", "check_numbers", "non_finite"]
