"""Built-in prefetcher ``next-layer-router``: run the next layer's router on this layer's input.

The residual stream changes little from one layer to the next, so the next layer's router
applied to the current hidden state guesses its experts well (the mixtral-offloading idea).
"""

from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from pydantic import Field

from outlier_runtime import PluginOptions, hookimpl
from outlier_runtime.engine.experts import TOP_K_ATTRIBUTES

ROUTER_ATTRIBUTES = ("gate", "router")


class NextLayerRouterPrefetcher:
    """Predicts the top ``extra + top_k`` experts of the next layer for the current tokens."""

    class Options(PluginOptions):
        extra: int = Field(default=0, ge=0, description="Experts to read beyond the router's top-k.")
        max_tokens: int = Field(default=1, ge=1,
                                description="Guess only for steps of at most this many tokens (decode).")
        depth: int = Field(default=0, ge=0,
                           description="Most guessed reads of a layer queued or in flight at once "
                                       "(0: the layer's slot count).")

    def __init__(self, extra: int = 0, max_tokens: int = 1, depth: int = 0):
        self.extra = extra
        self.depth = depth
        # Only decode steps (few tokens) are worth guessing for; prefill reads everything anyway.
        self.max_tokens = max_tokens

    def guess(self, layer: int, hidden: Any, next_block: Any) -> mx.array | None:
        """The guess as a lazy array of expert ids: the engine reads it with its own host sync."""
        router = next((getattr(next_block, n) for n in ROUTER_ATTRIBUTES if callable(getattr(next_block, n, None))), None)
        tokens = hidden.reshape(-1, hidden.shape[-1])
        if router is None or tokens.shape[0] > self.max_tokens:
            return None
        scores = router(tokens)
        if isinstance(scores, tuple):
            # DeepSeek-V3 / GLM4-MoE style gates return (expert ids, weights), already top-k.
            if not scores or not mx.issubdtype(scores[0].dtype, mx.integer):
                return None
            return scores[0].reshape(-1)
        top_k = next((getattr(next_block, n) for n in TOP_K_ATTRIBUTES
                      if isinstance(getattr(next_block, n, None), int)), None)
        if top_k is None:
            return None
        count = min(top_k + self.extra, scores.shape[-1])
        return mx.argpartition(-scores, kth=count - 1, axis=-1)[..., :count].reshape(-1)

    def predict(self, layer: int, hidden: Any, next_block: Any) -> Sequence[int]:
        guess = self.guess(layer, hidden, next_block)
        return [] if guess is None else np.unique(np.asarray(guess)).tolist()


@hookimpl
def register_prefetchers(register):
    register("next-layer-router", NextLayerRouterPrefetcher,
             "Read ahead the experts the next layer's router picks for this layer's input.")
