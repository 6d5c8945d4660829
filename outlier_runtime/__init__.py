"""outlier-runtime: local language-model tiers on MLX, with a paged, exact MoE engine.

The public API::

    import outlier_runtime
    rt = outlier_runtime.load("plus", cache_gb=4, model="/path/to/model")
    result = rt.generate("def fibonacci(n):")
    print(result.text, result.engine)
"""

from __future__ import annotations

from typing import Any

from outlier_runtime.core.errors import (
    AdmissionError,
    CheckpointError,
    ExactnessError,
    ExpertReadError,
    ManifestError,
    ModelNotFoundError,
    OutlierError,
    PluginError,
    RuntimeClosedError,
    TierNotFoundError,
)
from outlier_runtime.core.hookspecs import hookimpl
from outlier_runtime.core.manifest import TierManifest
from outlier_runtime.core.protocols import CachePolicy, LoadedModel, Loader, LoadRequest, Prefetcher, Reader, ReadRequest
from outlier_runtime.core.results import Chunk, GenerationResult
from outlier_runtime.core.runtime import Runtime, load

__version__ = "0.1.0"


def tiers() -> list[dict[str, Any]]:
    """Every known tier, with whether this machine can run it (RAM >= min_ram_gb x 1.15)."""
    from outlier_runtime.core.plugin_manager import get_registry
    from outlier_runtime.core.catalog import list_tiers

    return [status.to_dict() for status in list_tiers(get_registry())]


def verify(model: str | None = None, **options: Any) -> Any:
    """Check the paged engine against stock mlx-lm on this machine, bit for bit; returns a report.

    ``report.identical`` is the verdict, ``report.table()`` the details (see docs/api.md).
    """
    from outlier_runtime.verification import verify as run_verify

    return run_verify(model, **options)


def plugins() -> list[dict[str, Any]]:
    """Every loaded plugin, the distribution it came from, and what it registers."""
    from outlier_runtime.core.plugin_manager import plugin_infos

    return [info.to_dict() for info in plugin_infos()]


__all__ = [
    "AdmissionError",
    "CachePolicy",
    "CheckpointError",
    "Chunk",
    "ExactnessError",
    "ExpertReadError",
    "GenerationResult",
    "LoadRequest",
    "LoadedModel",
    "Loader",
    "ManifestError",
    "ModelNotFoundError",
    "OutlierError",
    "PluginError",
    "Prefetcher",
    "ReadRequest",
    "Reader",
    "Runtime",
    "RuntimeClosedError",
    "TierManifest",
    "TierNotFoundError",
    "hookimpl",
    "load",
    "plugins",
    "tiers",
    "verify",
]
