"""Facts about this machine and process that runs and benchmarks report."""

from __future__ import annotations

import platform
import resource
import sys


def peak_rss_bytes() -> int:
    """The process's peak resident set size.

    On Linux this is VmHWM of /proc/self/status: ru_maxrss survives exec, so a child of a
    big process would report its parent's peak. Elsewhere ru_maxrss (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def machine_info() -> dict[str, object]:
    """Machine, OS, Python and library versions, for provenance files."""
    import importlib.metadata
    import os

    import psutil

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "python": sys.version.split()[0],
        "versions": {name: version(name) for name in ("mlx", "mlx-lm", "numpy", "outlier-runtime", "safetensors")},
    }
