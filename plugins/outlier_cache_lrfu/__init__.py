"""Built-in cache policy ``lrfu``: least recently/frequently used, with uses that go stale.

Each use of an expert counts 1 when it happens and half as much every ``half_life`` accesses
to this cache after that; the victim is the candidate whose decayed count is lowest. A short
half-life ranks by the last use (LRU), a long one by the count of uses (LFU). Unlike ``lfru``,
whose counts never shrink, an expert's old popularity fades on its own: what ranks is how
much it was used lately, the routing statistic the engine sees on every step.

The decayed count is kept in the log domain (``log2(count) + last_use / half_life``), so
comparing two experts needs no rescaling of every count on every access.
"""

from __future__ import annotations

import math
from itertools import count
from typing import Collection, Hashable

from pydantic import Field

from outlier_runtime import PluginOptions, hookimpl


class LRFUPolicy:
    """Evict the lowest use count decayed by half every ``half_life`` accesses (ties: least recent)."""

    class Options(PluginOptions):
        """Set from a manifest: ``[paging] cache_policy_options = { half_life = 100 }``."""

        half_life: float = Field(
            default=100.0, gt=0.0,
            description="Accesses to the cache after which a use counts half (small: LRU; large: LFU).",
        )

    def __init__(self, half_life: float = 100.0) -> None:
        self.half_life = half_life
        self._decayed: dict[Hashable, float] = {}  # the count at the key's last use
        self._last_use: dict[Hashable, int] = {}
        self._clock = count()

    def accessed(self, key: Hashable) -> None:
        now = next(self._clock)
        last = self._last_use.get(key)
        before = 0.0 if last is None else self._decayed[key] * 2.0 ** (-(now - last) / self.half_life)
        self._decayed[key] = 1.0 + before
        self._last_use[key] = now

    def evicted(self, key: Hashable) -> None:
        pass  # the decayed count keeps fading on its own; an expert that comes back keeps it

    def score(self, key: Hashable) -> float:
        """log2 of the decayed count, shifted by the same amount for every key (never seen: lowest)."""
        if key not in self._last_use:
            return -math.inf
        return math.log2(self._decayed[key]) + self._last_use[key] / self.half_life

    def choose_victim(self, candidates: Collection[Hashable]) -> Hashable:
        return min(candidates, key=lambda key: (self.score(key), self._last_use.get(key, -1)))


@hookimpl
def register_cache_policies(register):
    register("lrfu", LRFUPolicy, "Evict the lowest use count, each use decaying by half every half_life accesses.")
