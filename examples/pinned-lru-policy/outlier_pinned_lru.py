"""Cache policy ``pinned-lru``: pin the most-used cached experts, evict the rest LRU first.

Plain LRU throws out an expert that the router picks on almost every token as soon as a
burst of rarely used ones passes through. This policy counts every use of every key and
does not evict the most-used cached entries (the top ``pinned``, at most half the cache)
while another candidate can go; among the others it evicts the least recently used.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from typing import ClassVar, Collection, Hashable

from pydantic import Field

from outlier_runtime import PluginOptions, hookimpl

__version__ = "0.1.0"


class PinnedLRUPolicy:
    """Spare the ``pinned`` most-used cached keys; among the rest, evict the least recently used."""

    #: Counters summed over every instance in this process. The paged engine makes one policy
    #: per cache (one per MoE layer, plus the RAM cache), so totals are what a test can read.
    totals: ClassVar[Counter] = Counter()

    class Options(PluginOptions):
        """Set from a manifest: ``[paging] cache_policy_options = { pinned = 8 }``."""

        pinned: int = Field(default=4, ge=0, description="How many of the most-used cached experts to spare.")

    def __init__(self, pinned: int = 4) -> None:
        self.pinned = pinned
        self.uses: Counter = Counter()  # every use since the policy was made, evicted or not
        self._recency: OrderedDict[Hashable, None] = OrderedDict()  # cached keys, oldest use first
        self.victims_chosen = 0
        self.pinned_spared = 0  # choices where plain LRU would have evicted a pinned key
        self.all_pinned = 0  # every candidate was pinned, so the least recently used went

    def accessed(self, key: Hashable) -> None:
        self.uses[key] += 1
        self._recency[key] = None
        self._recency.move_to_end(key)

    def evicted(self, key: Hashable) -> None:
        self._recency.pop(key, None)

    def pinned_keys(self) -> set[Hashable]:
        """The most-used cached keys (on a tie, the more recently used).

        At most ``pinned`` of them, and never more than half of what is cached, so that a
        small cache (a few compute slots) still turns over instead of freezing.
        """
        count = min(self.pinned, len(self._recency) // 2)
        return set(heapq.nlargest(count, reversed(self._recency), key=self.uses.__getitem__))

    def choose_victim(self, candidates: Collection[Hashable]) -> Hashable:
        self._count("victims_chosen")
        for key in candidates:
            if key not in self._recency:
                return key  # never used: nothing argues for keeping it
        pinned = self.pinned_keys()
        oldest_first = [key for key in self._recency if key in candidates]
        unpinned = [key for key in oldest_first if key not in pinned]
        if not unpinned:  # the cache must still make room
            self._count("all_pinned")
            return oldest_first[0]
        if unpinned[0] != oldest_first[0]:  # plain LRU would have evicted a pinned key here
            self._count("pinned_spared")
        return unpinned[0]

    def _count(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)
        self.totals[name] += 1


@hookimpl
def register_cache_policies(register):
    register("pinned-lru", PinnedLRUPolicy, "Pin the most-used experts; evict the rest least recently used first.")
