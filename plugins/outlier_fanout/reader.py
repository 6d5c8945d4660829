"""``fanout``: split each read batch into chunks and read them with a pool of threads.

One expert is one long read from a pack (or nine short ones from the shards). A single
``preadv`` at a time leaves a modern SSD mostly idle: its bandwidth comes from many
requests in flight. So the requests of a batch are cut into pieces, and ``workers`` threads
(the caller among them) take pieces from a shared counter and read them straight into the
caller's buffers (``os.preadv`` releases the GIL; no extra copy).

A request whose file offset, length and buffer address are all 4096-aligned (every pack
read: the pack and the store's buffers are aligned for this) is cut into ``chunk_bytes``
pieces read through a second, uncached descriptor that skips the page cache's copy and its
memory: ``O_DIRECT`` on Linux, ``F_NOCACHE`` on macOS (outlier_runtime/engine/platform_io.py).
Other requests (the nine ranges per expert of mlx shards) go through the page cache, one
piece per request by default: splitting a buffered read defeats the kernel's readahead; each
range is dropped from the page cache once read (the engine holds its own, bounded copy), unless
``keep_page_cache`` is set, which exists to measure what a peer that reads through mmap gains
from the cache (docs/performance.md). A
filesystem that refuses uncached reads (tmpfs, some network filesystems) makes the file
fall back to buffered reads; ``stats`` counts the bytes read each way and names the method.

Demand reads come first. ``read`` is a step waiting for its experts; ``read_background`` is
a prefetch guess. The worker threads take pieces from two queues, demand before background,
so a guess never delays a demand read by more than the one piece a worker is already in.
The caller of ``read`` reads its own pieces too; a background caller only waits.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from typing import Any, Sequence

import numpy as np
from pydantic import Field, ValidationError

from outlier_runtime import PluginOptions
from outlier_runtime.core.errors import ExpertReadError, ManifestError
from outlier_runtime.engine.fileio import FileTable, pread_into
from outlier_runtime.engine.platform_io import current_platform_io
from outlier_runtime.core.protocols import ReadRequest

#: O_DIRECT needs offsets, lengths and buffer addresses aligned to the logical block size;
#: 4096 covers every common disk and filesystem.
DIRECT_ALIGNMENT = 4096
#: Chosen from measurements (docs/performance.md, the raw-disk sweep of `outlier bench`):
#: 512 KiB-1 MiB pieces reach the disk's cold bandwidth; 16 KiB pieces (Flash-MoE's fork)
#: cost a Python-level step and a syscall per 16 KiB and read 4-5x slower here.
DEFAULT_CHUNK_BYTES = 1024 * 1024
DEFAULT_WORKERS = 8
#: Below this many bytes per worker, handing pieces to threads costs more than it saves
#: (a small model's whole batch is read in the calling thread).
MIN_BYTES_PER_WORKER = 256 * 1024

#: errno values with which a filesystem refuses uncached reads (O_DIRECT: EINVAL; F_NOCACHE: ENOTSUP).
_REFUSALS = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


class _Piece:
    """One chunk of one request: ``view`` is filled from ``offset`` of ``path``."""

    __slots__ = ("path", "offset", "view", "direct")

    def __init__(self, path: str, offset: int, view: memoryview, direct: bool):
        self.path = path
        self.offset = offset
        self.view = view
        self.direct = direct


class _Job:
    """The pieces of one read call, taken one at a time by whoever reads them."""

    __slots__ = ("pieces", "next", "remaining", "direct", "buffered", "failures", "done")

    def __init__(self, pieces: list[_Piece]):
        self.pieces = pieces
        self.next = 0  # the first piece nobody has taken
        self.remaining = len(pieces)  # pieces not finished
        self.direct = 0
        self.buffered = 0
        self.failures: list[BaseException] = []
        self.done = threading.Event()


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


class FanoutReader:
    """Parallel chunked reads into caller buffers; uncached where everything is aligned.

    Options (``[paging] reader_options``) are the inner ``Options`` model. Aligned requests are
    read uncached (O_DIRECT on Linux, F_NOCACHE on macOS). Page-cache reads are not split by
    default: splitting them defeats the kernel's readahead and was slower than one read per
    range in every measurement here. ``advise`` hints page-cache ranges to the kernel before a
    batch (F_RDADVISE on macOS, POSIX_FADV_WILLNEED on Linux; off by default, unmeasured on macOS).
    """

    class Options(PluginOptions):
        workers: int = Field(default=DEFAULT_WORKERS, ge=1, description="Threads reading at once, the caller included.")
        chunk_bytes: int = Field(default=DEFAULT_CHUNK_BYTES, gt=0, multiple_of=DIRECT_ALIGNMENT,
                                 description=f"Piece size of O_DIRECT reads (a multiple of {DIRECT_ALIGNMENT}).")
        direct: bool = Field(default=True, description="Uncached reads of aligned requests (O_DIRECT, F_NOCACHE); false: page cache only.")
        buffered_chunk_bytes: int = Field(default=0, ge=0,
                                          description="Piece size of page-cache reads; 0 reads each request whole.")
        advise: bool = Field(default=False, description="Hint page-cache ranges to the kernel before a batch.")
        keep_page_cache: bool = Field(
            default=False,
            description=("Leaves read bytes in the page cache: outside the memory plan. Buffered reads only "
                         "(set direct = false to read aligned pack records buffered too); for comparisons "
                         "with peers that read through mmap, not for the product."))

    def __init__(self, workers: int = DEFAULT_WORKERS, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 direct: bool = True, buffered_chunk_bytes: int = 0, advise: bool = False,
                 keep_page_cache: bool = False) -> None:
        try:  # the same checks for direct construction as for a manifest's reader_options
            self.Options(workers=workers, chunk_bytes=chunk_bytes, direct=direct,
                         buffered_chunk_bytes=buffered_chunk_bytes, advise=advise, keep_page_cache=keep_page_cache)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise ManifestError(f"reader_options.{error['loc'][0]} = {error['input']!r}: {error['msg']}") from None
        self.buffered_chunk_bytes = buffered_chunk_bytes
        self.workers = workers
        self.chunk_bytes = chunk_bytes
        self.advise = advise
        self.keep_page_cache = keep_page_cache
        self._io = current_platform_io()
        self.direct = direct and self._io.uncached_available
        self._lock = threading.Lock()
        self._files = FileTable(prepare=self._io.prepare_buffered)
        self._direct_files = FileTable(self._io.uncached_open_flags, self._io.prepare_uncached)
        self._refused: set[str] = set()  # files whose filesystem refused uncached reads
        # The worker threads (workers - 1; the caller of a demand read is the last one) and
        # their two queues of jobs: demand first, then background (prefetch guesses).
        self._queue = threading.Condition(self._lock)
        self._demand: deque[_Job] = deque()
        self._background: deque[_Job] = deque()
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._direct_bytes = 0
        self._buffered_bytes = 0
        self._reads = 0
        self._pieces = 0

    @property
    def stats(self) -> dict[str, Any]:
        """Which I/O mode was used, and how many bytes each way (shown as the engine's reader_io)."""
        with self._lock:
            direct, buffered = self._direct_bytes, self._buffered_bytes
            if direct and buffered:
                mode = "mixed"
            elif direct:
                mode = self._io.uncached_mode  # "direct" (Linux O_DIRECT) or "nocache" (macOS)
            else:
                mode = "buffered"
            return {
                "reader": "fanout",
                "io_mode": mode,
                "uncached_method": self._io.uncached_method if self.direct else None,
                "advise": self.advise,
                "keep_page_cache": self.keep_page_cache,
                "workers": self.workers,
                "chunk_bytes": self.chunk_bytes,
                "buffered_chunk_bytes": self.buffered_chunk_bytes,
                "direct_enabled": self.direct,
                "direct_bytes": direct,
                "buffered_bytes": buffered,
                "reads": self._reads,
                "pieces": self._pieces,
                "direct_refused": sorted(self._refused),
            }

    # ------------------------------------------------------------------ files

    def _direct_fd(self, path: str) -> int | None:
        """An uncached descriptor for ``path``, or None when its filesystem refuses one."""
        if path in self._refused:
            return None
        try:
            return self._direct_files.fd(path)
        except ExpertReadError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno in _REFUSALS:
                self._refuse_direct(path)
                return None
            raise

    def _forget(self, path: str) -> None:
        """After an error, open ``path`` afresh next time: a replaced (re-downloaded) shard is
        read, not the old file still held open."""
        self._files.forget(path)
        self._direct_files.forget(path)

    def _refuse_direct(self, path: str) -> None:
        with self._lock:
            self._refused.add(path)

    # ------------------------------------------------------------------ reading

    def _plan(self, requests: Sequence[ReadRequest]) -> list[_Piece]:
        pieces = []
        for request in requests:
            length = request.length
            if len(request.out) < length:
                raise ExpertReadError(
                    f"{request.path}: read of {length} bytes at offset {request.offset} into a "
                    f"{len(request.out)}-byte buffer", request.path
                )
            out = request.out[:length]
            direct = (
                self.direct
                and request.path not in self._refused
                and request.offset % DIRECT_ALIGNMENT == 0
                and length % DIRECT_ALIGNMENT == 0
                and _address(out) % DIRECT_ALIGNMENT == 0
            )
            step = self.chunk_bytes if direct else (self.buffered_chunk_bytes or length or 1)
            for start in range(0, length, step):
                pieces.append(_Piece(request.path, request.offset + start, out[start:start + step], direct))
        return pieces

    def _read_piece(self, piece: _Piece) -> tuple[int, int]:
        """Fill one piece; returns (bytes read uncached, bytes read buffered)."""
        view, path, offset = piece.view, piece.path, piece.offset
        total = len(view)
        done = 0
        if piece.direct:
            fd = self._direct_fd(path)
            while fd is not None and done < total:
                try:
                    n = os.preadv(fd, [view[done:]], offset + done)
                except OSError as exc:
                    if exc.errno not in _REFUSALS:
                        raise self._failed(path, offset, total, exc) from exc
                    self._refuse_direct(path)  # the filesystem opened it but will not do the read
                    break
                if n == 0:
                    raise self._ends_early(path, offset + total)
                done += n
                if n % DIRECT_ALIGNMENT:
                    break  # the rest is no longer aligned: finish it buffered
        if done < total:
            fd = self._files.fd(path)
            pread_into(fd, view[done:], offset + done, path)
            # Our buffer holds the bytes now: a page-cache copy would be memory outside the bound.
            if not self.keep_page_cache:
                self._io.forget_range(fd, offset + done, total - done)
        return done, total - done

    @staticmethod
    def _failed(path: str, offset: int, total: int, exc: OSError) -> ExpertReadError:
        return ExpertReadError(f"{path}: read of {total} bytes at offset {offset} failed: {exc.strerror or exc}", path)

    @staticmethod
    def _ends_early(path: str, end: int) -> ExpertReadError:
        return ExpertReadError(f"{path}: file ends before byte {end} (truncated shard or pack? "
                               f"re-download the shard, or rebuild the pack with `outlier pack`)", path)

    def _advise(self, pieces: list[_Piece]) -> None:
        """Hint the page-cache ranges of a batch, so the kernel reads them while we start."""
        for piece in pieces:
            if not piece.direct and piece.view:
                self._io.advise(self._files.fd(piece.path), piece.offset, len(piece.view))

    # ------------------------------------------------------------------ scheduling

    def _next_piece(self, own: _Job | None) -> tuple[_Job, int] | None:
        """A piece to read (lock held): of ``own`` only, or else demand jobs before background ones.

        A job that failed gives up its untaken pieces (they count as finished).
        """
        queues = ((own,),) if own is not None else (self._demand, self._background)
        for queue in queues:
            for job in list(queue):  # _finish may take a failed job out of its queue
                if job.failures and job.next < len(job.pieces):
                    self._finish(job, len(job.pieces) - job.next)
                    job.next = len(job.pieces)
                if job.next < len(job.pieces):
                    job.next += 1
                    return job, job.next - 1
        return None

    def _finish(self, job: _Job, pieces: int) -> None:
        job.remaining -= pieces
        if job.remaining == 0:
            for queue in (self._demand, self._background):
                if job in queue:
                    queue.remove(job)
            job.done.set()

    def _read_one(self, job: _Job, index: int) -> None:
        """Read one piece of ``job`` (lock not held) and account for it."""
        direct = buffered = 0
        failure = None
        try:
            direct, buffered = self._read_piece(job.pieces[index])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure = exc
        with self._lock:
            job.direct += direct
            job.buffered += buffered
            if failure is not None:
                job.failures.append(failure)
            self._finish(job, 1)

    def _work(self) -> None:
        """A worker thread: demand pieces first, then background ones, until the reader closes."""
        while True:
            with self._queue:
                taken = self._next_piece(None)
                while taken is None and not self._closing:
                    self._queue.wait()
                    taken = self._next_piece(None)
                if taken is None:
                    return
            self._read_one(*taken)

    def _start_workers(self) -> None:
        """Start the worker threads on first use (lock held)."""
        while len(self._threads) < self.workers - 1:
            thread = threading.Thread(target=self._work, name="outlier-fanout", daemon=True)
            thread.start()
            self._threads.append(thread)

    # ------------------------------------------------------------------ reading

    def read(self, requests: Sequence[ReadRequest]) -> None:
        """Fill every request's buffer, in parallel, ahead of any background read; raises
        ExpertReadError naming the file."""
        self._run(requests, background=False)

    def read_background(self, requests: Sequence[ReadRequest]) -> None:
        """Like ``read``, but every demand read's pieces are read before this one's (prefetches)."""
        self._run(requests, background=True)

    def _run(self, requests: Sequence[ReadRequest], background: bool) -> None:
        pieces = self._plan(requests)
        if not pieces:
            return
        if self.advise:
            self._advise(pieces)
        job = _Job(pieces)
        total = sum(len(piece.view) for piece in pieces)
        helped = self.workers > 1 and (background or min(len(pieces), total // MIN_BYTES_PER_WORKER) > 1)
        if helped:
            with self._queue:
                if self._closing:
                    raise ExpertReadError("the fanout reader is closed", None)
                self._start_workers()
                (self._background if background else self._demand).append(job)
                self._queue.notify_all()
        if not (helped and background):  # a demand caller reads its own pieces too
            while True:
                with self._lock:
                    taken = self._next_piece(job)
                if taken is None:
                    break
                self._read_one(*taken)
        # Wait for every piece even after a failure: none may write into the buffers later.
        job.done.wait()
        with self._lock:
            self._reads += 1
            self._pieces += len(pieces)
            self._direct_bytes += job.direct
            self._buffered_bytes += job.buffered
        if job.failures:
            for failure in job.failures:
                if isinstance(failure, ExpertReadError) and failure.path:
                    self._forget(failure.path)
            raise job.failures[0]

    def close(self) -> None:
        """Stop the worker threads (after the reads queued) and close every descriptor."""
        with self._queue:
            self._closing = True
            self._queue.notify_all()
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join()
        with self._queue:
            self._closing = False  # a closed reader may be used again: threads restart on demand
        self._files.close()
        self._direct_files.close()
