"""Tier weights in the Hugging Face cache: what is downloaded, pulling it, removing it.

The cache is Hugging Face's own (``HF_HOME``/``HF_HUB_CACHE``), read and written only through
huggingface_hub, so `hf` and mlx-lm see the same files and a pull interrupted by either resumes.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outlier_runtime.core.errors import DiskSpaceError, ModelNotFoundError, TierNotFoundError
from outlier_runtime.core.manifest import TierManifest
from outlier_runtime.core.resolve import MODEL_FILE_PATTERNS, looks_like_repo_id
from outlier_runtime.embedded import SCHEME, embedded_model

log = logging.getLogger(__name__)


@dataclass
class PullTarget:
    """What `outlier pull`/`rm` act on: a repo, and the tier that names it (if one does)."""

    repo: str
    revision: str | None = None
    tier: str | None = None
    disk_gb: float | None = None


def hub_cache_dir() -> Path:
    """Where Hugging Face keeps downloaded repos (read at each call: tests and HF_HOME move it)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _scan() -> Any:
    """The cache's HFCacheInfo, or None when there is no cache yet."""
    from huggingface_hub import scan_cache_dir

    cache = hub_cache_dir()
    return scan_cache_dir(cache) if cache.is_dir() else None


def _cached_repos(scan: Any = None) -> dict[str, Any]:
    """Model repos in the cache by repo id (CachedRepoInfo)."""
    scan = scan or _scan()
    return {repo.repo_id: repo for repo in scan.repos if repo.repo_type == "model"} if scan else {}


def _is_complete(repo_info: Any) -> bool:
    return any((revision.snapshot_path / "config.json").is_file() for revision in repo_info.revisions)


def download_status(manifests: list[TierManifest | None]) -> list[dict[str, Any]]:
    """For each manifest: ``downloaded`` (True/False; None for an invalid one) and ``disk_bytes``."""
    cached: dict[str, Any] | None = None
    statuses = []
    for manifest in manifests:
        if manifest is None:
            statuses.append({"downloaded": None, "disk_bytes": None})
            continue
        local = local_directory(manifest)
        if local is not None:
            present = (local / "config.json").is_file()
            size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file()) if present else 0
            statuses.append({"downloaded": present, "disk_bytes": size})
            continue
        if cached is None:
            cached = _cached_repos()  # one scan of the cache for every tier
        info = cached.get(manifest.model.repo or "")
        statuses.append({"downloaded": bool(info and _is_complete(info)),
                         "disk_bytes": info.size_on_disk if info else 0})
    return statuses


def local_directory(manifest: TierManifest) -> Path | None:
    """The tier's model directory when it reads a local one (or the embedded demo), else None."""
    path = manifest.model.path
    if not path:
        return None
    if not path.startswith(SCHEME):
        return Path(path).expanduser()
    try:
        return embedded_model(path)
    except ModelNotFoundError:  # a listing reports it as not downloaded; loading says why
        return Path(path)


def pull_target(target: str, manifest: TierManifest | None) -> PullTarget:
    """The repo TARGET names: a tier (its manifest's repo) or a repo id itself."""
    if manifest is not None:
        if not manifest.model.repo or manifest.model.path:
            raise TierNotFoundError(
                f"Tier {target!r} reads a local model ({manifest.model.path}); it has nothing in the Hugging "
                f"Face cache to pull or remove. "
                f"Give a tier whose `[model] repo` is set, or a repo id (org/name)."
            )
        return PullTarget(manifest.model.repo, manifest.model.revision, target, manifest.tier.disk_gb)
    if looks_like_repo_id(target):
        return PullTarget(target)
    raise TierNotFoundError(f"{target!r} is neither a tier (see `outlier tiers`) nor a repo id (org/name).")


def check_free_disk(target: PullTarget) -> None:
    """Refuse a pull the disk cannot hold: the tier's disk_gb, less what is already cached."""
    if not target.disk_gb:
        return  # a bare repo id: its size is unknown until the download asks the Hub
    cache = hub_cache_dir()
    existing = next(p for p in (cache, *cache.parents) if p.exists())
    info = _cached_repos().get(target.repo)
    needed = target.disk_gb * 1e9 - (info.size_on_disk if info else 0)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise DiskSpaceError(
            f"outlier pull {target.tier}: {target.repo} needs {needed / 1e9:.1f} GB more (disk_gb "
            f"{target.disk_gb:g}) but {existing} has {free / 1e9:.1f} GB free; free some space "
            f"(`outlier rm TIER`) or point HF_HOME at a larger disk."
        )


def pull(target: PullTarget) -> Path:
    """Download (or finish downloading) the target's model files; returns the snapshot directory."""
    from huggingface_hub import snapshot_download

    check_free_disk(target)
    try:
        # snapshot_download shows a progress bar per file and resumes partial files on its own.
        return Path(snapshot_download(target.repo, revision=target.revision, allow_patterns=MODEL_FILE_PATTERNS,
                                      cache_dir=hub_cache_dir()))
    except Exception as exc:  # offline, unknown repo, network: many types, one answer
        log.info("pull of %s failed: %s", target.repo, exc)
        raise ModelNotFoundError(
            f"outlier pull {target.tier or target.repo}: could not download {target.repo!r} "
            f"({type(exc).__name__}); check the repo id and the network (HF_HUB_OFFLINE must be unset), "
            f"then run it again: finished files are kept."
        ) from exc


def remove(target: PullTarget) -> int | None:
    """Delete the target repo's cached snapshots and blobs, nothing else; returns bytes freed
    (None when the repo was not in the cache)."""
    scan = _scan()
    info = _cached_repos(scan).get(target.repo)
    if info is None:
        return None
    # Deleting every revision of the repo removes its folder; other repos' blobs are never shared.
    strategy = scan.delete_revisions(*(revision.commit_hash for revision in info.revisions))
    strategy.execute()
    return strategy.expected_freed_size
