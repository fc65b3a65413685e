"""Whether this CPU runs bfloat16 natively: read from the CPU's flags, never assumed.

bf16 matrix products are fast on a CPU only with bf16 dot-product instructions: x86's
AVX512_BF16 (Intel Cooper Lake / Sapphire Rapids, AMD Zen 4 and later) or AMX_BF16 (Intel
Sapphire Rapids), Arm's BF16 extension (``bf16`` in ``/proc/cpuinfo``'s ``Features``). Without
them oneDNN and PyTorch emulate bf16 through float32 (convert, multiply, round back), which is
slower than float32 itself. :func:`bf16_missing` says what the CPU lacks, for the one-line
warning of ``noisecraft.load(dtype="bf16")`` on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: x86 flags (``/proc/cpuinfo``) with bf16 dot products; either one is enough.
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``) from ``/proc/cpuinfo`` text
    (read from the file when None); None when it cannot be read or lists none."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def bf16_missing(flags: set[str] | None = None, capability: str | None = None) -> str | None:
    """None when this CPU has bf16 dot-product instructions, else a phrase naming what it lacks.

    ``flags``: :func:`cpu_flags` (read when None); ``capability``: PyTorch's vector ISA,
    ``torch.backends.cpu.get_cpu_capability()`` (e.g. ``"AVX512"``, ``"AVX2"``), named in the
    phrase.
    """
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    if flags is None:
        flags = cpu_flags()
    if flags is None:
        return f"its bf16 support could not be read (no CPU flags in {CPUINFO})"
    if flags & set(X86_BF16_FLAGS) or "bf16" in flags:
        return None
    if "fpu" in flags or "sse2" in flags:  # x86
        return f"this CPU (PyTorch capability {capability}) has neither avx512_bf16 nor amx_bf16"
    return f"this CPU (PyTorch capability {capability}) lacks the bf16 extension"


__all__ = ["CPUINFO", "X86_BF16_FLAGS", "bf16_missing", "cpu_flags"]
