"""The models that ship inside the package, by name (kept in :mod:`noisecraft.io.shipped`,
where training recipes can name them too)."""

from noisecraft.io.shipped import (
    ASSETS,
    DEFAULT_MODEL,
    SHIPPED_MODELS,
    SHIPPED_TINY_DECODERS,
    is_shipped,
    resolve_model,
    shipped_tiny_decoder,
)

__all__ = [
    "ASSETS",
    "DEFAULT_MODEL",
    "SHIPPED_MODELS",
    "SHIPPED_TINY_DECODERS",
    "is_shipped",
    "resolve_model",
    "shipped_tiny_decoder",
]
