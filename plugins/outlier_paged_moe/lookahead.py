"""Reading the next MoE layer's likely experts ahead, without a host sync of its own.

A prefetcher with a ``guess`` method returns its guess as a lazy mx array; the paged switch
evaluates it together with the routed ids it must read anyway, so guessing costs no extra
host sync (on Metal each sync stalls the GPU pipeline). A prefetcher with only ``predict``
reads its guess on the host itself: one more sync per layer, counted as such.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from outlier_runtime.core.protocols import Prefetcher

from .store import ExpertStore


class NextLayerLookahead:
    """Starts reads of MoE layer ``layer + 1`` from a prefetcher's guess made on layer ``layer``."""

    def __init__(self, store: ExpertStore, prefetcher: Prefetcher, layer: int, next_block: Any):
        self.store = store
        self.prefetcher = prefetcher
        self.layer = layer
        self.next_block = next_block

    def guess(self, hidden: mx.array) -> mx.array | None:
        """The guess as a lazy array of expert ids, or None (no guess, or ``predict`` only)."""
        guess = getattr(self.prefetcher, "guess", None)
        return guess(self.layer, hidden, self.next_block) if callable(guess) else None

    def start(self, hidden: mx.array, guessed: np.ndarray | None) -> None:
        """Queue background reads of the guessed experts (``guessed`` already read on the host)."""
        if guessed is not None:
            experts = np.unique(guessed).tolist()
        elif callable(getattr(self.prefetcher, "guess", None)):
            return  # it had nothing to guess for this call
        else:
            experts = self.prefetcher.predict(self.layer, hidden, self.next_block)
            self.store.stats[self.layer].host_syncs += 1
        check = getattr(self.prefetcher, "check_ids", None)  # guarded plugins: ids must exist
        if check is not None:
            experts = check(self.layer, experts, self.store.layers[self.layer + 1].layer.num_experts)
        depth = getattr(self.prefetcher, "depth", None)  # most reads of a layer queued at once
        if depth:
            self.store.prefetch(self.layer + 1, experts, depth=depth)
        else:
            self.store.prefetch(self.layer + 1, experts)
