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
import logging
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import psutil

from pydantic import BaseModel, ValidationError

from outlier_runtime.core.errors import AdmissionError, ManifestError, OutlierError, TierNotFoundError
from outlier_runtime.core.manifest import TierManifest, read_toml, validate_manifest
from outlier_runtime.core.memory import MemoryPlan, PlanLine
from outlier_runtime.core.options import plugin_refs
from outlier_runtime.core.plugin_manager import Registration, Registry, format_option_errors
from outlier_runtime.core.protocols import LoadRequest
from outlier_runtime.core.resolve import local_model, looks_like_repo_id

log = logging.getLogger(__name__)

TIERS_PATH_ENV = "OUTLIER_TIERS_PATH"
HOME_ENV = "OUTLIER_HOME"
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


def discover(extra_dirs: Iterable[Path] = (), broken: dict[Path, ManifestError] | None = None
             ) -> dict[str, TierSource]:
    """Every tier's merged (not yet validated) manifest data, by tier id.

    A user file that cannot be read is an error, or, when ``broken`` is given (listings), is
    recorded there and skipped, so one bad file does not hide every other tier.
    """
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
            try:
                data = read_toml(path)
                tier_id = _tier_id(data, path)
            except ManifestError as exc:
                if broken is None:
                    raise
                broken[path] = exc
                continue
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


def resolve_plugin_options(manifest: TierManifest, source: str, registry: Registry) -> TierManifest:
    """Validate the options of the loader the tier names, and of every plugin those options name.

    Sets ``manifest.loader_options``. Errors name the file, the key path, the plugin and what
    it accepts.
    """
    loader = _registered(registry, "loader", manifest.loader.name, "loader.name", source)
    tables = manifest.plugin_tables
    for table, value in tables.items():
        if table != loader.manifest_table:
            raise ManifestError(f"{source}: key `{table}`: {_unclaimed_table(table, value, loader, registry)}")
    if loader.manifest_table is not None and manifest.loader.options and loader.manifest_table in tables:
        raise ManifestError(
            f"{source}: keys `loader.options` and `{loader.manifest_table}` both set options of loader "
            f"{loader.name!r}; keep them in [{loader.manifest_table}] only."
        )
    prefix = loader.manifest_table if loader.manifest_table in tables else "loader.options"
    data = tables.get(loader.manifest_table) if loader.manifest_table in tables else manifest.loader.options
    manifest._loader_options = _validated(registry, loader, data, prefix, source)
    return manifest


def _registered(registry: Registry, kind: str, name: str, key: str, source: str) -> Registration:
    if name not in registry.names(kind):
        choices = ", ".join(repr(n) for n in registry.names(kind)) or "none installed"
        raise ManifestError(
            f"{source}: key `{key}`: unknown {kind.replace('_', ' ')} {name!r}; "
            f"expected one of {choices} (or install the plugin that provides it)."
        )
    return registry.get(kind, name)


def _validated(registry: Registry, registration: Registration, data: Any, prefix: str, source: str) -> BaseModel:
    """``data`` validated against the plugin's options; then each plugin those options name, recursively."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: key `{prefix}`: expected a table of options for "
                            f"{registration.guard.describe()}, got {data!r}.")
    try:
        options = registration.options.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{source}: {format_option_errors(exc, registration, prefix)}") from None
    for field, kind, options_field in plugin_refs(registration.options):
        name = getattr(options, field)
        if name is None:
            continue
        referenced = _registered(registry, kind, name, _key(prefix, field), source)
        _validated(registry, referenced, getattr(options, options_field), _key(prefix, options_field), source)
    return options


def _key(prefix: str, field: str) -> str:
    return f"{prefix}.{field}"


def _unclaimed_table(table: str, value: Any, loader: Registration, registry: Registry) -> str:
    owners = [r.name for r in registry.all("loader") if r.manifest_table == table]
    if not isinstance(value, dict) or not owners:
        return "unknown key; remove it or check its spelling (see `outlier schema`)"
    return (f"loader {loader.name!r} reads no [{table}] table (it is for loader "
            f"{' or '.join(repr(o) for o in owners)}); remove the table, or set loader.name to "
            f"{owners[0]!r}.")


def manifest_json_schema(registry: Registry) -> dict[str, Any]:
    """The JSON Schema of a tier manifest, with each loader's own table and every plugin's options."""
    schema = TierManifest.model_json_schema(ref_template="#/$defs/{model}")
    schema["additionalProperties"] = False
    defs = schema.setdefault("$defs", {})
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in registry.kinds():
        for registration in registry.all(kind):
            options = registration.options.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(options.pop("$defs", {}))
            by_kind.setdefault(kind, {})[registration.name] = options
            if registration.manifest_table:
                defs[registration.options.__name__] = options
                schema["properties"][registration.manifest_table] = {
                    "$ref": f"#/$defs/{registration.options.__name__}",
                    "description": f"Options of loader {registration.name!r}.",
                }
    schema["x-plugin-options"] = by_kind
    return schema


#: Python-level override names and the manifest key each one sets. Any other bare name is an
#: option of the tier's loader (``cache_gb=4`` on Plus sets ``paging.cache_gb``).
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
}


def overrides_to_data(overrides: dict[str, Any], loader: Registration | None = None,
                      options_path: tuple[str, ...] = ("loader", "options")) -> dict[str, Any]:
    """Turn ``load(..., cache_gb=4, model="/path")`` keywords into a manifest fragment.

    Core names map to their section; any other name must be an option of the tier's
    ``loader``. Dotted keys (``{"paging.cache_gb": 4}``) reach any manifest key.
    """
    data: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if "." in key:
            path = tuple(key.split("."))
        elif key in OVERRIDE_KEYS:
            path = OVERRIDE_KEYS[key]
        elif loader is not None and key in loader.option_fields():
            path = (*options_path, key)
        else:
            known = ", ".join(sorted(OVERRIDE_KEYS))
            options = ", ".join(loader.option_fields()) if loader is not None else ""
            raise ManifestError(
                f"Unknown override {key!r}. Use one of: {known}"
                + (f"; or an option of loader {loader.name!r}: {options or 'none'}" if loader is not None else "")
                + "; or a dotted manifest key like 'generation.top_p'."
            )
        table = data
        for part in path[:-1]:
            table = table.setdefault(part, {})
        table[path[-1]] = value
    if "model" in data and "path" in data["model"]:
        # A model override that is not a directory but looks like 'org/name' is a repo id.
        value = str(data["model"]["path"])
        if looks_like_repo_id(value):
            data["model"] = {**data["model"], "repo": value, "path": None}
            del data["model"]["path"]
        else:
            data["model"].setdefault("repo", None)
    return data


def _loader_named(data: dict[str, Any], overrides: dict[str, Any], registry: Registry) -> Registration | None:
    name = overrides.get("loader") or overrides.get("loader.name") or (data.get("loader") or {}).get("name")
    return registry.get("loader", name) if isinstance(name, str) and name in registry.names("loader") else None


def _options_path(loader: Registration | None, data: dict[str, Any]) -> tuple[str, ...]:
    """Where the manifest keeps the loader's options: its own table, unless [loader.options] is used."""
    loader_options = (data.get("loader") or {}).get("options")
    if loader is None or loader.manifest_table is None or (loader_options and loader.manifest_table not in data):
        return ("loader", "options")
    return (loader.manifest_table,)


def resolve_tier(name: str, registry: Registry, overrides: dict[str, Any] | None = None) -> TierManifest:
    """The validated manifest for tier ``name``, with Python overrides applied and plugin options checked."""
    sources = discover()
    if name not in sources:
        known = ", ".join(sorted(sources))
        raise TierNotFoundError(
            f"No tier named {name!r}. Known tiers: {known}. "
            f"Add a manifest to {outlier_home() / 'tiers'} or a directory in ${TIERS_PATH_ENV}."
        )
    source = sources[name]
    data = source.data
    label = source.label
    if overrides:
        loader = _loader_named(data, overrides, registry)
        data = deep_merge(data, overrides_to_data(overrides, loader, _options_path(loader, data)))
        label += " (with Python overrides)"
    manifest = validate_manifest(data, label)
    return resolve_plugin_options(manifest, label, registry)


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
    plan: MemoryPlan | None = None
    #: The tier's loader plans its memory: loading checks that plan, whatever ``runnable`` says now.
    planned: bool = False

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
            "reference_tok_s": m.tier.reference_tok_s if m else None,
            "image_input": m.model.image_input if m else None,
            "runnable": self.runnable,
            "memory_plan": self.plan.to_dict() if self.plan else None,
            "admitted_by_plan": self.planned,
            "reason": self.reason,
            "error": self.error,
            "files": [str(f) for f in self.files],
        }


def memory_plan(manifest: TierManifest, registry: Registry, model_path: Path | None = None,
                reserved: Sequence[PlanLine] = ()) -> MemoryPlan | None:
    """The loader's memory plan for this tier, when its loader plans memory and the model is on
    disk (``model_path``, or found without downloading); None otherwise. ``reserved`` lines are
    memory held beside the model (the server's prompt cache), counted by the plan."""
    registration = registry.get("loader", manifest.loader.name)
    loader = registry.create("loader", manifest.loader.name)
    planner = getattr(loader, "plan_memory", None)
    if planner is None:
        return None
    path = model_path or local_model(manifest.model)
    if path is None:
        return None
    return registration.guard.call("plan_memory", planner,
                                   LoadRequest(manifest, path, manifest.loader_options, reserved=tuple(reserved)))


def plans_memory(manifest: TierManifest, registry: Registry) -> bool:
    return hasattr(registry.create("loader", manifest.loader.name), "plan_memory")


def tier_admission(manifest: TierManifest, registry: Registry) -> tuple[bool, str, MemoryPlan | None, bool]:
    """Can this machine run the tier now, and why; its memory plan (a paged tier whose model is on
    disk); and whether its loader plans memory at all (then loading checks the plan, not this)."""
    planned = plans_memory(manifest, registry)
    plan = memory_plan(manifest, registry) if planned else None
    ok, reason = admission(manifest, plan=plan)
    if planned and plan is None:
        reason += (f"; the tier's headline figure: its memory is planned from the model once on disk "
                   f"(`outlier pull {manifest.name}`, or a user manifest's [model] path)")
    return ok, reason, plan, planned


def admission(manifest: TierManifest, ram_gb: float | None = None,
              plan: MemoryPlan | None = None) -> tuple[bool, str]:
    """Can this machine run the tier? By the loader's memory plan when there is one; else RAM must
    be at least min_ram_gb x 1.15 (the tier's headline figure, also used before a download)."""
    if plan is not None:
        return plan.fits, plan.reason()
    ram = total_ram_gb() if ram_gb is None else ram_gb
    needed = manifest.tier.min_ram_gb * ADMISSION_SLACK
    if ram >= needed:
        return True, f"{ram:.1f} GB RAM >= {needed:.1f} GB needed"
    return False, (
        f"needs {needed:.1f} GB RAM (min_ram_gb {manifest.tier.min_ram_gb:g} x {ADMISSION_SLACK}), "
        f"this machine has {ram:.1f} GB"
    )


def check_admission(manifest: TierManifest, force: bool = False, plan: MemoryPlan | None = None) -> None:
    ok, reason = admission(manifest, plan=plan)
    if ok:
        return
    if force:
        log.warning("tier %s: %s; loading anyway (force)", manifest.name, reason)
        return
    fix = f"Change {plan.knob}" if plan is not None else "Pick a smaller tier (`outlier tiers`)"
    raise AdmissionError(f"Tier {manifest.name!r}: {reason}. {fix}, or pass force=True (CLI: --force) to try anyway.")


def list_tiers(registry: Registry) -> list[TierStatus]:
    """Every known tier with whether this machine can run it; broken manifests are listed too."""
    statuses = []
    broken: dict[Path, ManifestError] = {}
    sources = discover(broken=broken)
    for path, exc in broken.items():
        statuses.append(TierStatus(None, path.stem, [path], False, "invalid manifest", str(exc)))
    for name, source in sorted(sources.items()):
        try:
            manifest = resolve_plugin_options(validate_manifest(source.data, source.label), source.label, registry)
        except ManifestError as exc:
            statuses.append(TierStatus(None, name, source.files, False, "invalid manifest", str(exc)))
            continue
        try:
            ok, reason, plan, planned = tier_admission(manifest, registry)
        except OutlierError as exc:  # a broken checkpoint on disk: listed, with why
            statuses.append(TierStatus(manifest, name, source.files, False, str(exc)))
            continue
        statuses.append(TierStatus(manifest, name, source.files, ok, reason, plan=plan, planned=planned))
    return statuses
