"""The machine and versions a benchmark ran on, for results files and ``slao info``."""

from __future__ import annotations

import platform

import torch


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform`` where that is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Device name and versions, for results files."""
    import triton

    from slao_kernels._ops import NATIVE_CPU
    from slao_kernels._version import __version__

    env = {"slao_kernels": __version__, "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "cpu": cpu_name(),
           "cpu_threads": torch.get_num_threads(), "native_cpu_kernels": NATIVE_CPU}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env
