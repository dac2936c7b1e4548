"""What a benchmark ran on: CPU, cores, load, library versions, and the process's memory high-water mark.

Numbers from a shared or busy machine mislead, so the report carries the load average at start and
the cores this process may use (a container or ``taskset`` often allows fewer than the host has).
"""

from __future__ import annotations

import importlib
import os
import platform
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "onnxruntime", "onnx", "transformers", "numpy")


@dataclass
class MachineInfo:
    cpu: str
    logical_cores: int | None
    usable_cores: int | None
    platform: str
    python: str
    load_average: tuple[float, float, float] | None
    torch_threads: int
    gpus: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def one_line(self) -> str:
        load = "n/a" if self.load_average is None else ", ".join(f"{x:.2f}" for x in self.load_average)
        gpus = f"; GPUs: {', '.join(self.gpus)}" if self.gpus else ""
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        return (f"{self.cpu}, {self.usable_cores} usable of {self.logical_cores} logical cores, {self.platform}, "
                f"Python {self.python}; load average at start {load}; torch threads {self.torch_threads}{gpus}; "
                f"{versions}")


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    from radtrt import __version__

    versions = {"radtrt": __version__}
    for name in names:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "unknown")
        except ImportError:
            versions[name] = "not installed"
    return versions


def machine_info() -> MachineInfo:
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return MachineInfo(cpu=cpu_model(), logical_cores=os.cpu_count(), usable_cores=usable,
                       platform=platform.platform(), python=platform.python_version(),
                       load_average=load, torch_threads=torch.get_num_threads(), gpus=gpus,  # type: ignore[arg-type]
                       versions=library_versions())


PEAK_WHILE_MEASURED = "while the backends loaded and ran"
PEAK_WHOLE_PROCESS = "whole process, including building the inputs and the bandwidth probe"
# The high-water mark restarts from what is resident, and the export that built a random model leaves its
# libraries loaded (the first tiny run read 507 MB, every later one, from the cache, 319 MB): said, not hidden.
PEAK_AFTER_BUILD = ("while the backends loaded and ran, on top of the libraries this run's random-model build "
                    "loaded (run the command again: from the cache it measures the backends alone)")


def reset_peak_rss() -> bool:
    """Restart this process's resident-memory high-water mark from what is resident now (Linux: "5" into
    ``/proc/self/clear_refs``), so a later ``peak_rss_mb`` is the peak of what ran in between, not of building a
    random model or of the bandwidth probe's 512 MiB matrix. False where the kernel offers no such reset (not
    Linux, or a container that refuses it): the peak is then the whole process's (``PEAK_WHOLE_PROCESS``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory (all backends together), in MiB: since the last
    ``reset_peak_rss`` on Linux (``VmHWM``), over the process's life elsewhere (``ru_maxrss``)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float:
    """Resident memory now, in MiB (psutil: every platform radtrt runs on)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def gpu_peak_memory_mb() -> float | None:
    """PyTorch's peak CUDA allocation in MiB, or None without CUDA (ONNX Runtime's arena is not counted)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / (1 << 20)
