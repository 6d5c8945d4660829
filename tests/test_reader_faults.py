"""OS-level faults under the preadv readers: short reads, EIO, shards removed or replaced mid-run.

``os.preadv`` is replaced only where the reader under test looks it up (the ``os`` of
``outlier_runtime.engine.fileio`` for buffered reads, and also of ``outlier_fanout.reader`` for the
fanout reader's O_DIRECT reads), so a fault reaches that reader and nothing else. Run with ``-s`` for a summary of the faults injected.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import json
import os
import shutil
import threading
from collections import Counter
from typing import Callable

import mlx_lm
import numpy as np
import pytest

import outlier_runtime
from outlier_paged_moe.store import READ_ATTEMPTS
from outlier_runtime.engine.platform_io import current_platform_io
from outlier_runtime import ExpertReadError
from outlier_runtime.engine.buffers import aligned_empty
from outlier_runtime.core.plugin_manager import get_registry
from outlier_runtime.core.protocols import ReadRequest

from helpers import assert_slots_hold_true_experts, paged_store

PROMPT = "import os\n\ndef walk(path):\n    for name in os.listdir(path):\n"
MAX_TOKENS = 10
#: The most bytes a faulty buffered ``preadv`` returns per call (an O_DIRECT one returns one block).
SHORT_READ_BYTES = 1000
DIRECT_BLOCK = 4096
#: Every reader that reads with ``os.preadv``: the module it looks ``os`` up in, and its options.
READERS = {
    "pread": (("outlier_runtime.engine.fileio",), {}),
    "fanout": (("outlier_runtime.engine.fileio", "outlier_fanout.reader"), {"workers": 4, "chunk_bytes": 4096}),
}

#: Faults injected by every test of this module, by reader and kind (printed at the end).
INJECTED: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def fault_summary():
    yield
    print("\n" + json.dumps({"reader_faults_injected": dict(sorted(INJECTED.items()))}))


class FaultyOs:
    """Stands in for a reader module's ``os``: ``preadv`` misbehaves as configured, the rest is ``os``.

    ``fail(call_number)`` -> True makes that call raise EIO; ``max_bytes`` caps what a call
    reads (a short read, as network filesystems and signals produce). Thread safe: fanout
    calls ``preadv`` from several threads.
    """

    def __init__(self, reader: str):
        self.reader = reader
        self.fail: Callable[[int], bool] | None = None
        self.max_bytes: int | None = None
        self.calls = self.errors = self.short = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(os, name)

    def preadv(self, fd: int, buffers, offset: int) -> int:
        with self._lock:
            self.calls += 1
            failing = self.fail is not None and self.fail(self.calls)
            if failing:
                self.errors += 1
                INJECTED[f"{self.reader}:eio"] += 1
        if failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if self.max_bytes is None:
            return os.preadv(fd, buffers, offset)
        # An O_DIRECT read can only come back short by whole blocks.
        direct = fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0)
        cap = DIRECT_BLOCK if direct else self.max_bytes
        wanted = sum(len(memoryview(b).cast("B")) for b in buffers)
        n = os.preadv(fd, _first_bytes(buffers, cap), offset)
        if n < wanted:
            with self._lock:
                self.short += 1
                INJECTED[f"{self.reader}:short_read"] += 1
        return n


def _first_bytes(buffers, cap: int) -> list[memoryview]:
    """The first ``cap`` bytes of a scatter list."""
    out = []
    for buffer in buffers:
        view = memoryview(buffer).cast("B")[:cap]
        if not len(view):
            break
        out.append(view)
        cap -= len(view)
    return out


@pytest.fixture(params=sorted(READERS))
def reader_name(request) -> str:
    return request.param


@pytest.fixture
def faults(reader_name, monkeypatch) -> FaultyOs:
    faulty = FaultyOs(reader_name)
    for module in READERS[reader_name][0]:
        monkeypatch.setattr(importlib.import_module(module), "os", faulty)
    return faulty


@pytest.fixture(scope="module")
def source(tiny):
    """A sharded tiny MoE: every expert read touches three shards."""
    return tiny("qwen3_moe", max_shard_bytes=300_000, seed=5)


@pytest.fixture(scope="module")
def stock(source) -> list[int]:
    """Stock mlx-lm's greedy tokens for PROMPT."""
    model, tokenizer = mlx_lm.load(str(source))
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=MAX_TOKENS)]


@pytest.fixture
def model_copy(source, tmp_path):
    """A private copy of the model that a test may damage."""
    target = tmp_path / "model"
    shutil.copytree(source, target)
    return target


def _load(path, reader: str, **overrides):
    options = dict(model=str(path), k_override=2, cache_gb=0, force=True, reader=reader,
                   reader_options=READERS[reader][1])
    options.update(overrides)
    return outlier_runtime.load("plus", **options)


def _generate(runtime):
    return runtime.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, chat=False)


def _expert_shards(runtime) -> list[str]:
    return sorted({path for layer in paged_store(runtime).index.layers
                   for path, *_ in layer.read_ranges(0)})


def _open_paths() -> dict[str, str]:
    """This process's descriptors: target as the kernel names it (``... (deleted)`` once unlinked)."""
    paths = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return paths


# ---------------------------------------------------------------- short reads


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_short_reads_still_fill_the_buffers_with_the_true_bytes(reader_name, faults, tmp_path, aligned):
    data = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    # Large enough that fanout hands pieces to its worker threads, plus odd sizes and the file's end.
    ranges = [(0, 1 << 19), (1 << 19, 4096 * 9), (4096 * 200, 4096)] if aligned else \
        [(1, 1 << 19), (4095, 9001), (123457, 70001), ((1 << 20) - 5, 5)]
    buffers = [aligned_empty(length) if aligned else np.empty(length + 1, np.uint8)[1:] for _, length in ranges]
    faults.max_bytes = SHORT_READ_BYTES
    # Pieces of several blocks, so that O_DIRECT reads can come back short too.
    options = {**READERS[reader_name][1], "chunk_bytes": 65536} if reader_name == "fanout" else {}
    reader = get_registry().create("reader", reader_name, options)
    try:
        reader.read([ReadRequest(str(path), offset, length, memoryview(buffer))
                     for (offset, length), buffer in zip(ranges, buffers)])
    finally:
        reader.close()
    for (offset, length), buffer in zip(ranges, buffers):
        assert buffer.tobytes() == data[offset:offset + length], (offset, length)
    assert faults.short > 0 and faults.errors == 0
    if reader_name == "fanout" and aligned and not reader.stats["direct_refused"]:
        # A short O_DIRECT read is whole blocks: the rest is still read direct, not given up on.
        assert reader.stats["io_mode"] == current_platform_io().uncached_mode


def test_short_reads_under_the_paged_engine_are_exact(reader_name, faults, model_copy, stock):
    runtime = _load(model_copy, reader_name)
    try:
        faults.max_bytes = SHORT_READ_BYTES
        result = _generate(runtime)
        assert result.tokens == stock
        assert result.engine["read_retries"] == 0  # a short read is continued, not an error
        assert faults.short > 0
        assert_slots_hold_true_experts(runtime)
    finally:
        runtime.close()


# ---------------------------------------------------------------- EIO


def _calls_per_batch(runtime, reader: str) -> int:
    """The most ``preadv`` calls one store read makes (no short reads): a batch is one slot's worth."""
    chunk = READERS[reader][1].get("chunk_bytes")
    store = paged_store(runtime)
    return max(
        slots.num_slots * sum(-(-length // chunk) if chunk else 1
                              for _, _, length, _ in slots.layer.read_ranges(0))
        for slots in store.layers
    )


@pytest.mark.parametrize("pattern", ["first-2-calls", "every-nth-call"])
def test_transient_eio_is_retried_and_the_tokens_stay_exact(reader_name, faults, model_copy, stock, pattern):
    runtime = _load(model_copy, reader_name)
    try:
        if pattern == "first-2-calls":
            faults.fail = lambda call: call <= READ_ATTEMPTS - 1
        else:
            # One call more than a batch makes: a retried batch never meets the next fault.
            period = _calls_per_batch(runtime, reader_name) + 1
            faults.fail = lambda call: call % period == 0
        result = _generate(runtime)
        assert result.tokens == stock
        assert result.engine["read_retries"] > 0
        assert result.engine["read_retries"] == faults.errors  # each failed attempt was retried once
        assert_slots_hold_true_experts(runtime)
    finally:
        runtime.close()


def test_persistent_eio_names_the_file_then_the_runtime_keeps_serving(reader_name, faults, model_copy, stock):
    runtime = _load(model_copy, reader_name)
    try:
        faults.fail = lambda call: True
        with pytest.raises(ExpertReadError) as error:
            _generate(runtime)
        assert error.value.path in _expert_shards(runtime)
        assert error.value.path in str(error.value) and "Input/output error" in str(error.value)
        assert faults.errors == READ_ATTEMPTS  # tried, retried, then reported
        assert runtime.engine_stats()["read_retries"] == READ_ATTEMPTS - 1
        assert_slots_hold_true_experts(runtime)  # nothing half-read was marked valid

        faults.fail = None  # the disk recovers: the same Runtime serves exactly
        assert _generate(runtime).tokens == stock
        assert_slots_hold_true_experts(runtime)
    finally:
        runtime.close()


# ---------------------------------------------------------------- files removed or replaced


def test_unlinked_shards_still_open_keep_serving(reader_name, model_copy, stock):
    """POSIX keeps an unlinked file's data until its last descriptor closes: a reader that
    already opened a shard reads on from it; a shard it never opened fails cleanly."""
    runtime = _load(model_copy, reader_name)
    try:
        runtime.generate("def f(", max_tokens=2, temperature=0.0, chat=False)
        shards = _expert_shards(runtime)
        opened = {path for path in _open_paths().values() if path in shards}
        for shard in shards:
            os.unlink(shard)
        INJECTED[f"{reader_name}:unlinked"] += len(shards)
        deleted = {path for path in _open_paths().values() if path.endswith(" (deleted)")}
        assert {f"{path} (deleted)" for path in opened} <= deleted
        tokens = None
        try:
            tokens = _generate(runtime).tokens
        except ExpertReadError as error:
            assert error.path in set(shards) - opened, "a shard still open must stay readable"
            assert "cannot open" in str(error)
        # Every expert read touches all of its layer's shards, so the first generation opened them all.
        assert opened == set(shards)
        assert tokens == stock
    finally:
        runtime.close()
    assert not any(path.endswith(" (deleted)") and str(model_copy) in path for path in _open_paths().values()), \
        "close() must release the descriptors of unlinked shards"


def test_shard_removed_before_its_first_read_fails_cleanly_then_recovers(reader_name, source, model_copy, stock):
    runtime = _load(model_copy, reader_name)
    try:
        shard = _expert_shards(runtime)[0]
        os.unlink(shard)
        INJECTED[f"{reader_name}:unlinked"] += 1
        with pytest.raises(ExpertReadError) as error:
            _generate(runtime)
        assert error.value.path == shard and "cannot open" in str(error.value)
        shutil.copyfile(source / os.path.basename(shard), shard)  # restored
        assert _generate(runtime).tokens == stock
        assert_slots_hold_true_experts(runtime)
    finally:
        runtime.close()


def test_replaced_shard_is_reopened_after_an_error(reader_name, source, model_copy, stock):
    """A shard truncated in place fails; once a good copy is renamed over it (a new file, as a
    re-download does), the reader must drop the old descriptor and read the new file."""
    runtime = _load(model_copy, reader_name)
    try:
        runtime.generate("def f(", max_tokens=2, temperature=0.0, chat=False)  # the shards are open now
        shard = _expert_shards(runtime)[0]
        with open(shard, "r+b") as handle:
            handle.truncate(1024)
        INJECTED[f"{reader_name}:truncated"] += 1
        with pytest.raises(ExpertReadError) as error:
            _generate(runtime)
        assert error.value.path == shard and shard in str(error.value)

        fresh = f"{shard}.download"
        shutil.copyfile(source / os.path.basename(shard), fresh)
        os.replace(fresh, shard)
        INJECTED[f"{reader_name}:replaced"] += 1
        assert _generate(runtime).tokens == stock
        assert_slots_hold_true_experts(runtime)
    finally:
        runtime.close()
