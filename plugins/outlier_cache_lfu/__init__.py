"""Built-in cache policy ``lfu``: evict the least frequently used entry (ties: least recent)."""

from collections import Counter
from itertools import count
from typing import Collection, Hashable

from outlier_runtime import hookimpl


class LFUPolicy:
    """Counts every use; counts survive eviction, so an expert that comes back keeps its history."""

    def __init__(self) -> None:
        self._uses: Counter[Hashable] = Counter()
        self._last_use: dict[Hashable, int] = {}
        self._clock = count()

    def accessed(self, key: Hashable) -> None:
        self._uses[key] += 1
        self._last_use[key] = next(self._clock)

    def evicted(self, key: Hashable) -> None:
        pass  # keep the count: frequency is a long-run property of the expert

    def choose_victim(self, candidates: Collection[Hashable]) -> Hashable:
        return min(candidates, key=lambda key: (self._uses[key], self._last_use.get(key, -1)))


@hookimpl
def register_cache_policies(register):
    register("lfu", LFUPolicy, "Evict the least frequently used expert (ties: least recent).")
