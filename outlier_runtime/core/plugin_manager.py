"""The plugin manager: discovers plugins through entry points and collects what they register.

Built-in plugins (in ``plugins/``) and third-party plugins are found the same way, through
the ``outlier_runtime`` entry-point group. ``OUTLIER_LOAD_PLUGINS`` limits third-party
auto-loading: unset loads all, an empty string loads none, ``a,b`` loads only the entry
points or distributions named ``a`` and ``b``. Built-in plugins always load.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from outlier_runtime.core import hookspecs
from outlier_runtime.core.errors import PluginError

ENTRY_POINT_GROUP = "outlier_runtime"
LOAD_PLUGINS_ENV = "OUTLIER_LOAD_PLUGINS"
BUILTIN_DISTRIBUTION = "outlier-runtime"

#: The kinds of thing a plugin can register, keyed by the hook that registers them.
KINDS = {
    "loader": "register_loaders",
    "cache_policy": "register_cache_policies",
    "reader": "register_readers",
    "prefetcher": "register_prefetchers",
}


@dataclass(frozen=True)
class Registration:
    """One named thing a plugin registered."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: str | None
    description: str = ""


@dataclass
class PluginInfo:
    """A loaded plugin: where it came from and what it provides."""

    name: str
    distribution: str | None
    version: str | None
    provides: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "provides": self.provides,
        }


class Registry:
    """Everything registered by every loaded plugin, by kind and unique name."""

    def __init__(self) -> None:
        self._things: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}

    def add(self, registration: Registration) -> None:
        existing = self._things[registration.kind].get(registration.name)
        if existing is not None:
            raise PluginError(
                f"Two plugins register a {registration.kind} named {registration.name!r}: "
                f"{_describe(existing)} and {_describe(registration)}. "
                f"Uninstall one of them, or limit auto-loading with {LOAD_PLUGINS_ENV}."
            )
        self._things[registration.kind][registration.name] = registration

    def names(self, kind: str) -> list[str]:
        return sorted(self._things[kind])

    def all(self, kind: str) -> list[Registration]:
        return [self._things[kind][name] for name in self.names(kind)]

    def get(self, kind: str, name: str) -> Registration:
        try:
            return self._things[kind][name]
        except KeyError:
            available = ", ".join(self.names(kind)) or "none"
            raise PluginError(
                f"Unknown {kind.replace('_', ' ')} {name!r}. Available: {available}. "
                f"Install the plugin that provides it, or pick one of those names."
            ) from None

    def create(self, kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
        """Build an instance of the named thing by calling its factory."""
        return self.get(kind, name).factory(*args, **kwargs)


def _describe(registration: Registration) -> str:
    if registration.distribution:
        return f"plugin {registration.plugin!r} (distribution {registration.distribution!r})"
    return f"plugin {registration.plugin!r}"


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_registry: Registry | None = None
_extra_plugins: list[tuple[object, str]] = []
# Which distribution each entry-point plugin came from, for `outlier plugins`.
_plugin_dists: dict[str, importlib.metadata.Distribution] = {}


def _allowed_third_party() -> set[str] | None:
    value = os.environ.get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allowed = _allowed_third_party()
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist.name if entry_point.dist is not None else None
        builtin = dist is not None and _normalize(dist) == _normalize(BUILTIN_DISTRIBUTION)
        if not builtin and allowed is not None:
            if entry_point.name not in allowed and (dist is None or dist not in allowed):
                continue
        if pm.get_plugin(entry_point.name) is not None or pm.is_blocked(entry_point.name):
            continue
        try:
            plugin = entry_point.load()
        except Exception as exc:  # a broken third-party plugin must say who it is
            raise PluginError(
                f"Plugin {entry_point.name!r} (entry point {entry_point.value!r}"
                f"{', distribution ' + repr(dist) if dist else ''}) failed to import: {exc}"
            ) from exc
        pm.register(plugin, name=entry_point.name)
        if entry_point.dist is not None:
            _plugin_dists[entry_point.name] = entry_point.dist


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-")


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every allowed plugin loaded."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            _load_entry_points(pm)
            for plugin, name in _extra_plugins:
                if pm.get_plugin(name) is None:
                    pm.register(plugin, name=name)
            # A misspelt hook name in any plugin fails here, not silently later.
            pm.check_pending()
            _pm = pm
        return _pm


def get_registry() -> Registry:
    """Everything the loaded plugins registered."""
    global _registry
    with _lock:
        if _registry is None:
            pm = get_plugin_manager()
            registry = Registry()
            distributions = _distributions()
            for kind, hook_name in KINDS.items():
                hook = getattr(pm.hook, hook_name)
                for impl in hook.get_hookimpls():
                    plugin_name = impl.plugin_name
                    dist = distributions.get(plugin_name)

                    def register(name: str, factory: Callable[..., Any], description: str = "",
                                 _kind: str = kind, _plugin: str = plugin_name,
                                 _dist: str | None = dist) -> None:
                        registry.add(Registration(_kind, name, factory, _plugin, _dist, description))

                    impl.function(register=register)
            _registry = registry
        return _registry


def _distributions() -> dict[str, str]:
    return {name: dist.metadata["Name"] for name, dist in _plugin_dists.items()}


def register_plugin(plugin: object, name: str) -> None:
    """Register a plugin object in this process (for scripts and tests), then rebuild the registry."""
    with _lock:
        _extra_plugins.append((plugin, name))
        reset()


def unregister_plugin(name: str) -> None:
    """Forget a plugin registered with :func:`register_plugin`."""
    with _lock:
        _extra_plugins[:] = [(p, n) for p, n in _extra_plugins if n != name]
        reset()


def reset() -> None:
    """Drop the plugin manager and registry; the next use re-discovers plugins."""
    global _pm, _registry
    with _lock:
        _pm = None
        _registry = None
        _plugin_dists.clear()


def clear_registered_plugins() -> None:
    """Forget every plugin added with :func:`register_plugin` (tests use this between cases)."""
    with _lock:
        _extra_plugins.clear()
        reset()


def plugin_infos() -> list[PluginInfo]:
    """Every loaded plugin, with its distribution and the names it provides."""
    pm = get_plugin_manager()
    registry = get_registry()
    infos: dict[str, PluginInfo] = {}
    versions = {name: dist.version for name, dist in _plugin_dists.items()}
    distributions = _distributions()
    for name, plugin in pm.list_name_plugin():
        if plugin is hookspecs:
            continue
        infos[name] = PluginInfo(name, distributions.get(name), versions.get(name))
    for kind in KINDS:
        for registration in registry.all(kind):
            info = infos.setdefault(
                registration.plugin,
                PluginInfo(registration.plugin, registration.distribution, None),
            )
            info.provides.setdefault(kind, []).append(registration.name)
    return sorted(infos.values(), key=lambda info: info.name)
