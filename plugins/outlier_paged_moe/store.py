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

import logging
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Hashable, Iterable

import mlx.core as mx
import numpy as np

from outlier_runtime.engine.buffers import aligned_empty
from outlier_runtime.core.errors import ExpertReadError
from outlier_runtime.engine.experts import ExpertIndex, ExpertLayer
from outlier_runtime.core.protocols import CachePolicy, Reader, ReadRequest

from .stats import LayerStats, snapshot

log = logging.getLogger(__name__)

EMPTY = -1
#: A failed batch read is tried this many times in all before its error reaches the caller.
READ_ATTEMPTS = 3
RETRY_BACKOFF_SECONDS = 0.01


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

    def __contains__(self, key: Hashable) -> bool:
        return key in self._records

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


def _result_or_none(future: Future) -> np.ndarray | None:
    """A prefetch's record, or None if its read failed (the demand path then reads it again)."""
    try:
        return future.result()
    except Exception:  # noqa: BLE001 - a failed guess must never fail the step that did not need it
        return None


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


def checksum_coverage(index: ExpertIndex, verify: bool) -> str:
    """What ``verify_checksums`` covers here, in words (shown as the engine's ``checksums``)."""
    packed = [layer for layer in index.layers if layer.packed is not None]
    if not verify:
        return "off"
    if not packed:
        return "no pack in use: expert bytes come from the shards, which carry no checksums"
    bare = [layer for layer in packed if layer.packed.checksums is None]
    if bare:
        return (f"nothing to verify: the pack at {bare[0].packed.path} has no checksums (built with "
                f"--no-checksums); rebuild it with `outlier pack` to verify expert records")
    return "verified"


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
        self.info["checksums"] = checksum_coverage(index, verify_checksums)
        if self.info["checksums"].startswith("nothing to verify: the pack"):
            # Asked for, but the pack has nothing to compare with: say so, never verify nothing silently.
            log.warning("verify_checksums is on, but %s", self.info["checksums"])
        self._lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: dict[tuple[int, int], Future] = {}
        #: Prefetched records in the RAM cache that no step has used yet.
        self._prefetched: set[tuple[int, int]] = set()
        self.read_retries = 0

    def ensure(self, layer_number: int, experts: np.ndarray) -> np.ndarray:
        """Make ``experts`` (distinct ids, at most the layer's slot count) resident; return their slots."""
        with self._lock:
            slots = self.layers[layer_number]
            stats = self.stats[layer_number]
            wanted = [int(e) for e in experts]
            missing = []
            for expert in wanted:
                if expert in slots.slot_of:
                    slots.policy.accessed(slots.key(expert))
                else:
                    missing.append(expert)
            stats.slot_hits += len(wanted) - len(missing)
            if missing:
                targets = self._free_slots(slots, set(wanted), len(missing), stats)
                records = self._fetch(slots.layer, missing, stats)
                for expert, slot in zip(missing, targets):
                    slots.install(slot, expert, records[expert])
                    slots.policy.accessed(slots.key(expert))
            return np.fromiter((slots.slot_of[e] for e in wanted), dtype=np.uint32, count=len(wanted))

    def _free_slots(self, slots: LayerSlots, pinned: set[int], count: int, stats: LayerStats) -> list[int]:
        free = [s for s, e in enumerate(slots.expert_in_slot) if e == EMPTY][:count]
        candidates = {slots.key(e) for e in slots.slot_of if e not in pinned} if len(free) < count else set()
        while len(free) < count:
            victim_key = slots.policy.choose_victim(candidates)
            candidates.discard(victim_key)
            _, victim = victim_key
            slot = slots.slot_of[victim]
            slots.evict(slot)
            stats.evictions += 1
            free.append(slot)
        return free

    def _fetch(self, layer: ExpertLayer, experts: list[int], stats: LayerStats) -> dict[int, np.ndarray]:
        """Records of ``experts``: from the RAM cache or a prefetch in flight, else one batch of reads."""
        self._harvest_prefetches()
        records: dict[int, np.ndarray] = {}
        to_read = []
        for expert in experts:
            key = (layer.index, expert)
            pending = self._inflight.pop(key, None)
            if pending is not None:
                record = _result_or_none(pending)  # waits for the read; a failed one is retried below
                if record is not None:
                    self.ram.put(key, record)
                    records[expert] = record
                    stats.ram_hits += 1
                    stats.prefetch_used += 1
                    continue
            record = self.ram.get(key)
            if record is not None:
                records[expert] = record
                stats.ram_hits += 1
                if key in self._prefetched:
                    stats.prefetch_used += 1
                    self._prefetched.discard(key)
            else:
                to_read.append(expert)
        if to_read:
            self._prefetched.difference_update((layer.index, e) for e in to_read)
            started = time.perf_counter()
            fresh = self._read(layer, to_read)  # raises before anything is marked valid
            stats.read_seconds += time.perf_counter() - started
            stats.misses += len(to_read)
            stats.bytes_read += layer.expert_nbytes * len(to_read)
            for expert, record in fresh.items():
                self.ram.put((layer.index, expert), record)
            records.update(fresh)
        return records

    def _read(self, layer: ExpertLayer, experts: list[int]) -> dict[int, np.ndarray]:
        """Read whole expert records, retrying a failed batch a bounded number of times.

        Disks and network filesystems fail transiently (EIO, short reads); a file that is
        really gone or truncated fails every attempt and the last error is raised.
        """
        for attempt in range(READ_ATTEMPTS):
            try:
                return self._read_once(layer, experts)
            except ExpertReadError:
                if attempt + 1 == READ_ATTEMPTS:
                    raise
                self.read_retries += 1
                time.sleep(RETRY_BACKOFF_SECONDS * (attempt + 1))
        raise AssertionError("unreachable")

    def _read_once(self, layer: ExpertLayer, experts: list[int]) -> dict[int, np.ndarray]:
        """Read whole expert records in one reader call (thread safe: touches no cache state)."""
        buffers = {expert: aligned_empty(layer.read_nbytes) for expert in experts}
        requests = []
        for expert, buffer in buffers.items():
            view = memoryview(buffer)
            for path, offset, length, start in layer.read_ranges(expert):
                requests.append(ReadRequest(path, offset, length, view[start:start + length]))
        self.reader.read(requests)
        records = {}
        for expert, buffer in buffers.items():
            records[expert] = buffer[:layer.expert_nbytes]
            if self.verify_checksums:
                _verify(layer, expert, records[expert])
        return records

    def prefetch(self, layer_number: int, experts: Iterable[int]) -> None:
        """Start reading experts of a layer that will probably be needed soon, in the background.

        Finished reads land in the RAM cache, so prefetching needs a RAM-cache budget.
        """
        if self.ram.budget == 0:
            return
        with self._lock:
            self._harvest_prefetches()
            slots = self.layers[layer_number]
            wanted = [
                int(e) for e in experts
                if int(e) not in slots.slot_of and (layer_number, int(e)) not in self._inflight
                and (layer_number, int(e)) not in self.ram
            ]
            if not wanted:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outlier-prefetch")
            layer = slots.layer
            stats = self.stats[layer_number]
            for expert in wanted:
                self._inflight[(layer_number, expert)] = self._executor.submit(
                    lambda e=expert: self._read(layer, [e])[e]
                )
                stats.prefetched += 1
                stats.prefetch_bytes += layer.expert_nbytes

    def _harvest_prefetches(self) -> None:
        """Move finished prefetches into the RAM cache, so they count against its budget."""
        for key in [k for k, future in self._inflight.items() if future.done()]:
            record = _result_or_none(self._inflight.pop(key))
            if record is not None:
                self.ram.put(key, record)
                self._prefetched.add(key)

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = [LayerStats() for _ in self.layers]
            self.read_retries = 0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return snapshot(
                self.stats,
                [slots.resident for slots in self.layers],
                [slots.layer.expert_nbytes for slots in self.layers],
                self.ram.used,
                {"config": {**self.info, "reader_io": getattr(self.reader, "stats", {})},
                 "read_retries": self.read_retries},
            )

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
            self._inflight.clear()
            self.ram.clear()
            self.reader.close()
