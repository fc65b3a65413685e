"""noisecraft: diffusion models from the math.

>>> import noisecraft
>>> pipe = noisecraft.load("mnist-text")              # doctest: +SKIP
>>> pipe("a handwritten 7", seed=1).images[0]        # doctest: +SKIP

``load``, ``Pipeline``, ``GenerationResult``, ``LoadOptions``, ``Observer`` and ``Control`` (a
ControlNet unit of a call) come from
:mod:`noisecraft.api`, imported on first use (``import noisecraft`` stays light).
"""

from __future__ import annotations

from typing import Any

from noisecraft._version import __version__

_API = ("Control", "GenerationResult", "LoadOptions", "Observer", "Pipeline", "load")


def __getattr__(name: str) -> Any:
    if name in _API:
        from noisecraft import api

        return getattr(api, name)
    raise AttributeError(f"module 'noisecraft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
