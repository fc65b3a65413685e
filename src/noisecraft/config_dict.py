"""Frozen dataclass configs <-> the plain JSON dicts stored in checkpoint metadata."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from noisecraft.errors import ConfigError, closest

T = TypeVar("T")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a dataclass config (tuples become lists)."""
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_from_dict(cls: type[T], d: Mapping[str, Any], what: str) -> T:
    """``cls(**d)``; unknown keys raise :class:`ConfigError` naming them and the closest known.

    ``what`` names the config in the message ("U-Net", "VAE", ...).
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        hints = []
        for key in unknown:
            guess = closest(key, known)
            hints.append(f"'{key}'" + (f" (did you mean '{guess}'?)" if guess else ""))
        raise ConfigError(
            f"unknown {what} config key(s) {', '.join(hints)}; "
            f"known keys: {', '.join(sorted(known))}"
        )
    return cls(**d)
