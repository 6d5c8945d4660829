"""What the server says about its tiers: ``/v1/models`` entries and when a tier may not load.

An entry reports the tier as the server would load it (its ``--tier-override`` model included):
``downloaded`` says whether the weights are on disk, and ``created`` is when they arrived (the
model's config.json), or, for weights not yet downloaded, when the tier's manifest last changed.
Without ``serve --allow-download`` a request never starts a download: it gets a 503 naming the
``outlier pull`` command to run instead.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from outlier_runtime.core.manifest import TierManifest
from outlier_runtime.serve.openai_api import MODEL_PREFIX, ApiError


def model_entries(rows: list[dict[str, Any]], manifest_of: Callable[[str], TierManifest]) -> list[dict[str, Any]]:
    """OpenAI model objects for served tiers (rows of ``outlier_runtime.tiers()``)."""
    from outlier_runtime.core.hub_cache import download_status

    manifests = [manifest_of(row["name"]) for row in rows]
    statuses = download_status(manifests)
    return [{"id": MODEL_PREFIX + row["name"], "object": "model",
             "created": _created(manifest, row.get("files") or [], bool(status["downloaded"])),
             "owned_by": "outlier-runtime", "downloaded": bool(status["downloaded"])}
            for row, manifest, status in zip(rows, manifests, statuses)]


def check_downloaded(tier: str, manifest: TierManifest) -> None:
    """Refuse (503) to load a tier whose weights would have to be downloaded first."""
    from outlier_runtime.core.hub_cache import download_status

    if manifest.model.path:
        return  # a local directory: nothing to download; loading says what is missing
    if not download_status([manifest])[0]["downloaded"]:
        raise ApiError(503, f"The weights of tier {tier!r} ({manifest.model.repo}) are not downloaded, and this "
                            f"server does not download inside a request. Run `outlier pull {tier}` on the server "
                            f"(or start it with `outlier serve --allow-download`).",
                       type="server_error", param="model", code="model_not_downloaded")


def _created(manifest: TierManifest, files: list[str], downloaded: bool) -> int:
    """Unix time the weights arrived (their config.json), else the newest manifest file's."""
    if downloaded:
        config = _config_file(manifest)
        if config is not None:
            return int(os.stat(config).st_mtime)  # follows the Hugging Face cache's link to the blob
    times = [os.stat(path).st_mtime for path in files if os.path.exists(path)]
    return int(max(times)) if times else 0


def _config_file(manifest: TierManifest) -> str | None:
    from outlier_runtime.core.hub_cache import local_directory

    local = local_directory(manifest)
    if local is not None:
        path = local / "config.json"
        return str(path) if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(manifest.model.repo or "", "config.json", revision=manifest.model.revision)
    return found if isinstance(found, str) else None
