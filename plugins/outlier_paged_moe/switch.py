"""The paged switch layer: learns the routed expert ids, makes them resident, computes exactly.

It keeps the model's own switch module (SwitchGLU, SwitchMLP, ...) and only swaps its
stacked expert tensors for the layer's slot buffers. The routed expert ids are remapped to
slot ids, so the module runs the same ``gather_qmm``/``gather_mm`` computation on the same
bytes. mlx picks the kernel of such a call from its shapes, including the number of experts
in the weight tensor (the slot count here), so each call is sized to run the kernel the
resident model runs (outlier_runtime/engine/kernels.py): the result is bit-identical.

A layer with a slot for every expert pays none of this: its first call installs expert ``e``
in slot ``e``, after which the slot buffers are the stacked tensors in their original order,
and every call runs the original module on the original ids (no host sync, no remap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from outlier_runtime.core.errors import ExactnessError
from outlier_runtime.engine.kernels import (
    GPU,
    Backend,
    device_rule,
    engine_call,
    kernel_for,
    pass_row_range,
    split_rows,
)

from .lookahead import NextLayerLookahead
from .store import ExpertStore


@dataclass
class KernelPlan:
    """How one call was computed: the resident model's kernel and each pass's (rows, padded, kernel)."""

    target: str
    passes: list[tuple[int, int, str]] = field(default_factory=list)


class PagedSwitch(nn.Module):
    """Stands in for a switch module; the original runs on slot buffers."""

    def __init__(self, inner: nn.Module, store: ExpertStore, layer: int,
                 lookahead: NextLayerLookahead | None = None,
                 kernel_backend: Backend | None = None):
        super().__init__()
        # Plain attributes (not children): the slot buffers are a cache, not model parameters.
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_store", store)
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_lookahead", lookahead)
        # Imported here: listing plugins must not import mlx-lm (and its transformers).
        from mlx_lm.models.switch_layers import QuantizedSwitchLinear

        object.__setattr__(self, "_quantized",
                           any(isinstance(m, QuantizedSwitchLinear) for _, m in inner.named_modules()))
        # The kernel rule to plan for; tests plan for Metal on CPU, where any plan is exact.
        backend, nax = device_rule()
        object.__setattr__(self, "kernel_backend", kernel_backend or backend)
        object.__setattr__(self, "nax", nax and self.kernel_backend == GPU)
        object.__setattr__(self, "last_plan", None)
        # Nothing to page when every expert has a slot (and, with a prefetcher, the next layer's
        # too: a guess would have nothing to read either).
        object.__setattr__(self, "_all_fit", all(
            s.num_slots == s.layer.num_experts
            for s in store.layers[layer:layer + (1 if lookahead is None else 2)]))
        object.__setattr__(self, "_filled", False)
        object.__setattr__(self, "_kernels", {})

    def _kernel(self, rows: int, experts: int) -> str:
        """The kernel mlx runs for a call of ``rows`` pairs on ``experts`` stacked experts: a pure
        function of the shape and the rule, asked twice per call, so computed once per shape."""
        key = (rows, experts, self.kernel_backend, self.nax)  # tests may switch the rule
        kernel = self._kernels.get(key)
        if kernel is None:
            call = engine_call(rows, experts, self._quantized, self.nax)
            kernel = self._kernels[key] = kernel_for(call, self.kernel_backend)
        return kernel

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        if self._all_fit:
            return self._resident_call(x, indices)
        guess = self._lookahead.guess(x) if self._lookahead is not None else None
        # The one host sync per MoE layer: we must know the ids to fetch the experts. The
        # prefetcher's guess for the next layer is evaluated with them, so it costs no sync.
        mx.eval(indices, *(() if guess is None else (guess,)))
        stats = self._store.stats[self._layer]
        stats.calls += 1
        stats.host_syncs += 1
        ids = np.asarray(indices)
        needed = np.unique(ids)
        slots = self._store.layers[self._layer]
        target = self._kernel(ids.size, slots.layer.num_experts)
        if needed.size <= slots.num_slots and self._kernel(ids.size, slots.num_slots) == target:
            slots.lut[needed] = self._store.ensure(self._layer, needed)
            out = self._inner(x, mx.array(slots.lut[ids]))
            self.last_plan = KernelPlan(target, [(ids.size, ids.size, target)])
        else:
            out = self._in_passes(x, ids, needed, target)
        if self._lookahead is not None:
            # Start the next layer's likely reads now; they overlap with this layer's compute.
            self._lookahead.start(x, None if guess is None else np.asarray(guess))
        return out

    def _resident_call(self, x: mx.array, indices: mx.array) -> mx.array:
        """The original module on the original ids: every expert sits in the slot of its own id.

        Exact by construction: slot ``e`` holds expert ``e``'s bytes, so the slot buffers are the
        resident model's stacked tensors (same shapes, same order) and mlx runs the same kernel on
        the same bytes. The ids are never read on the host, so the call adds no host sync.
        """
        stats = self._store.stats[self._layer]
        if not self._filled:
            # The first call reads the whole layer (the store puts expert e in slot e when there is
            # a slot per expert), counted as the lookups and reads they are. A failed read raises
            # here and the next call tries again.
            experts = self._store.layers[self._layer].layer.num_experts
            placed = self._store.ensure(self._layer, np.arange(experts))
            if not np.array_equal(placed, np.arange(experts)):
                raise ExactnessError(f"MoE layer {self._layer}: experts are not in the slots of their ids; "
                                     f"the original module cannot run on them")
            object.__setattr__(self, "_filled", True)
        stats.calls += 1
        stats.resident_calls += 1
        target = self._kernel(indices.size, self._store.layers[self._layer].num_slots)
        self.last_plan = KernelPlan(target, [(indices.size, indices.size, target)])
        return self._inner(x, indices)

    def _in_passes(self, x: mx.array, ids: np.ndarray, needed: np.ndarray, target: str) -> mx.array:
        """Compute slot-sized groups of experts in turn, each in calls that run ``target``.

        A call's kernel depends on its row count and the slot count (see
        outlier_runtime/engine/kernels.py), so each group's token-expert pairs are cut into
        calls whose size selects the resident model's kernel, padded with copies of a real
        pair where a call must be larger. Within one kernel a row's result does not depend on
        the other rows, so every output row is computed exactly as the resident model does.
        """
        slots = self._store.layers[self._layer]
        row_range = pass_row_range(target, slots.num_slots, self.kernel_backend, self._quantized, self.nax)
        if row_range is None:
            raise ExactnessError(
                f"MoE layer {self._layer}: no call on {slots.num_slots} expert slot(s) runs mlx's "
                f"{target!r} kernel as the resident model does; raise k_override (paging.k_override)"
            )
        k = ids.shape[-1]
        flat = ids.reshape(-1)
        tokens = x.reshape(-1, x.shape[-1])
        plan = KernelPlan(target)
        pieces, positions = [], []
        groups = np.array_split(needed, math.ceil(needed.size / slots.num_slots))
        for number, group in enumerate(groups):
            slots.lut[group] = self._store.ensure(self._layer, group)
            group_rows = np.flatnonzero(np.isin(flat, group))
            start = 0
            for real, padded in split_rows(group_rows.size, *row_range):
                rows = group_rows[start:start + real]
                start += real
                if padded > real:
                    rows = np.concatenate([rows, np.full(padded - real, rows[-1])])
                ran = self._kernel(padded, slots.num_slots)
                if __debug__ and ran != target:
                    raise AssertionError(f"layer {self._layer}: a pass of {padded} rows runs {ran}, not {target}")
                self._store.stats[self._layer].passes += 1
                self._store.stats[self._layer].padded_rows += padded - real
                plan.passes.append((real, padded, ran))
                out = self._inner(tokens[mx.array(rows // k)], mx.array(slots.lut[flat[rows]][:, None]))
                pieces.append(out[:real, 0])
                positions.append(rows[:real])
            if number + 1 < len(groups):
                # Evaluate before the next group refills the slots this one reads, so mlx can
                # update them in place (a host sync). The last group needs none: mlx's updates
                # are functional, so a later refill never changes what this output reads.
                mx.eval(pieces)
                self._store.stats[self._layer].host_syncs += 1
        self.last_plan = plan
        order = np.argsort(np.concatenate(positions))
        result = mx.concatenate(pieces)[mx.array(order)]
        return result.reshape(*ids.shape, result.shape[-1])
