"""Open-file bookkeeping shared by the readers: one descriptor per path, opened on first use."""

from __future__ import annotations

import os
import threading

from outlier_runtime.errors import ExpertReadError


class FileTable:
    """Keeps one read-only descriptor per path; thread safe."""

    def __init__(self, flags: int = 0) -> None:
        self._fds: dict[str, int] = {}
        self._flags = flags
        self._lock = threading.Lock()

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            return fd
        with self._lock:
            if path not in self._fds:
                try:
                    self._fds[path] = os.open(path, os.O_RDONLY | self._flags)
                except OSError as exc:
                    raise ExpertReadError(f"{path}: cannot open: {exc.strerror or exc}", path) from exc
            return self._fds[path]

    def forget(self, path: str) -> None:
        """Close a descriptor (after an error, so that a replaced file is opened afresh)."""
        with self._lock:
            fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
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
