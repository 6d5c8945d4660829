"""The expert store: compute-ready slots per layer, an in-RAM cache of expert bytes, and reads.

Two memory levels, both bounded:
- slots: per MoE layer, ``S`` preallocated rows of each stacked expert tensor (mx arrays the
  unmodified switch module computes on). A slot is filled in place.
- RAM cache: expert records (the expert's tensors back to back, as bytes) keyed on
  (layer, expert), so an expert evicted from its slot can come back without touching disk.

A slot is marked valid only after its bytes were read and installed completely, so a failed
read never leaves a half-written expert that a later step would compute with.
"""

from __future__ import annotations

import threading
import time
import zlib
from typing import Any, Callable, Hashable

import mlx.core as mx
import numpy as np

from outlier_runtime.buffers import aligned_empty
from outlier_runtime.errors import ExpertReadError
from outlier_runtime.experts import ExpertIndex, ExpertLayer
from outlier_runtime.protocols import CachePolicy, Reader, ReadRequest

from .stats import LayerStats, snapshot

EMPTY = -1


def _footprint(record: np.ndarray) -> int:
    """Bytes a record keeps alive: its whole (padded, aligned) allocation, not just its view."""
    return record.base.nbytes if record.base is not None else record.nbytes


class RamCache:
    """Expert records in host memory, at most ``budget`` bytes; victims chosen by a policy."""

    def __init__(self, budget: int, policy: CachePolicy):
        self.budget = budget
        self.policy = policy
        self.used = 0
        self._records: dict[Hashable, np.ndarray] = {}

    def get(self, key: Hashable) -> np.ndarray | None:
        record = self._records.get(key)
        if record is not None:
            self.policy.accessed(key)
        return record

    def put(self, key: Hashable, record: np.ndarray) -> None:
        size = _footprint(record)
        if size > self.budget or key in self._records:
            return
        while self.used + size > self.budget:
            self.drop(self.policy.choose_victim(self._records.keys()))
        self._records[key] = record
        self.used += size
        self.policy.accessed(key)

    def drop(self, key: Hashable) -> None:
        record = self._records.pop(key, None)
        if record is not None:
            self.used -= _footprint(record)
            self.policy.evicted(key)

    def clear(self) -> None:
        for key in list(self._records):
            self.drop(key)


class LayerSlots:
    """``S`` compute-ready expert slots of one MoE layer, installed into its switch module."""

    def __init__(self, layer: ExpertLayer, num_slots: int, policy: CachePolicy):
        self.layer = layer
        self.num_slots = num_slots
        self.policy = policy
        self.buffers = [mx.zeros((num_slots, *t.expert_shape), dtype=t.dtype) for t in layer.tensors]
        self.expert_in_slot = [EMPTY] * num_slots
        self.slot_of: dict[int, int] = {}
        # Maps expert id -> slot for the current step; entries of absent experts are unused.
        self.lut = np.zeros(layer.num_experts, dtype=np.uint32)

    @property
    def resident(self) -> int:
        return len(self.slot_of)

    def key(self, expert: int) -> tuple[int, int]:
        return (self.layer.index, expert)

    def evict(self, slot: int) -> None:
        expert = self.expert_in_slot[slot]
        if expert != EMPTY:
            del self.slot_of[expert]
            self.expert_in_slot[slot] = EMPTY
            self.policy.evicted(self.key(expert))

    def install(self, slot: int, expert: int, record: np.ndarray) -> None:
        """Copy an expert record into ``slot``'s rows, then mark the slot valid."""
        raw = mx.array(record)  # one host->mx copy of the whole record
        for buffer, tensor, start in zip(self.buffers, self.layer.tensors, self.layer.record_offsets):
            piece = raw[start:start + tensor.expert_nbytes].view(tensor.dtype).reshape(tensor.expert_shape)
            buffer[slot] = piece  # in place: mlx donates the buffer when nothing else holds it
        self.expert_in_slot[slot] = expert
        self.slot_of[expert] = slot


def _verify(layer: ExpertLayer, expert: int, record: np.ndarray) -> None:
    """Compare a record with the CRC32 the pack recorded; a flipped byte is an error, not a result."""
    sums = layer.packed.checksums if layer.packed else None
    if sums is None:
        return
    if zlib.crc32(record) != sums[expert]:
        path = layer.packed.path
        raise ExpertReadError(
            f"{path}: expert {expert} of {layer.path} fails its checksum (corrupt disk or file); "
            f"rebuild the pack with `outlier pack`", path
        )


class ExpertStore:
    """Makes sure the experts a step needs are in slots, reading misses from RAM or disk."""

    def __init__(
        self,
        index: ExpertIndex,
        num_slots: int,
        ram_budget: int,
        reader: Reader,
        make_policy: Callable[[], CachePolicy],
        info: dict[str, Any] | None = None,
        verify_checksums: bool = False,
    ):
        self.index = index
        self.reader = reader
        self.layers = [LayerSlots(layer, min(num_slots, layer.num_experts), make_policy()) for layer in index.layers]
        self.ram = RamCache(ram_budget, make_policy())
        self.stats = [LayerStats() for _ in index.layers]
        self.info = dict(info or {})
        self.verify_checksums = verify_checksums
        self._lock = threading.RLock()

    def ensure(self, layer_number: int, experts: np.ndarray) -> np.ndarray:
        """Make ``experts`` (distinct ids, at most the layer's slot count) resident; return their slots."""
        with self._lock:
            slots = self.layers[layer_number]
            stats = self.stats[layer_number]
            wanted = [int(e) for e in experts]
            missing = [e for e in wanted if e not in slots.slot_of]
            stats.slot_hits += len(wanted) - len(missing)
            for expert in wanted:
                if expert in slots.slot_of:
                    slots.policy.accessed(slots.key(expert))
            if missing:
                targets = self._free_slots(slots, set(wanted), len(missing), stats)
                records = self._fetch(slots.layer, missing, stats)
                for expert, slot in zip(missing, targets):
                    slots.install(slot, expert, records[expert])
                    slots.policy.accessed(slots.key(expert))
            return np.fromiter((slots.slot_of[e] for e in wanted), dtype=np.uint32, count=len(wanted))

    def _free_slots(self, slots: LayerSlots, pinned: set[int], count: int, stats: LayerStats) -> list[int]:
        free = [s for s, e in enumerate(slots.expert_in_slot) if e == EMPTY][:count]
        while len(free) < count:
            candidates = {slots.key(e) for e in slots.slot_of if e not in pinned}
            _, victim = slots.policy.choose_victim(candidates)
            slot = slots.slot_of[victim]
            slots.evict(slot)
            stats.evictions += 1
            free.append(slot)
        return free

    def _fetch(self, layer: ExpertLayer, experts: list[int], stats: LayerStats) -> dict[int, np.ndarray]:
        """Records of ``experts``: from the RAM cache when there, else one batch of disk reads."""
        records: dict[int, np.ndarray] = {}
        to_read = []
        for expert in experts:
            record = self.ram.get((layer.index, expert))
            if record is not None:
                records[expert] = record
                stats.ram_hits += 1
            else:
                to_read.append(expert)
        if to_read:
            buffers = {expert: aligned_empty(layer.read_nbytes) for expert in to_read}
            requests = []
            for expert, buffer in buffers.items():
                view = memoryview(buffer)
                for path, offset, length, start in layer.read_ranges(expert):
                    requests.append(ReadRequest(path, offset, length, view[start:start + length]))
            started = time.perf_counter()
            self.reader.read(requests)  # raises before anything is marked valid
            stats.read_seconds += time.perf_counter() - started
            stats.misses += len(to_read)
            stats.bytes_read += layer.expert_nbytes * len(to_read)
            for expert, buffer in buffers.items():
                record = buffer[:layer.expert_nbytes]
                if self.verify_checksums:
                    _verify(layer, expert, record)
                self.ram.put((layer.index, expert), record)
                records[expert] = record
        return records

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = [LayerStats() for _ in self.layers]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return snapshot(
                self.stats,
                [slots.resident for slots in self.layers],
                [slots.layer.expert_nbytes for slots in self.layers],
                self.ram.used,
                {"config": {**self.info, "reader_io": getattr(self.reader, "stats", {})}},
            )

    def close(self) -> None:
        with self._lock:
            self.ram.clear()
            self.reader.close()
