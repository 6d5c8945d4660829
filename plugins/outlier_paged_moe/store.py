"""The expert store: compute-ready slots per layer, an in-RAM cache of expert bytes, and reads.

Two memory levels, both bounded, together within ``cache_gb``:
- slots: per MoE layer, ``S`` preallocated rows of each stacked expert tensor (mx arrays the
  unmodified switch module computes on). A slot is filled in place.
- RAM cache: expert records (the expert's tensors back to back, as bytes) keyed on
  (layer, expert). It is a victim cache: an expert lives in a slot or in the RAM cache, never
  both. An expert leaving its slot is copied into the RAM cache; one installed into a slot
  leaves it. So the same bytes hold more distinct experts.

Every host-side record (cached, in flight, prefetched) is a buffer of one ``RecordPool``
that counts what is checked out: room is made (by evicting RAM-cache entries) before a
buffer is taken, so the budget holds at peak, not only at rest.

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

from outlier_runtime.core.errors import ExpertReadError
from outlier_runtime.engine.experts import ExpertIndex, ExpertLayer
from outlier_runtime.core.protocols import CachePolicy, Reader, ReadRequest

from .records import RecordPool, record_stride
from .stats import LayerStats, snapshot

log = logging.getLogger(__name__)

EMPTY = -1
#: Most expert bytes installed (or copied out) per mlx evaluation: a step's updates share one
#: evaluation up to this, while the host->mx copies waiting for it stay small against cache_gb.
#: Larger experts (the Plus tier's are 7.5 MiB) go one per evaluation, applied at once, as one
#: expert's copies always were; an evaluation costs little beside reading one of them.
EVAL_BATCH_BYTES = 4 * 1024 * 1024
#: A failed batch read is tried this many times in all before its error reaches the caller.
READ_ATTEMPTS = 3
RETRY_BACKOFF_SECONDS = 0.01


class RamCache:
    """Expert records in host memory; victims chosen by a policy. Its budget is shared with the
    records in flight, all counted by the pool (``pool.held``)."""

    def __init__(self, budget: int, policy: CachePolicy, pool: RecordPool):
        self.budget = budget
        self.policy = policy
        self.pool = pool
        self._records: dict[Hashable, np.ndarray] = {}

    @property
    def used(self) -> int:
        return sum(record.nbytes for record in self._records.values())

    def make_room(self, nbytes: int) -> bool:
        """Evict until ``nbytes`` more can be taken from the pool within the budget."""
        while self.pool.held + nbytes > self.budget and self._records:
            self.drop(self.policy.choose_victim(self._records.keys()))
        return self.pool.held + nbytes <= self.budget

    def get(self, key: Hashable) -> np.ndarray | None:
        record = self._records.get(key)
        if record is not None:
            self.policy.accessed(key)
        return record

    def take(self, key: Hashable) -> np.ndarray | None:
        """Remove and return a record (it is moving into a slot); the caller gives it back."""
        record = self._records.pop(key, None)
        if record is not None:
            self.policy.evicted(key)
        return record

    def put(self, key: Hashable, record: np.ndarray) -> None:
        """Keep a record the caller took from the pool (it is already counted in ``pool.held``)."""
        if key in self._records:
            self.pool.give(record)
            return
        self._records[key] = record
        self.policy.accessed(key)
        # Over budget only if the caller took the buffer without room (a forced, too-small cache).
        while self.pool.held > self.budget and len(self._records) > 1:
            victim = self.policy.choose_victim([k for k in self._records if k != key])
            self.drop(victim)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def drop(self, key: Hashable) -> None:
        record = self._records.pop(key, None)
        if record is not None:
            self.pool.give(record)
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

    def _host_views(self) -> bool:
        """True when numpy can view every slot buffer (not bfloat16, which numpy lacks)."""
        return all(buffer.dtype != mx.bfloat16 for buffer in self.buffers)

    def _batches(self, items: list) -> list[list]:
        """``items`` (one expert each) in runs of at most EVAL_BATCH_BYTES of experts (at least one)."""
        per_batch = max(1, EVAL_BATCH_BYTES // max(1, self.layer.expert_nbytes))
        return [items[i:i + per_batch] for i in range(0, len(items), per_batch)]

    def install_many(self, placements: list[tuple[int, int, np.ndarray]]) -> None:
        """Copy each ``(slot, expert, record)`` into its slot's rows, then mark the slots valid.

        Not one mlx evaluation per expert: on this CPU an evaluation costs ~0.2-0.7 ms, more than
        reading a small expert. Updates go in batches of at most EVAL_BATCH_BYTES (until applied,
        each update's host->mx copy stays alive in mlx's memory, outside the bound); each batch
        is applied at once, except a last one within EVAL_BATCH_BYTES: that one is applied with
        the layer's own computation, which reads the slots next (mlx orders an array's update
        before its readers).
        """
        batches = self._batches(placements)
        lazy_last = len(batches[-1]) * self.layer.expert_nbytes <= EVAL_BATCH_BYTES if batches else False
        for number, batch in enumerate(batches):
            for slot, _, record in batch:
                for buffer, tensor, start in zip(self.buffers, self.layer.tensors, self.layer.record_offsets):
                    # One tensor at a time: the transient host->mx copy is one piece, not the whole record.
                    piece = mx.array(record[start:start + tensor.expert_nbytes])
                    buffer[slot] = piece.view(tensor.dtype).reshape(tensor.expert_shape)  # in place (donated)
            if number + 1 < len(batches) or not lazy_last:
                mx.eval(self.buffers)
            for slot, expert, _ in batch:
                self.expert_in_slot[slot] = expert
                self.slot_of[expert] = slot

    def copy_out_many(self, copies: list[tuple[int, np.ndarray]]) -> None:
        """Copy the expert in each ``(slot, record)``'s slot into the record (its bytes as read:
        installs are exact), one evaluation per batch."""
        if not copies:
            return
        mx.eval(self.buffers)  # pending installs applied (a no-op when none are)
        if self._host_views():
            # Evaluated mlx arrays expose their memory to numpy without a copy or an evaluation:
            # copy each expert's rows straight out of it.
            for buffer, tensor, start in zip(self.buffers, self.layer.tensors, self.layer.record_offsets):
                host = np.asarray(buffer).view(np.uint8).reshape(self.num_slots, -1)
                for slot, record in copies:
                    record[start:start + tensor.expert_nbytes] = host[slot]
            return
        for batch in self._batches(copies):  # bfloat16 has no numpy view: gather the rows in mlx
            index = mx.array([slot for slot, _ in batch], dtype=mx.uint32)
            rows = [buffer[index].view(mx.uint8).reshape(len(batch), -1) for buffer in self.buffers]
            mx.eval(rows)
            for row, tensor, start in zip(rows, self.layer.tensors, self.layer.record_offsets):
                host = np.asarray(row)
                for i, (_, record) in enumerate(batch):
                    record[start:start + tensor.expert_nbytes] = host[i]


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
        self.pool = RecordPool()
        #: The RAM cache's budget also holds every record in flight (reads, prefetches, victims).
        self.ram = RamCache(ram_budget, make_policy(), self.pool)
        self.stats = [LayerStats() for _ in index.layers]
        self.info = dict(info or {})
        self.verify_checksums = verify_checksums
        self.info["checksums"] = checksum_coverage(index, verify_checksums)
        if self.info["checksums"].startswith("nothing to verify: the pack"):
            # Asked for, but the pack has nothing to compare with: say so, never verify nothing silently.
            log.warning("verify_checksums is on, but %s", self.info["checksums"])
        self._lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: dict[tuple[int, int], tuple[np.ndarray, Future]] = {}
        #: Prefetched records in the RAM cache that no step has used yet.
        self._prefetched: set[tuple[int, int]] = set()
        self.read_retries = 0
        #: Records taken beyond the budget (only when a forced, too-small cache_gb left no room).
        self.over_budget_records = 0

    @property
    def slot_bytes(self) -> int:
        return sum(slots.layer.expert_nbytes * slots.num_slots for slots in self.layers)

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
                if slots.num_slots == slots.layer.num_experts:
                    # A slot per expert: expert e goes to slot e, so a full layer is in the
                    # stacked tensors' order (the paged switch then runs the original module).
                    targets = missing
                else:
                    targets = self._victim_slots(slots, set(wanted), len(missing))
                records = self._fetch(slots.layer, missing, stats)  # raises before any slot changes
                try:
                    # All of a step's evictions, then all of its installs: each a batched update.
                    self._evict_to_ram(slots, targets, stats)
                    slots.install_many([(slot, expert, records[expert]) for expert, slot in zip(missing, targets)])
                    for expert in missing:
                        slots.policy.accessed(slots.key(expert))
                finally:
                    for record in records.values():
                        self.pool.give(record)  # installed (or abandoned): the slot holds the bytes now
            return np.fromiter((slots.slot_of[e] for e in wanted), dtype=np.uint32, count=len(wanted))

    def _victim_slots(self, slots: LayerSlots, pinned: set[int], count: int) -> list[int]:
        """``count`` slots to fill: empty ones first, then the policy's victims among unpinned experts."""
        free = [s for s, e in enumerate(slots.expert_in_slot) if e == EMPTY][:count]
        candidates = {slots.key(e) for e in slots.slot_of if e not in pinned} if len(free) < count else set()
        while len(free) < count:
            victim_key = slots.policy.choose_victim(candidates)
            candidates.discard(victim_key)
            free.append(slots.slot_of[victim_key[1]])
        return free

    def _evict_to_ram(self, slots: LayerSlots, targets: list[int], stats: LayerStats) -> None:
        """Empty the ``targets`` slots; their experts' bytes move to the RAM cache where there is room."""
        stride = record_stride(slots.layer.read_nbytes)
        moving: list[tuple[int, Hashable, np.ndarray]] = []
        try:
            for slot in targets:
                expert = slots.expert_in_slot[slot]
                if expert == EMPTY:
                    continue
                key = slots.key(expert)
                if self.ram.budget and key not in self.ram and self.ram.make_room(stride):
                    moving.append((slot, key, self.pool.take(stride)))
                else:
                    slots.evict(slot)
                stats.evictions += 1
            slots.copy_out_many([(slot, record) for slot, _, record in moving])
        except BaseException:
            for _, _, record in moving:
                self.pool.give(record)
            raise
        for slot, key, record in moving:
            slots.evict(slot)
            self.ram.put(key, record)
            stats.victims_cached += 1

    def _take(self, layer: ExpertLayer) -> np.ndarray:
        """A record buffer for ``layer``, after making room for it in the budget."""
        stride = record_stride(layer.read_nbytes)
        if not self.ram.make_room(stride):
            self.over_budget_records += 1  # a forced cache_gb below the floor: count, do not fail
        return self.pool.take(stride)

    def _fetch(self, layer: ExpertLayer, experts: list[int], stats: LayerStats) -> dict[int, np.ndarray]:
        """Records of ``experts``, each taken out of the RAM cache, a finished prefetch, or read now.

        The caller gives every returned record back to the pool once installed.
        """
        self._harvest_prefetches()
        records: dict[int, np.ndarray] = {}
        to_read = []
        running: dict[int, tuple[np.ndarray, Future]] = {}
        try:
            for expert in experts:
                key = (layer.index, expert)
                pending = self._inflight.pop(key, None)
                if pending is not None:
                    if pending[1].cancel():
                        # Still queued behind other guesses: read it now, on the demand path.
                        self.pool.give(pending[0])
                        stats.prefetch_cancelled += 1
                        to_read.append(expert)
                    else:
                        running[expert] = pending  # being read: collected after the demand reads start
                    continue
                record = self.ram.take(key)
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
                buffers = {expert: self._take(layer) for expert in to_read}
                records.update(buffers)
                started = time.perf_counter()
                self._read(layer, buffers)  # raises before anything is marked valid
                stats.read_seconds += time.perf_counter() - started
                stats.misses += len(to_read)
                stats.bytes_read += layer.expert_nbytes * len(to_read)
            for expert, pending in list(running.items()):
                del running[expert]
                record = self._finished(pending)  # waits for the read; a failed one is read again
                if record is None:
                    buffers = {expert: self._take(layer)}
                    records.update(buffers)
                    self._read(layer, buffers)
                    stats.misses += 1
                    stats.bytes_read += layer.expert_nbytes
                else:
                    records[expert] = record
                    stats.ram_hits += 1
                    stats.prefetch_used += 1
        except BaseException:
            for record in records.values():
                self.pool.give(record)
            for record, future in running.values():  # never hand back a buffer still being read into
                if self._finished((record, future)) is not None:
                    self.pool.give(record)
            raise
        return records

    def _read(self, layer: ExpertLayer, buffers: dict[int, np.ndarray], background: bool = False) -> None:
        """Read whole expert records into ``buffers``, retrying a failed batch a bounded number of times.

        Disks and network filesystems fail transiently (EIO, short reads); a file that is
        really gone or truncated fails every attempt and the last error is raised.
        """
        for attempt in range(READ_ATTEMPTS):
            try:
                return self._read_once(layer, buffers, background)
            except ExpertReadError:
                if attempt + 1 == READ_ATTEMPTS:
                    raise
                self.read_retries += 1
                time.sleep(RETRY_BACKOFF_SECONDS * (attempt + 1))

    def _read_once(self, layer: ExpertLayer, buffers: dict[int, np.ndarray], background: bool = False) -> None:
        """Read whole expert records in one reader call (thread safe: touches no cache state).

        ``background``: a prefetch, read with the reader's ``read_background`` where it has one
        (the fanout reader then serves every demand read first).
        """
        requests = []
        for expert, buffer in buffers.items():
            view = memoryview(buffer)
            for path, offset, length, start in layer.read_ranges(expert):
                requests.append(ReadRequest(path, offset, length, view[start:start + length]))
        read = getattr(self.reader, "read_background", None) if background else None
        (read if callable(read) else self.reader.read)(requests)
        if self.verify_checksums:
            for expert, buffer in buffers.items():
                _verify(layer, expert, buffer[:layer.expert_nbytes])

    def prefetch(self, layer_number: int, experts: Iterable[int], depth: int | None = None) -> None:
        """Start reading experts of a layer that will probably be needed soon, in the background.

        Each read takes a record within the budget first (never evicting more than the RAM
        cache holds), and at most ``depth`` reads per layer (default: its slot count) are
        queued or in flight. A queued read that a step needs first is cancelled and read
        on the demand path (``_fetch``).
        """
        if self.ram.budget == 0:
            return
        with self._lock:
            self._harvest_prefetches()
            slots = self.layers[layer_number]
            layer = slots.layer
            in_flight = sum(1 for (number, _) in self._inflight if number == layer_number)
            wanted = [
                int(e) for e in experts
                if int(e) not in slots.slot_of and (layer_number, int(e)) not in self._inflight
                and (layer_number, int(e)) not in self.ram
            ][:max(0, (depth or slots.num_slots) - in_flight)]
            if not wanted:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outlier-prefetch")
            stats = self.stats[layer_number]
            stride = record_stride(layer.read_nbytes)
            for expert in wanted:
                if not self.ram.make_room(stride):
                    break  # a guess never pushes the engine past its budget
                record = self.pool.take(stride)
                future = self._executor.submit(self._read, layer, {expert: record}, True)
                self._inflight[(layer_number, expert)] = (record, future)
                stats.prefetched += 1
                stats.prefetch_bytes += layer.expert_nbytes

    def _finished(self, pending: tuple[np.ndarray, Future]) -> np.ndarray | None:
        """A prefetch's record once read; None if the read failed (its buffer goes back to the pool
        and the demand path reads the expert again: a failed guess never fails a step)."""
        record, future = pending
        try:
            future.result()
            return record
        except Exception:  # noqa: BLE001
            self.pool.give(record)
            return None

    def _harvest_prefetches(self) -> None:
        """Move finished prefetches into the RAM cache (failed ones give their buffer back)."""
        for key in [k for k, (_, future) in self._inflight.items() if future.done()]:
            record = self._finished(self._inflight.pop(key))
            if record is not None:
                self.ram.put(key, record)
                self._prefetched.add(key)

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = [LayerStats() for _ in self.layers]
            self.read_retries = 0
            self.pool.reset_peak()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            held = {"record_bytes_held": self.pool.held, "record_bytes_peak": self.pool.peak_held,
                    "record_pool_bytes": self.pool.allocated, "slot_bytes": self.slot_bytes,
                    "engine_bytes_peak": self.slot_bytes + self.pool.peak_held,
                    "over_budget_records": self.over_budget_records}
            return snapshot(
                self.stats,
                [slots.resident for slots in self.layers],
                [slots.layer.expert_nbytes for slots in self.layers],
                self.ram.used,
                {"config": {**self.info, "reader_io": getattr(self.reader, "stats", {})},
                 "read_retries": self.read_retries, "memory": held},
            )

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
            for record, _ in self._inflight.values():
                self.pool.give(record)
            self._inflight.clear()
            self.ram.clear()
            self.reader.close()
