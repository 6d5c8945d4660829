"""Facts about this machine and process that runs and benchmarks report."""

from __future__ import annotations

import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any


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


def git_commit(start: Path | None = None) -> str | None:
    """The checked-out commit of the source tree, read from .git (no git process needed)."""
    here = (start or Path(__file__)).resolve()
    for directory in [here, *here.parents]:
        dot_git = directory / ".git"
        if dot_git.is_file():  # a worktree: "gitdir: <path>"
            text = dot_git.read_text().strip()
            dot_git = Path(text.split(":", 1)[1].strip()) if text.startswith("gitdir:") else dot_git
        if not dot_git.is_dir():
            continue
        try:
            head = (dot_git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head
            ref = head.split(":", 1)[1].strip()
            common = dot_git / "commondir"
            roots = [dot_git] + ([(dot_git / common.read_text().strip()).resolve()] if common.exists() else [])
            for root in roots:
                if (root / ref).exists():
                    return (root / ref).read_text().strip()
                packed = root / "packed-refs"
                if packed.exists():
                    for line in packed.read_text().splitlines():
                        if line.endswith(" " + ref):
                            return line.split()[0]
        except OSError:
            return None
    return None


def provenance(command: str = "") -> dict[str, Any]:
    """What a provenance file records about a run: when, how, which code, which machine."""
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or " ".join(sys.argv),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "os": {"system": platform.system(), "release": platform.release(), "version": platform.version()},
    }
