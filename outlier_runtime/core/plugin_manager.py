"""The plugin manager: registers the built-in plugins and the third-party ones, and collects
what they register.

Built-in plugins (the modules in ``plugins/``) are listed in ``DEFAULT_PLUGINS`` and registered
by import path, so a source checkout has them without ``pip install``. Third-party plugins
arrive through the ``outlier_runtime`` entry-point group. ``OUTLIER_LOAD_PLUGINS`` limits
third-party auto-loading: unset loads all, an empty string loads none, ``a,b`` loads only the
entry points or distributions named ``a`` and ``b``. Built-in plugins always load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pluggy
from pydantic import BaseModel, ValidationError

from outlier_runtime.core import hookspecs
from outlier_runtime.core.errors import PluginError
from outlier_runtime.core.manifest import explain_error
from outlier_runtime.core.guard import GUARDS, PluginGuard
from outlier_runtime.core.options import NoOptions, as_kwargs, describe_options

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "outlier_runtime"
LOAD_PLUGINS_ENV = "OUTLIER_LOAD_PLUGINS"
BUILTIN_DISTRIBUTION = "outlier-runtime"

#: The built-in plugins: plugin name -> module (each a package under ``plugins/``).
DEFAULT_PLUGINS = {
    "dense": "outlier_dense",
    "paged_moe": "outlier_paged_moe",
    "vlm": "outlier_vlm",
    "cache_lru": "outlier_cache_lru",
    "cache_lfu": "outlier_cache_lfu",
    "cache_lfru": "outlier_cache_lfru",
    "cache_lrfu": "outlier_cache_lrfu",
    "readers": "outlier_readers",
    "fanout": "outlier_fanout",
    "prefetch": "outlier_prefetch",
}

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
    #: The pydantic model of the options this thing accepts (NoOptions: none).
    options: type[BaseModel] = NoOptions
    #: A top-level manifest table holding a loader's options (``paging``), else ``[loader.options]``.
    manifest_table: str | None = None

    @property
    def guard(self) -> PluginGuard:
        return PluginGuard(self.kind, self.name, self.plugin, self.distribution)

    def option_fields(self) -> list[str]:
        return list(self.options.model_fields)


@dataclass
class PluginInfo:
    """A loaded plugin: where it came from and what it provides."""

    name: str
    distribution: str | None
    version: str | None
    provides: dict[str, list[str]] = field(default_factory=dict)
    #: kind -> registered name -> its options (name, type, default, description).
    options: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "provides": self.provides,
            "options": self.options,
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

    def kinds(self) -> list[str]:
        return list(self._things)

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

    def create(self, kind: str, name: str, options: Mapping[str, Any] | BaseModel | None = None) -> Any:
        """Build the named thing with validated options; calls into it are guarded.

        Readers, cache policies and prefetchers are built as ``factory(**options)``; a loader
        is built as ``factory()`` and receives its options in the ``LoadRequest``.
        """
        registration = self.get(kind, name)
        guard = registration.guard
        if kind == "loader":
            return guard.call("factory", registration.factory)
        validated = validate_options(registration, options)
        instance = guard.call("factory", lambda: registration.factory(**as_kwargs(validated)))
        return GUARDS[kind](instance, guard)


def validate_options(registration: Registration, options: Mapping[str, Any] | BaseModel | None) -> BaseModel:
    """The plugin's options model for ``options`` (already validated models pass through)."""
    if isinstance(options, registration.options):
        return options
    data = options.model_dump() if isinstance(options, BaseModel) else dict(options or {})
    try:
        return registration.options.model_validate(data)
    except ValidationError as exc:
        raise PluginError(format_option_errors(exc, registration, "options")) from None


def format_option_errors(exc: ValidationError, registration: Registration, prefix: str) -> str:
    """One line per problem: the key path under ``prefix``, what is wrong, and what is accepted."""
    accepted = ", ".join(registration.option_fields()) or "none"
    who = registration.guard.describe()
    lines = []
    for error in exc.errors():
        key = ".".join([prefix, *(str(part) for part in error["loc"])])
        if error["type"] == "extra_forbidden":
            problem = f"unknown key: {who} has no option {str(error['loc'][-1])!r}; it accepts: {accepted}"
        else:
            problem = f"{who}: {explain_error(error)}"
        lines.append(f"key `{key}`: {problem}")
    return "; ".join(lines)


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


def _load_default_plugins(pm: pluggy.PluginManager) -> None:
    for name, module_name in DEFAULT_PLUGINS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(
                f"Built-in plugin {name!r} (module {module_name!r}) failed to import: {exc}. "
                f"Reinstall outlier-runtime, or put its plugins/ folder on PYTHONPATH in a source checkout."
            ) from exc
        pm.register(module, name=name)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allowed = _allowed_third_party()
    seen: set[str] = set()
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist.name if entry_point.dist is not None else None
        seen.update({entry_point.name, *([dist] if dist else [])})
        if allowed is not None and entry_point.name not in allowed and (dist is None or dist not in allowed):
            continue
        if entry_point.name in DEFAULT_PLUGINS or pm.is_blocked(entry_point.name):
            continue  # the built-ins are registered from DEFAULT_PLUGINS, never twice
        if pm.get_plugin(entry_point.name) is not None:
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
    for name in sorted((allowed or set()) - seen):
        log.warning("%s names %r, but no installed plugin or distribution has that name; ignored.",
                    LOAD_PLUGINS_ENV, name)


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-")


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every allowed plugin loaded."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            _load_default_plugins(pm)
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
                                 options: type[BaseModel] | None = None, manifest_table: str | None = None,
                                 _kind: str = kind, _plugin: str = plugin_name,
                                 _dist: str | None = dist) -> None:
                        registry.add(_registration(_kind, name, factory, _plugin, _dist, description,
                                                   options, manifest_table))

                    PluginGuard(kind, hook_name, plugin_name, dist).call(hook_name, impl.function, register)
            _registry = registry
        return _registry


def _registration(kind: str, name: str, factory: Callable[..., Any], plugin: str, dist: str | None,
                  description: str, options: type[BaseModel] | None, manifest_table: str | None) -> Registration:
    """Check what a plugin registers; the options model defaults to the factory's inner ``Options``."""
    origin = f"plugin {plugin!r}" + (f" (distribution {dist!r})" if dist else "")
    if not isinstance(name, str) or not name:
        raise PluginError(f"{origin} registered a {kind.replace('_', ' ')} without a name (got {name!r}).")
    if not callable(factory):
        raise PluginError(f"{origin} registered {kind.replace('_', ' ')} {name!r} with a factory that "
                          f"cannot be called ({factory!r}).")
    options = options if options is not None else getattr(factory, "Options", NoOptions)
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        raise PluginError(f"{origin} registered {kind.replace('_', ' ')} {name!r} with options {options!r}; "
                          f"expected a pydantic model class (subclass outlier_runtime.PluginOptions).")
    if manifest_table is not None and kind != "loader":
        raise PluginError(f"{origin}: only loaders can read a manifest table ({name!r} asked for "
                          f"[{manifest_table}]).")
    return Registration(kind, name, factory, plugin, dist, description, options, manifest_table)


def _distributions() -> dict[str, str]:
    names = {name: dist.metadata["Name"] for name, dist in _plugin_dists.items()}
    return {**{name: BUILTIN_DISTRIBUTION for name in DEFAULT_PLUGINS}, **names}


def _versions() -> dict[str, str]:
    from outlier_runtime import __version__

    versions = {name: dist.version for name, dist in _plugin_dists.items()}
    return {**{name: __version__ for name in DEFAULT_PLUGINS}, **versions}


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
    versions = _versions()
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
            info.options.setdefault(kind, {})[registration.name] = describe_options(registration.options)
    return sorted(infos.values(), key=lambda info: info.name)
