"""Helpers shared by the test modules (import as ``from helpers import jitter``)."""

from __future__ import annotations

import torch


def jitter(
    module: torch.nn.Module, seed: int = 0, std: float = 0.05, *, freeze: bool = True
) -> torch.nn.Module:
    """Add ``std``-scaled Gaussian noise to every parameter (seeded), so zero-initialised
    layers (output convs, biases) take part and swapped or miswired weights show in outputs.
    ``freeze``: return the module in eval mode without gradients (parity tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval().requires_grad_(False) if freeze else module
