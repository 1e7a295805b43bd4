"""Which dtypes the project computes in, and whether this machine can run one.

Two modes (README, "Precision"): ``float32`` is the exact mode (served scores equal
a plain ``transformers`` forward to ~1e-5); ``bfloat16`` is the fast mode on
machines with bf16 units (``avx512_bf16`` or AMX on x86 CPUs, any recent GPU), whose
effect on pair decisions and ablation deltas was measured against float32. Nothing
else (float16, ``auto``) has been measured, so nothing else is offered. Pure Python,
no torch: the CLIs check before any engine starts, and the HTTP harness names
the server's dtype in its cache keys.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["DTYPES", "DtypeError", "check_dtype_runnable", "cpu_has_bf16_units", "normalize_dtype"]

DTYPES = ("float32", "bfloat16")

_ALIASES = {"fp32": "float32", "float": "float32", "f32": "float32",
            "bf16": "bfloat16", "fp16": "float16", "half": "float16", "f16": "float16"}


class DtypeError(ValueError):
    """A dtype this project does not offer, or this machine cannot run usefully."""


def normalize_dtype(value: str) -> str:
    """``"torch.bfloat16"``, ``"BF16"``, ``"bfloat16"`` -> ``"bfloat16"``; unknown names
    come back lower-cased without a ``torch.`` prefix (for the error message)."""
    name = str(value).strip().lower().removeprefix("torch.")
    return _ALIASES.get(name, name)


def cpu_has_bf16_units(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU has bf16 arithmetic (x86 ``avx512_bf16`` / ``amx_bf16``, Arm
    ``bf16``); None when ``/proc/cpuinfo`` cannot be read (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _gpu_visible() -> bool:
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is not None and devices.strip() in ("", "-1"):
        return False
    return shutil.which("nvidia-smi") is not None or shutil.which("rocm-smi") is not None


def check_dtype_runnable(value: str, *, cpuinfo: str | None = None, gpu: bool | None = None) -> str:
    """The normalized dtype, or :class:`DtypeError` saying why not and what to use.

    ``bfloat16`` is refused on a CPU-only machine without bf16 units: vLLM would
    emulate it, several times slower than float32 and no more exact.
    """
    dtype = normalize_dtype(value)
    if dtype not in DTYPES:
        raise DtypeError(
            f"dtype {value!r} is not offered: use float32 (exact, oracle-equal) or bfloat16 "
            "(fast where the hardware has bf16 units; its effect on BLiMP decisions is "
            "measured in the README's 'Precision' section)")
    if dtype == "bfloat16" and not (_gpu_visible() if gpu is None else gpu):
        units = cpu_has_bf16_units(cpuinfo)
        if units is False:
            raise DtypeError(
                "bfloat16 on this CPU: it has no bf16 units (no avx512_bf16, amx_bf16 or bf16 "
                "in /proc/cpuinfo), so bf16 would be emulated, slower than float32; use "
                "--dtype float32")
    return dtype
