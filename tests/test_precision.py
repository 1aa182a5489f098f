"""The bf16-autocast warning: only for CPUs that would emulate bf16."""
from __future__ import annotations

from slmrec.precision import bf16_autocast_warning, cpu_has_native_bf16


def test_warns_only_on_cpus_without_native_bf16():
    message = bf16_autocast_warning("cpu", native=False)
    assert message is not None and "drop the flag" in message and "AVX512-BF16 or AMX" in message
    assert bf16_autocast_warning("cpu", native=True) is None
    assert bf16_autocast_warning("cuda", native=False) is None
    # Detection on this machine agrees with the override path.
    assert (bf16_autocast_warning("cpu") is None) == cpu_has_native_bf16()
