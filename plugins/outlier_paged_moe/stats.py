"""Paging statistics, per MoE layer and in total."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class LayerStats:
    """Counters of one MoE layer. lookups = slot_hits + ram_hits + misses."""

    #: Calls of the layer (one per forward step) and the host syncs they made: one per call
    #: for the routed ids, plus one per pass group and one per host-side prefetch guess; none
    #: on a layer that holds every expert (its calls are ``resident_calls``).
    calls: int = 0
    host_syncs: int = 0
    #: Calls on a layer holding every expert: the original module ran with no lookup and no sync.
    resident_calls: int = 0
    slot_hits: int = 0
    ram_hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    evictions: int = 0
    #: Evicted slot experts whose bytes moved into the RAM cache (the victim cache).
    victims_cached: int = 0
    passes: int = 0
    #: Copies of real token-expert pairs added so a pass runs the resident model's kernel.
    padded_rows: int = 0
    prefetched: int = 0
    prefetch_bytes: int = 0
    prefetch_used: int = 0
    #: Queued prefetches that a step needed before they started: cancelled, read as demand.
    prefetch_cancelled: int = 0

    def add(self, other: "LayerStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def lookups(self) -> int:
        return self.slot_hits + self.ram_hits + self.misses


def snapshot(layers: list[LayerStats], resident: list[int], expert_nbytes: list[int],
             ram_bytes: int, extra: dict[str, Any]) -> dict[str, Any]:
    """A JSON-able view: per-layer counters and totals with hit rates and resident bytes."""
    per_layer = []
    total = LayerStats()
    for number, stats in enumerate(layers):
        total.add(stats)
        row = asdict(stats)
        row.update(layer=number, lookups=stats.lookups, resident_experts=resident[number],
                   resident_bytes=resident[number] * expert_nbytes[number])
        per_layer.append(row)
    totals = asdict(total)
    lookups = total.lookups
    totals.update(
        lookups=lookups,
        hit_rate=(total.slot_hits + total.ram_hits) / lookups if lookups else 0.0,
        slot_hit_rate=total.slot_hits / lookups if lookups else 0.0,
        slot_resident_bytes=sum(r["resident_bytes"] for r in per_layer),
        ram_cache_bytes=ram_bytes,
        prefetch_wasted=total.prefetched - total.prefetch_used - total.prefetch_cancelled,
        host_syncs_per_call=total.host_syncs / total.calls if total.calls else 0.0,
        read_bandwidth_gbps=total.bytes_read / total.read_seconds / 1e9 if total.read_seconds else 0.0,
    )
    return {"total": totals, "layers": per_layer, **extra}
