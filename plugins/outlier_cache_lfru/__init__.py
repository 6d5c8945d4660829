"""Built-in cache policy ``lfru``: frequency-weighted recency, score = uses x weight + last use.

LRU forgets how often an expert is used, so a burst of rare experts flushes the popular ones;
LFU forgets when, so an expert that was popular long ago sits in the cache for good. ``lfru``
evicts the candidate with the lowest ``uses x weight + last_use``, where ``last_use`` counts
accesses to this cache: one more use is worth ``weight`` accesses of recency. ``weight = 0``
is LRU; a large weight approaches LFU. Counts survive eviction, as in ``lfu``.
"""

from typing import Collection, Hashable

from outlier_cache_lfu import LFUPolicy
from pydantic import Field

from outlier_runtime import PluginOptions, hookimpl


class LFRUPolicy(LFUPolicy):
    """Evict the lowest ``uses x weight + last use`` (ties: the least recently used)."""

    class Options(PluginOptions):
        """Set from a manifest: ``[paging] cache_policy_options = { weight = 4.0 }``."""

        weight: float = Field(
            default=4.0, ge=0.0,
            description="Accesses of recency one more use is worth (0: plain LRU; large: close to LFU).",
        )

    def __init__(self, weight: float = 4.0) -> None:
        super().__init__()  # the use counts and last uses are LFU's: only the scoring differs
        self.weight = weight

    def score(self, key: Hashable) -> float:
        """What keeping ``key`` is worth; never-seen keys score lowest."""
        return self._uses[key] * self.weight + self._last_use.get(key, -1)

    def choose_victim(self, candidates: Collection[Hashable]) -> Hashable:
        return min(candidates, key=lambda key: (self.score(key), self._last_use.get(key, -1)))


@hookimpl
def register_cache_policies(register):
    register("lfru", LFRUPolicy, "Evict the lowest uses x weight + recency (frequency-weighted LRU).")
