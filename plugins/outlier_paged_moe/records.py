"""Expert record buffers: one pool for every host-side byte the engine holds, counted against a budget.

Every record the engine holds (an expert in the RAM cache, a read in flight, a prefetch not
yet harvested, an evicted slot's bytes on their way to the RAM cache) is a buffer taken from
this pool and given back when done. The pool counts what is checked out (``held``), so the
bound is checked where memory is taken, not estimated afterwards. Buffers come from
page-aligned slabs and are reused, so a record costs its stride (the read length rounded up
to 4 KiB, what O_DIRECT needs), not a fresh allocation with its own alignment padding.
"""

from __future__ import annotations

import threading

import numpy as np

from outlier_runtime.engine.buffers import DIRECT_IO_ALIGNMENT, aligned_empty, round_up

#: A slab holds at least this many bytes of records (fewer, larger allocations).
SLAB_BYTES = 1024 * 1024


def record_stride(read_nbytes: int) -> int:
    """Bytes one record occupies in the pool: aligned so every record can be read with O_DIRECT."""
    return round_up(read_nbytes, DIRECT_IO_ALIGNMENT)


class RecordPool:
    """Reusable aligned buffers, grouped by stride; ``held`` counts the bytes checked out."""

    def __init__(self) -> None:
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.held = 0
        self.peak_held = 0
        #: Bytes of slabs allocated so far (what the pool costs in memory at most).
        self.allocated = 0

    def take(self, stride: int) -> np.ndarray:
        """A buffer of ``stride`` bytes (contents undefined). The caller checks the budget first."""
        with self._lock:
            free = self._free.setdefault(stride, [])
            if not free:
                count = max(1, SLAB_BYTES // stride)
                slab = aligned_empty(count * stride)
                free.extend(slab[i * stride:(i + 1) * stride] for i in range(count))
                self.allocated += count * stride
            self.held += stride
            self.peak_held = max(self.peak_held, self.held)
            return free.pop()

    def give(self, record: np.ndarray) -> None:
        """Return a buffer taken with :meth:`take` (the whole buffer, not a view of it)."""
        with self._lock:
            self.held -= record.nbytes
            self._free.setdefault(record.nbytes, []).append(record)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_held = self.held

