"""Built-in cache policy ``lru``: evict the least recently used entry."""

from collections import OrderedDict
from typing import Collection, Hashable

from outlier_runtime import hookimpl


class LRUPolicy:
    """Least recently used first. An OrderedDict keeps keys from oldest to newest use."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def accessed(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def evicted(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def choose_victim(self, candidates: Collection[Hashable]) -> Hashable:
        for key in self._order:
            if key in candidates:
                return key
        return next(iter(candidates))  # never seen: any candidate is as old as another


@hookimpl
def register_cache_policies(register):
    register("lru", LRUPolicy, "Evict the least recently used expert.")
