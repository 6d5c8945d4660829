"""The hooks a plugin can implement. Each receives a ``register`` callback.

A plugin calls ``register(name, factory)`` once per thing it provides; names are unique
across all installed plugins. See docs/hooks.md for the full reference.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "outlier_runtime"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def register_loaders(register: Register) -> None:
    """Register model loaders: ``register(name, factory)``; ``factory()`` returns a Loader."""


@hookspec
def register_cache_policies(register: Register) -> None:
    """Register cache policies: ``register(name, factory)``; ``factory()`` returns a CachePolicy."""


@hookspec
def register_readers(register: Register) -> None:
    """Register expert readers: ``register(name, factory)``; ``factory(**options)`` returns a Reader."""


@hookspec
def register_prefetchers(register: Register) -> None:
    """Register expert prefetchers: ``register(name, factory)``; ``factory(**options)`` returns a Prefetcher."""
