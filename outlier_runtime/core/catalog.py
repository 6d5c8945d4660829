"""Finding tier manifests, layering user overrides on built-in ones, and admission.

Search order (later layers override earlier ones, key by key):
1. the built-in manifests shipped in the package (``tiers/`` in the source tree);
2. the user directory (``$OUTLIER_HOME/tiers``, default ``~/.config/outlier/tiers``);
3. each directory in ``OUTLIER_TIERS_PATH`` (separated by ``os.pathsep``).

A user file may define a new tier or override any knob of a built-in one. Two user files
defining the same tier are an error: which one wins would depend on directory order.
"""

from __future__ import annotations

import copy
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import psutil

from outlier_runtime.core.errors import AdmissionError, ManifestError, TierNotFoundError
from outlier_runtime.core.manifest import TierManifest, read_toml, validate_manifest
from outlier_runtime.core.plugin_manager import Registry

TIERS_PATH_ENV = "OUTLIER_TIERS_PATH"
HOME_ENV = "OUTLIER_HOME"
MMAP_ENV = "OUTLIER_MMAP_EXPERTS"
#: The product's admission rule: RAM must clear min_ram_gb with 15% slack.
ADMISSION_SLACK = 1.15


def outlier_home() -> Path:
    """Where user configuration lives."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".config" / "outlier")


def user_tier_dirs() -> list[Path]:
    dirs = [outlier_home() / "tiers"]
    extra = os.environ.get(TIERS_PATH_ENV, "")
    dirs += [Path(part) for part in extra.split(os.pathsep) if part]
    return dirs


def builtin_tier_files() -> list[Path]:
    root = importlib.resources.files("outlier_runtime.builtin_tiers")
    return sorted(Path(str(item)) for item in root.iterdir() if item.name.endswith(".toml"))


@dataclass
class TierSource:
    """A tier's merged manifest data and the files it came from (built-in first)."""

    name: str
    data: dict[str, Any]
    files: list[Path]

    @property
    def label(self) -> str:
        return " + ".join(str(f) for f in self.files)


def _tier_id(data: dict[str, Any], path: Path) -> str:
    tier = data.get("tier")
    if tier is not None and not isinstance(tier, dict):
        raise ManifestError(f"{path}: key `tier` must be a table ([tier]), got {type(tier).__name__}.")
    tier_id = (tier or {}).get("id", path.stem)
    if not isinstance(tier_id, str):
        raise ManifestError(f"{path}: key `tier.id`: got {tier_id!r}, expected a string.")
    return tier_id


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; any other value in ``override`` replaces the base value."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def discover(extra_dirs: Iterable[Path] = ()) -> dict[str, TierSource]:
    """Every tier's merged (not yet validated) manifest data, by tier id."""
    sources: dict[str, TierSource] = {}
    for path in builtin_tier_files():
        data = read_toml(path)
        sources[_tier_id(data, path)] = TierSource(_tier_id(data, path), data, [path])
    builtin = set(sources)
    user_defined: dict[str, Path] = {}
    for directory in [*user_tier_dirs(), *extra_dirs]:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            data = read_toml(path)
            tier_id = _tier_id(data, path)
            if tier_id in user_defined:
                raise ManifestError(
                    f"Tier {tier_id!r} is defined twice: {user_defined[tier_id]} and {path}. "
                    f"Keep one file per tier (rename `tier.id` or remove one)."
                )
            user_defined[tier_id] = path
            if tier_id in builtin:
                source = sources[tier_id]
                sources[tier_id] = TierSource(tier_id, deep_merge(source.data, data), [*source.files, path])
            else:
                data.setdefault("tier", {}).setdefault("id", tier_id)
                sources[tier_id] = TierSource(tier_id, data, [path])
    return sources


def check_plugin_names(manifest: TierManifest, source: str, registry: Registry) -> None:
    """Unknown plugin names are manifest errors that name the key and the choices."""
    checks = [("loader.name", "loader", manifest.loader.name)]
    if manifest.paging is not None:
        checks.append(("paging.reader", "reader", manifest.paging.reader))
        checks.append(("paging.cache_policy", "cache_policy", manifest.paging.cache_policy))
        if manifest.paging.prefetcher is not None:
            checks.append(("paging.prefetcher", "prefetcher", manifest.paging.prefetcher))
    for key, kind, name in checks:
        if name not in registry.names(kind):
            choices = ", ".join(repr(n) for n in registry.names(kind)) or "none installed"
            raise ManifestError(
                f"{source}: key `{key}`: unknown {kind.replace('_', ' ')} {name!r}; "
                f"expected one of {choices} (or install the plugin that provides it)."
            )


#: Python-level override names and the manifest key each one sets.
OVERRIDE_KEYS = {
    "model": ("model", "path"),
    "repo": ("model", "repo"),
    "revision": ("model", "revision"),
    "loader": ("loader", "name"),
    "max_tokens": ("generation", "max_tokens"),
    "temperature": ("generation", "temperature"),
    "top_p": ("generation", "top_p"),
    "context_window": ("generation", "context_window"),
    "system_prompt": ("generation", "system_prompt"),
    "seed": ("generation", "seed"),
    "k_override": ("paging", "k_override"),
    "cache_gb": ("paging", "cache_gb"),
    "mmap_experts": ("paging", "mmap_experts"),
    "lazy_load": ("paging", "lazy_load"),
    "reader": ("paging", "reader"),
    "reader_options": ("paging", "reader_options"),
    "cache_policy": ("paging", "cache_policy"),
    "prefetcher": ("paging", "prefetcher"),
    "experts_per_token": ("paging", "experts_per_token"),
    "use_pack": ("paging", "use_pack"),
    "verify_checksums": ("paging", "verify_checksums"),
}


def overrides_to_data(overrides: dict[str, Any]) -> dict[str, Any]:
    """Turn ``load(..., cache_gb=4, model="/path")`` keywords into a manifest fragment.

    Dotted keys (``{"paging.cache_gb": 4}``) reach any manifest key.
    """
    data: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if "." in key:
            path = tuple(key.split("."))
        elif key in OVERRIDE_KEYS:
            path = OVERRIDE_KEYS[key]
        else:
            known = ", ".join(sorted(OVERRIDE_KEYS))
            raise ManifestError(
                f"Unknown override {key!r}. Use one of: {known}; or a dotted manifest key like 'paging.cache_gb'."
            )
        table = data
        for part in path[:-1]:
            table = table.setdefault(part, {})
        table[path[-1]] = value
    if "model" in data and "path" in data["model"]:
        # A model override that is not a directory but looks like 'org/name' is a repo id.
        value = str(data["model"]["path"])
        if not Path(value).expanduser().exists() and value.count("/") == 1 and not value.startswith((".", "/", "~")):
            data["model"] = {**data["model"], "repo": value, "path": None}
            del data["model"]["path"]
        else:
            data["model"].setdefault("repo", None)
    return data


def _env_overrides(data: dict[str, Any]) -> dict[str, Any]:
    value = os.environ.get(MMAP_ENV)
    if value is None or "paging" not in data:
        return data
    enabled = value.strip().lower() in {"1", "true", "yes", "on"}
    return deep_merge(data, {"paging": {"mmap_experts": enabled}})


def resolve_tier(name: str, registry: Registry, overrides: dict[str, Any] | None = None) -> TierManifest:
    """The validated manifest for tier ``name``, with environment and Python overrides applied."""
    sources = discover()
    if name not in sources:
        known = ", ".join(sorted(sources))
        raise TierNotFoundError(
            f"No tier named {name!r}. Known tiers: {known}. "
            f"Add a manifest to {outlier_home() / 'tiers'} or a directory in ${TIERS_PATH_ENV}."
        )
    source = sources[name]
    data = _env_overrides(source.data)
    label = source.label
    if overrides:
        data = deep_merge(data, overrides_to_data(overrides))
        label += " (with Python overrides)"
    manifest = validate_manifest(data, label)
    check_plugin_names(manifest, label, registry)
    return manifest


def total_ram_gb() -> float:
    return psutil.virtual_memory().total / 1e9


@dataclass
class TierStatus:
    """A tier and whether this machine can run it."""

    manifest: TierManifest | None
    name: str
    files: list[Path]
    runnable: bool
    reason: str
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": self.name,
            "display_name": m.tier.display_name if m else None,
            "kind": m.tier.kind if m else None,
            "model": (m.model.path or m.model.repo) if m else None,
            "loader": m.loader.name if m else None,
            "disk_gb": m.tier.disk_gb if m else None,
            "min_ram_gb": m.tier.min_ram_gb if m else None,
            "context_window": m.generation.context_window if m else None,
            "runnable": self.runnable,
            "reason": self.reason,
            "error": self.error,
            "files": [str(f) for f in self.files],
        }


def admission(manifest: TierManifest, ram_gb: float | None = None) -> tuple[bool, str]:
    """Can this machine run the tier? RAM must be at least min_ram_gb x 1.15."""
    ram = total_ram_gb() if ram_gb is None else ram_gb
    needed = manifest.tier.min_ram_gb * ADMISSION_SLACK
    if ram >= needed:
        return True, f"{ram:.1f} GB RAM >= {needed:.1f} GB needed"
    return False, (
        f"needs {needed:.1f} GB RAM (min_ram_gb {manifest.tier.min_ram_gb:g} x {ADMISSION_SLACK}), "
        f"this machine has {ram:.1f} GB"
    )


def check_admission(manifest: TierManifest, force: bool = False) -> None:
    ok, reason = admission(manifest)
    if not ok and not force:
        raise AdmissionError(
            f"Tier {manifest.name!r} {reason}. Pick a smaller tier (`outlier tiers`), "
            f"or pass force=True (CLI: --force) to try anyway."
        )


def list_tiers(registry: Registry) -> list[TierStatus]:
    """Every known tier with whether this machine can run it; broken manifests are listed too."""
    statuses = []
    for name, source in sorted(discover().items()):
        try:
            manifest = validate_manifest(_env_overrides(source.data), source.label)
            check_plugin_names(manifest, source.label, registry)
        except ManifestError as exc:
            statuses.append(TierStatus(None, name, source.files, False, "invalid manifest", str(exc)))
            continue
        ok, reason = admission(manifest)
        statuses.append(TierStatus(manifest, name, source.files, ok, reason))
    return statuses
