"""Building blocks for readers: a table of open files, and a positional read that fills a buffer.

Readers run in the generating thread and in prefetch or worker threads at once, so both are
thread safe, and a descriptor is never closed while another thread may still read from it.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

from outlier_runtime.core.errors import ExpertReadError


class FileTable:
    """Keeps one read-only descriptor per path (opened on first use, with extra ``flags``,
    then handed to ``prepare``, e.g. to set macOS's F_NOCACHE)."""

    def __init__(self, flags: int = 0, prepare: Callable[[int], None] | None = None) -> None:
        self._fds: dict[str, int] = {}
        self._flags = flags
        self._prepare = prepare
        self._lock = threading.Lock()
        # Descriptors dropped after an error. They stay open until close(): another thread
        # may be reading through one, and a reused descriptor number would read another file.
        self._retired: list[int] = []

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            return fd
        with self._lock:
            if path not in self._fds:
                try:
                    fd = os.open(path, os.O_RDONLY | self._flags)
                except OSError as exc:
                    raise ExpertReadError(f"{path}: cannot open: {exc.strerror or exc}", path) from exc
                if self._prepare is not None:
                    try:
                        self._prepare(fd)
                    except OSError as exc:
                        os.close(fd)
                        raise ExpertReadError(f"{path}: cannot set up reads: {exc.strerror or exc}", path) from exc
                self._fds[path] = fd
            return self._fds[path]

    def forget(self, path: str) -> None:
        """Stop using ``path``'s descriptor (after an error): the next read opens the file afresh,
        so a shard that was replaced (re-downloaded) is read, not the old file still held open."""
        with self._lock:
            fd = self._fds.pop(path, None)
            if fd is not None:
                self._retired.append(fd)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = [*self._fds.values(), *self._retired], {}
            self._retired = []
        for fd in fds:
            os.close(fd)


def pread_into(fd: int, out: memoryview, offset: int, path: str) -> None:
    """Fill ``out`` from ``offset``: loops over short reads, fails clearly at end of file."""
    done = 0
    total = len(out)
    while done < total:
        try:
            n = os.preadv(fd, [out[done:]], offset + done)
        except OSError as exc:
            raise ExpertReadError(
                f"{path}: read of {total} bytes at offset {offset} failed: {exc.strerror or exc}", path
            ) from exc
        if n == 0:
            raise ExpertReadError(
                f"{path}: file ends before byte {offset + total} (truncated shard? re-download it)", path
            )
        done += n
