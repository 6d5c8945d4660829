"""The paged switch layer: learns the routed expert ids, makes them resident, computes exactly.

It keeps the model's own switch module (SwitchGLU, SwitchMLP, ...) and only swaps its
stacked expert tensors for the layer's slot buffers. The routed expert ids are remapped to
slot ids, so the module runs the very same ``gather_qmm``/``gather_mm`` calls, with the same
sorting decision, on the same bytes: the result is bit-identical to the resident model.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .store import ExpertStore

#: mlx-lm's switch modules sort token-expert pairs by expert when indices.size >= 64.
SORT_THRESHOLD = 64


class PagedSwitch(nn.Module):
    """Stands in for a switch module; the original runs on slot buffers."""

    def __init__(self, inner: nn.Module, store: ExpertStore, layer: int,
                 prefetch: Callable[[mx.array], None] | None = None):
        super().__init__()
        # Plain attributes (not children): the slot buffers are a cache, not model parameters.
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_store", store)
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_prefetch", prefetch)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # The one host sync per MoE layer: we must know the ids to fetch the experts.
        ids = np.asarray(indices)
        needed = np.unique(ids)
        slots = self._store.layers[self._layer]
        if needed.size <= slots.num_slots:
            slots.lut[needed] = self._store.ensure(self._layer, needed)
            out = self._inner(x, mx.array(slots.lut[ids]))
        else:
            out = self._in_passes(x, ids, needed)
        if self._prefetch is not None:
            # Start the next layer's likely reads now; they overlap with this layer's compute.
            self._prefetch(x)
        return out

    def _in_passes(self, x: mx.array, ids: np.ndarray, needed: np.ndarray) -> mx.array:
        """More distinct experts than slots: compute slot-sized groups of experts in turn.

        Each pass computes only the token-expert pairs of its group, with the same sorting
        decision the whole call would have made, so every output row is computed exactly as
        the resident model computes it.
        """
        slots = self._store.layers[self._layer]
        k = ids.shape[-1]
        flat = ids.reshape(-1)
        tokens = x.reshape(-1, x.shape[-1])
        sort_like_whole = ids.size >= SORT_THRESHOLD
        pieces, positions = [], []
        for group in np.array_split(needed, math.ceil(needed.size / slots.num_slots)):
            slots.lut[group] = self._store.ensure(self._layer, group)
            self._store.stats[self._layer].passes += 1
            rows = np.flatnonzero(np.isin(flat, group))
            count = rows.size
            if sort_like_whole and count < SORT_THRESHOLD:
                # Pad with copies of the last pair so the module sorts, as the whole call would.
                rows = np.concatenate([rows, np.full(SORT_THRESHOLD - count, rows[-1])])
            out = self._inner(tokens[mx.array(rows // k)], mx.array(slots.lut[flat[rows]][:, None]))
            out = out[:count, 0]
            # Evaluate now: the next group may overwrite the slots this one reads.
            mx.eval(out)
            pieces.append(out)
            positions.append(rows[:count])
        order = np.argsort(np.concatenate(positions))
        result = mx.concatenate(pieces)[mx.array(order)]
        return result.reshape(*ids.shape, result.shape[-1])
