"""The paged tier's memory plan: non-expert weights, KV cache, expert slots, RAM cache and read
buffers, sized from the checkpoint itself and checked against what this machine has free.

``cache_gb`` bounds every expert byte the engine holds: the slots, the RAM cache and the
records in flight (a step's reads, prefetches, an evicted expert on its way to the RAM
cache). Slots come first, ``k_override`` per layer, each with room for one record in flight
(a step reads at most one record per slot); what is left is the RAM cache's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from outlier_runtime.core.memory import GB, MemoryPlan, PlanLine

from .options import PagedMoEOptions
from .records import record_stride

log = logging.getLogger(__name__)


@dataclass
class ExpertLayout:
    """What the plan needs to know of the experts: per MoE layer, bytes and read length of one."""

    num_experts: list[int]
    expert_nbytes: list[int]
    read_nbytes: list[int]

    @property
    def slot_row_bytes(self) -> int:
        """One slot in every layer."""
        return sum(self.expert_nbytes)

    @property
    def largest_record(self) -> int:
        return max(record_stride(n) for n in self.read_nbytes)

    def slot_bytes(self, slots: int) -> int:
        return sum(n * min(slots, e) for n, e in zip(self.expert_nbytes, self.num_experts))

    def everything_bytes(self, slots: int) -> int:
        """Slots plus every other expert in the RAM cache plus a step's reads: nothing left to page."""
        rest = sum(record_stride(r) * max(0, e - slots) for r, e in zip(self.read_nbytes, self.num_experts))
        return self.slot_bytes(slots) + rest + slots * self.largest_record


@dataclass
class PagedBudget:
    """How ``cache_gb`` is split, and the plan it belongs to."""

    slots_per_layer: int
    cache_bytes: int
    #: The RAM cache's budget, shared with records in flight (cache minus slots).
    ram_budget: int
    plan: MemoryPlan


def plan_paged(options: PagedMoEOptions, layout: ExpertLayout, non_expert_bytes: int, kv_bytes: int,
               context_window: int, available: int, headroom: int,
               reserved: list[PlanLine] | None = None) -> PagedBudget:
    """The split of ``cache_gb`` (a number, or ``"auto"``: what memory allows) and the plan.

    ``reserved`` lines (the server's prompt cache) are memory held beside the model: they are
    lines of the plan, and ``"auto"`` leaves room for them."""
    notes: list[str] = []
    warnings: list[str] = []
    problem = None
    reserved = list(reserved or [])
    reserved_bytes = sum(line.bytes for line in reserved)
    most = max(layout.num_experts)
    per_slot = layout.slot_row_bytes + layout.largest_record  # a slot in each layer + its read
    free_for_cache = available - headroom - non_expert_bytes - kv_bytes - reserved_bytes
    if kv_bytes > available - headroom:
        problem = (f"the KV cache of a {context_window}-token context window alone needs {kv_bytes / GB:.2f} GB, "
                   f"more than the {(available - headroom) / GB:.2f} GB available after headroom; "
                   f"lower generation.context_window")
    wanted_slots = min(options.k_override, most)
    if options.cache_gb == "auto":
        cache = max(0, min(free_for_cache, layout.everything_bytes(wanted_slots)))
        notes.append(
            f"cache_gb auto = {cache / GB:.3f} GB: {available / GB:.1f} GB available - {headroom / GB:.1f} GB "
            f"headroom - {non_expert_bytes / GB:.2f} GB non-expert weights - {kv_bytes / GB:.2f} GB KV cache"
            + "".join(f" - {line.bytes / GB:.2f} GB {line.name}" for line in reserved)
            + (", capped at every expert cached" if cache == layout.everything_bytes(wanted_slots) else ""))
    else:
        cache = int(options.cache_gb * GB)
    slots = wanted_slots if wanted_slots * per_slot <= cache else cache // per_slot
    if slots < 1:
        problem = problem or (
            f"cache_gb = {_gb(cache)} GB is below one expert slot per layer with its read buffer "
            f"({per_slot / GB:.4f} GB for {len(layout.num_experts)} MoE layers); raise paging.cache_gb"
            + (" or free memory" if options.cache_gb == "auto" else " or set it to \"auto\""))
        slots = 1  # what a forced load runs with
    elif slots < options.k_override and slots < most:
        warnings.append(f"cache_gb = {_gb(cache)} GB holds {slots} slots per layer, fewer than "
                     f"k_override = {options.k_override}; raise cache_gb for more")
    slot_bytes = layout.slot_bytes(slots)
    ram = max(0, cache - slot_bytes)
    lines = [
        PlanLine("non-expert weights", non_expert_bytes, "from the checkpoint headers"),
        PlanLine("KV cache", kv_bytes, f"{context_window}-token context window"),
        PlanLine("expert slots", slot_bytes, f"{slots} per layer x {len(layout.num_experts)} MoE layers"),
        PlanLine("RAM cache + read buffers", ram, "records cached or in flight, counted as taken"),
        *reserved,
    ]
    plan = MemoryPlan(lines, available, headroom, notes, warnings, problem,
                      knob="paging.cache_gb (or generation.context_window)")
    return PagedBudget(slots, cache, ram, plan)


def _gb(value: int) -> str:
    return f"{value / GB:.4g}"

