"""Whether bf16 autocast can pay off on the machine a model trains on.

x86 CPUs run bf16 matrix products natively only with AVX512-BF16 or AMX; without them
autocast emulates bf16 and turns the speed-up into a slow-down (a SASRec training step,
64 users x 200 items, on an AVX2-only AMD EPYC: 15.1 s under bf16 autocast, 1.9 s in fp32).
"""
from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def bf16_autocast_warning(device_type: str, native: bool | None = None) -> str | None:
    """The warning for bf16 autocast on `device_type`, or None when it runs natively there
    (`native` overrides the detection of this CPU)."""
    if device_type != "cpu":
        return None
    if native is None:
        native = cpu_has_native_bf16()
    if native:
        return None
    return (f"--bf16-autocast on a CPU without AVX512-BF16 or AMX (torch capability "
            f"{torch.backends.cpu.get_cpu_capability()}): bf16 is emulated here and training runs several "
            "times slower than in fp32 (8x for a SASRec step on an AVX2 EPYC); drop the flag on this machine")
