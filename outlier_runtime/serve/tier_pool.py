"""The tiers the server keeps loaded side by side, within one memory plan.

Switching tiers does not close one model to load the other while the serving plan allows both:
its lines are the prompt cache's budget (``--prompt-cache-gb``), every loaded tier's bytes and
the tier asked for, against the server's memory budget (``--memory-gb``, else what was available
when the server started, less headroom). A tier's bytes are its loader's memory plan where it has
one (paged tiers), else its weights on disk plus its KV cache at the context window. When the
tier asked for does not fit, the least recently used tiers no request is using are unloaded
first; a tier serving a request is never unloaded under it (a use count per tier). If the tier
still does not fit beside tiers in use, the request gets a 503 to retry; with nothing else
loaded, the tier is loaded and ``load()``'s own admission decides.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable

from outlier_runtime.core.manifest import TierManifest
from outlier_runtime.core.memory import GB, MemoryPlan, PlanLine, kv_cache_bytes
from outlier_runtime.serve.openai_api import ApiError

log = logging.getLogger(__name__)

#: What the serving plan tells the user to change when a tier does not fit.
KNOB = "serve --memory-gb or --prompt-cache-gb (or serve fewer tiers at once)"


@dataclass
class LoadedTier:
    runtime: Any
    nbytes: int
    note: str
    users: int = 0


def tier_bytes(manifest: TierManifest) -> tuple[int, str]:
    """A tier's bytes when loaded, and how they were found: its loader's memory plan (paged tiers),
    else its weights on disk plus its KV cache at the context window, else its headline figure."""
    from outlier_runtime.core.catalog import memory_plan, plans_memory
    from outlier_runtime.core.plugin_manager import get_registry
    from outlier_runtime.core.resolve import local_model

    registry = get_registry()
    if plans_memory(manifest, registry):
        plan = memory_plan(manifest, registry)
        if plan is not None:
            return plan.total_bytes, "its memory plan"
    path = local_model(manifest.model)
    if path is None:  # not on disk yet (--allow-download): the tier's headline figure
        return int(manifest.tier.min_ram_gb * GB), "min_ram_gb (not downloaded)"
    return weights_and_kv_bytes(Path(path), manifest.generation.context_window)


def weights_and_kv_bytes(path: Path, context_window: int) -> tuple[int, str]:
    """Bytes of a dense model's weights (its safetensors files) and its KV cache at ``context_window``."""
    from outlier_runtime.core.memory import text_config

    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    config = json.loads((path / "config.json").read_text())
    dtype = str(text_config(config).get("torch_dtype") or config.get("torch_dtype") or "bfloat16")
    kv = kv_cache_bytes(config, context_window, 4 if dtype == "float32" else 2)
    return weights + kv, f"weights {weights / GB:.3f} GB + KV cache at {context_window} tokens"


class TierPool:
    """Loaded runtimes by tier, least recently used first, within ``budget_bytes``."""

    def __init__(self, load: Callable[[str], Any], footprint: Callable[[str], tuple[int, str]],
                 budget_bytes: int, headroom_bytes: int, reserved: list[PlanLine],
                 on_unload: Callable[[str], None] = lambda tier: None):
        self._load = load
        self._footprint = footprint
        self.budget_bytes = budget_bytes
        self.headroom_bytes = headroom_bytes
        self.reserved = reserved
        self._on_unload = on_unload
        self._tiers: OrderedDict[str, LoadedTier] = OrderedDict()
        self._holders: dict[Hashable, str] = {}  # user -> the tier it holds
        self._lock = threading.Lock()  # the tables above
        self._loading = threading.Lock()  # one load (and its evictions) at a time

    @property
    def loaded(self) -> list[str]:
        """Loaded tiers, least recently used first."""
        with self._lock:
            return list(self._tiers)

    @property
    def most_recent(self) -> str | None:
        with self._lock:
            return next(reversed(self._tiers), None)

    def plan(self, adding: tuple[str, int, str] | None = None) -> MemoryPlan:
        """The serving plan: the prompt cache, each loaded tier, and ``adding`` (name, bytes, note)."""
        with self._lock:
            lines = [*self.reserved, *(PlanLine(f"tier {name}", tier.nbytes, tier.note)
                                       for name, tier in self._tiers.items())]
        if adding is not None:
            lines.append(PlanLine(f"tier {adding[0]}", adding[1], adding[2]))
        return MemoryPlan(lines, self.budget_bytes, self.headroom_bytes, knob=KNOB)

    def acquire(self, tier: str, user: Hashable | None = None) -> Any:
        """The tier's runtime, loaded if needed; ``user`` holds it (never unloaded) until :meth:`release`."""
        with self._lock:
            if tier in self._tiers:
                return self._hold(tier, user)
        with self._loading:
            with self._lock:
                if tier in self._tiers:  # loaded while this call waited
                    return self._hold(tier, user)
            nbytes, note = self._footprint(tier)
            self._make_room(tier, nbytes, note)
            runtime = self._load(tier)
            plan = getattr(runtime, "memory_plan", None)
            if plan is not None:  # what the loader planned, without the lines reserved beside it
                nbytes = plan.total_bytes - sum(line.bytes for line in self.reserved if line in plan.lines)
            with self._lock:
                self._tiers[tier] = LoadedTier(runtime, nbytes, note)
                runtime = self._hold(tier, user)
            log.info("tier %s loaded; %s", tier, self.plan().reason())
            return runtime

    def release(self, user: Hashable) -> None:
        """``user`` is done with the tier it held (nothing if it held none)."""
        with self._lock:
            tier = self._holders.pop(user, None)
            if tier is not None and tier in self._tiers:
                self._tiers[tier].users -= 1

    def close(self) -> None:
        """Unload every tier (at shutdown, whoever holds them)."""
        for tier in self.loaded:
            self._unload(tier)

    def abandon(self) -> None:
        """Forget every tier without closing it (its close would wait on peers that are gone)."""
        with self._lock:
            self._tiers.clear()
            self._holders.clear()

    def _hold(self, tier: str, user: Hashable | None) -> Any:
        self._tiers.move_to_end(tier)
        if user is not None:
            self._holders[user] = tier
            self._tiers[tier].users += 1
        return self._tiers[tier].runtime

    def _make_room(self, tier: str, nbytes: int, note: str) -> None:
        """Unload idle tiers, least recently used first, until ``tier`` fits beside the rest."""
        while not self.plan((tier, nbytes, note)).fits:
            with self._lock:  # chosen and taken out at once: no request can start using it in between
                idle = next((name for name, loaded in self._tiers.items() if loaded.users == 0), None)
                busy = [name for name, loaded in self._tiers.items() if loaded.users > 0]
                victim = self._tiers.pop(idle) if idle is not None else None
            if victim is None:
                if busy:
                    raise ApiError(503, f"Tier {tier!r} does not fit in memory beside {', '.join(busy)}, which "
                                        f"{'is' if len(busy) == 1 else 'are'} serving requests "
                                        f"({self.plan((tier, nbytes, note)).reason()}); retry shortly.",
                                   type="server_error", param="model", code="tier_busy")
                return  # nothing else loaded: load() admits or refuses it on its own
            log.info("unloading tier %s (least recently used) to make room for tier %s", idle, tier)
            self._close(idle, victim)

    def _unload(self, tier: str) -> None:
        with self._lock:
            loaded = self._tiers.pop(tier, None)
        if loaded is not None:
            self._close(tier, loaded)

    def _close(self, tier: str, loaded: LoadedTier) -> None:
        log.info("closing tier %s", tier)
        loaded.runtime.close()
        self._on_unload(tier)  # its prompt caches only take memory now
