"""Demand reads are never queued behind prefetch guesses (fanout reader, expert store).

Deterministic: stand-in reads block on events, so the order in which pieces and experts are
read is fixed by the test, not by timing. No assertion depends on how long anything takes.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from outlier_fanout.reader import MIN_BYTES_PER_WORKER, FanoutReader
from outlier_cache_lru import LRUPolicy
from outlier_paged_moe.store import ExpertStore
from outlier_prefetch import NextLayerRouterPrefetcher

from outlier_runtime.core.protocols import ReadRequest
from outlier_runtime.engine.checkpoint import read_checkpoint
from outlier_runtime.engine.experts import build_expert_index, find_switch_modules
from outlier_runtime.engine.lazy_load import load_lazily

WAIT = 30  # seconds: only a deadlock would reach it


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 1 << 21, dtype=np.uint8).tobytes())
    return str(path)


def _requests(path, names, length, first=0):
    """One unaligned request per name (read whole: one piece each) and its buffer."""
    buffers = {name: np.empty(length + 1, np.uint8)[1:] for name in names}
    requests = [ReadRequest(path, 1 + (first + i) * length, length, memoryview(buffers[name]))
                for i, name in enumerate(names)]
    return requests, buffers


def test_demand_pieces_are_read_before_queued_background_pieces(data_file):
    reader = FanoutReader(workers=2, direct=False)  # one worker thread, plus the demand caller
    length = MIN_BYTES_PER_WORKER  # two demand pieces: enough bytes for the worker to help
    background, background_buffers = _requests(data_file, ["B0", "B1", "B2"], length)
    demand, demand_buffers = _requests(data_file, ["D0", "D1"], length, first=3)
    order: list[str] = []
    gates = {"B0": threading.Event(), "D0": threading.Event()}
    started = {"B0": threading.Event(), "D0": threading.Event()}
    real_read = reader._read_piece
    by_offset = {r.offset: n for r, n in zip(background + demand, ["B0", "B1", "B2", "D0", "D1"])}

    def read_piece(piece):
        name = by_offset[piece.offset]
        order.append(name)
        if name in gates:
            started[name].set()
            assert gates[name].wait(WAIT)
        return real_read(piece)

    reader._read_piece = read_piece
    prefetch = threading.Thread(target=reader.read_background, args=(background,))
    prefetch.start()
    assert started["B0"].wait(WAIT)  # the worker is inside the first guess
    step = threading.Thread(target=reader.read, args=(demand,))
    step.start()
    assert started["D0"].wait(WAIT)  # the step's own thread reads D0; D1 is queued for the worker
    gates["B0"].set()  # the worker finishes B0 and must take D1 before B1 and B2
    prefetch.join(WAIT)
    assert not prefetch.is_alive()
    gates["D0"].set()
    step.join(WAIT)
    reader.close()
    assert order == ["B0", "D0", "D1", "B1", "B2"]
    with open(data_file, "rb") as handle:  # and every byte is what the file holds
        data = handle.read()
    for request, buffers in [(r, background_buffers) for r in background] + [(r, demand_buffers) for r in demand]:
        name = by_offset[request.offset]
        assert buffers[name].tobytes() == data[request.offset:request.offset + length]


def test_a_single_worker_reader_reads_background_requests_in_the_calling_thread(data_file):
    reader = FanoutReader(workers=1, direct=False)
    requests, buffers = _requests(data_file, ["A"], 4096)
    reader.read_background(requests)
    reader.close()
    with open(data_file, "rb") as handle:
        assert buffers["A"].tobytes() == handle.read()[1:4097]


class StandInReader:
    """Records each read; a background read of an expert in ``hold`` waits for its event."""

    def __init__(self, layer):
        self.layer = layer
        self.calls: list[tuple[str, list[int]]] = []
        self.hold: dict[int, threading.Event] = {}
        self.started: dict[int, threading.Event] = {}

    def _experts(self, requests):
        offsets = {path_offset: e for e in range(self.layer.num_experts)
                   for path_offset in [tuple(self.layer.read_ranges(e)[0][:2])]}
        return sorted({offsets[(r.path, r.offset)] for r in requests if (r.path, r.offset) in offsets})

    def read(self, requests):
        self.calls.append(("demand", self._experts(requests)))
        for r in requests:
            r.out[:r.length] = bytes(r.length)

    def read_background(self, requests):
        experts = self._experts(requests)
        self.calls.append(("background", experts))
        for e in experts:
            if e in self.started:
                self.started[e].set()
            if e in self.hold:
                assert self.hold[e].wait(WAIT)
        for r in requests:
            r.out[:r.length] = bytes(r.length)

    def close(self):
        pass


@pytest.fixture
def store(tiny):
    path = tiny("qwen3_moe")
    entries = read_checkpoint(path)
    model, _ = load_lazily(path, entries)
    index = build_expert_index(find_switch_modules(model), entries)
    layer = index.layers[1]
    reader = StandInReader(layer)
    budget = 8 * (layer.read_nbytes + 16384)
    store = ExpertStore(index, 4, budget, reader, LRUPolicy)
    yield store, reader
    for event in reader.hold.values():
        event.set()
    store.close()


def test_a_queued_prefetch_that_a_step_needs_is_cancelled_and_read_on_the_demand_path(store):
    store, reader = store
    reader.hold[3] = threading.Event()
    reader.started[3] = threading.Event()
    store.prefetch(1, [3, 5, 6])  # 3 is being read (held); 5 and 6 wait behind it
    assert reader.started[3].wait(WAIT)
    slots = store.ensure(1, np.array([5]))  # the step needs 5 now
    assert len(slots) == 1
    stats = store.stats[1]
    assert stats.prefetch_cancelled == 1 and stats.misses == 1
    assert ("demand", [5]) in reader.calls  # read as demand, not after the guess of 3
    assert ("background", [5]) not in reader.calls
    reader.hold[3].set()
    store.ensure(1, np.array([3]))  # 3 was being read: waited for, then used, never read again
    assert stats.prefetch_used == 1 and stats.misses == 1
    assert ("demand", [3]) not in reader.calls
    snapshot = store.snapshot()["total"]
    assert (snapshot["prefetched"], snapshot["prefetch_cancelled"]) == (3, 1)
    assert snapshot["prefetch_wasted"] == 1  # 6: a guess no step has used (yet); 5 was not wasted


def test_prefetch_depth_bounds_the_reads_queued_for_a_layer(store):
    store, reader = store
    reader.hold[1] = threading.Event()
    store.prefetch(1, [1, 2, 3, 4], depth=2)
    assert store.stats[1].prefetched == 2  # 1 and 2 queued; 3 and 4 were not guessed further
    store.prefetch(1, [3, 4], depth=2)
    assert store.stats[1].prefetched == 2  # still two in flight: nothing more is queued
    reader.hold[1].set()


def test_the_prefetchers_depth_and_extra_guesses_are_declared_options():
    fields = NextLayerRouterPrefetcher.Options.model_fields
    assert fields["depth"].default == 0 and fields["depth"].description
    assert fields["extra"].default == 0 and fields["extra"].description
    assert NextLayerRouterPrefetcher(extra=3, depth=5).depth == 5


@pytest.mark.parametrize("host_views", [True, False], ids=["numpy-view", "mlx-gather"])
def test_a_steps_installs_and_copies_out_are_batched_and_exact(tiny, monkeypatch, host_views):
    from outlier_paged_moe import store as store_module
    from outlier_paged_moe.records import record_stride
    from outlier_paged_moe.store import LayerSlots

    path = tiny("qwen3_moe")
    entries = read_checkpoint(path)
    model, _ = load_lazily(path, entries)
    layer = build_expert_index(find_switch_modules(model), entries).layers[0]
    slots = LayerSlots(layer, 4, LRUPolicy())
    monkeypatch.setattr(LayerSlots, "_host_views", lambda self: host_views)  # the bfloat16 path: mlx-gather
    # Two experts per batch: three installs take two batches (the first applied at once).
    monkeypatch.setattr(store_module, "EVAL_BATCH_BYTES", 2 * layer.expert_nbytes)
    rng = np.random.default_rng(1)
    stride = record_stride(layer.read_nbytes)
    records = {e: rng.integers(0, 256, stride, dtype=np.uint8) for e in (7, 2, 5)}
    slots.install_many([(slot, e, records[e]) for slot, e in zip((3, 0, 1), (7, 2, 5))])
    assert slots.slot_of == {7: 3, 2: 0, 5: 1} and slots.expert_in_slot == [2, 5, -1, 7]
    copies = {slot: np.zeros(stride, np.uint8) for slot in (3, 1)}
    slots.copy_out_many(list(copies.items()))
    n = layer.expert_nbytes
    assert copies[3][:n].tobytes() == records[7][:n].tobytes()
    assert copies[1][:n].tobytes() == records[5][:n].tobytes()
