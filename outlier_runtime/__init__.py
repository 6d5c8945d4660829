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
    DiskSpaceError,
    DistributedError,
    ExactnessError,
    ExpertReadError,
    ManifestError,
    ModelNotFoundError,
    OutlierError,
    ParameterError,
    PluginError,
    RuntimeClosedError,
    TierNotFoundError,
)
from outlier_runtime.core.hookspecs import hookimpl
from outlier_runtime.core.manifest import TierManifest
from outlier_runtime.core.options import NoOptions, PluginOptions, plugin_ref
from outlier_runtime.core.protocols import CachePolicy, LoadedModel, Loader, LoadRequest, Prefetcher, Reader, ReadRequest
from outlier_runtime.core.results import Chunk, GenerationResult
from outlier_runtime.core.runtime import Runtime, load

__version__ = "0.1.0"


def tiers() -> list[dict[str, Any]]:
    """Every known tier, with whether this machine can run it (RAM >= min_ram_gb x 1.15) and
    whether its weights are downloaded (``downloaded``, ``disk_bytes``)."""
    from outlier_runtime.core.plugin_manager import get_registry
    from outlier_runtime.core.catalog import list_tiers
    from outlier_runtime.core.env_flags import check_env_flags
    from outlier_runtime.core.hub_cache import download_status

    check_env_flags()  # the listing reads OUTLIER_MMAP_EXPERTS: refuse a malformed one here too
    statuses = list_tiers(get_registry())
    downloads = download_status([status.manifest for status in statuses])
    return [{**status.to_dict(), **download} for status, download in zip(statuses, downloads)]


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
    "DiskSpaceError",
    "DistributedError",
    "ExactnessError",
    "ExpertReadError",
    "GenerationResult",
    "LoadRequest",
    "LoadedModel",
    "Loader",
    "ManifestError",
    "ModelNotFoundError",
    "NoOptions",
    "OutlierError",
    "ParameterError",
    "PluginError",
    "PluginOptions",
    "Prefetcher",
    "ReadRequest",
    "Reader",
    "Runtime",
    "RuntimeClosedError",
    "TierManifest",
    "TierNotFoundError",
    "hookimpl",
    "load",
    "plugin_ref",
    "plugins",
    "tiers",
    "verify",
]
