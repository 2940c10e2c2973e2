"""What a run or a benchmark ran on (floats repeat bit for bit on the same CPU type only, so results record it)."""

from __future__ import annotations

import os
import platform


def _cpuinfo(field: str) -> str:
    """The value of /proc/cpuinfo's first `field` line, or "" where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith(field)), "")
    except OSError:
        return ""


def machine_info() -> dict:
    import torch

    cpu, flags = _cpuinfo("model name"), _cpuinfo("flags")
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "amx": "amx_bf16" in flags,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
