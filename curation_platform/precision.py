"""Which float precision a device computes natively: the teacher's training autocast follows it.

Emulated bf16 on a CPU without AVX512-BF16 or AMX is an order of magnitude slower than fp32 (11.6 s
against 0.87 s a demo training step on an AVX2 VM), so ``auto`` picks bf16 only where it is native.
Kept free of a top-level torch import so the command line starts fast.
"""

from __future__ import annotations

from typing import Any

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_precision() -> str:
    """``bf16`` where this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), else ``fp32``.

    torch's kernels must run at AVX512 (``torch.backends.cpu.get_cpu_capability()``; lower when the
    CPU lacks it or ``ATEN_CPU_CAPABILITY`` caps it), and since that string says ``AVX512`` for CPUs
    with and without AVX512-BF16, the finer probe comes from ``torch.cpu`` (absent on old torch: fp32).
    """
    import torch

    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return "fp32"
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return "bf16" if any(getattr(torch.cpu, probe, lambda: False)() for probe in probes) else "fp32"


def resolve_precision(precision: str) -> str:
    """``auto`` -> what this CPU does natively; ``bf16`` / ``fp32`` as asked."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return cpu_precision() if precision == "auto" else precision


def cpu_description() -> dict[str, Any]:
    """What the float results of a CPU run depend on, recorded next to them."""
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_precision() == "bf16",
            "torch": torch.__version__}
