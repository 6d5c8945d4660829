"""``mmap``: copy ranges out of a read-only memory map (page faults do the I/O)."""

from __future__ import annotations

import mmap
import os
import threading
from typing import Sequence

from outlier_runtime.core.errors import ExpertReadError
from outlier_runtime.core.protocols import ReadRequest
from outlier_runtime.engine.fileio import open_regular, same_file


class MmapReader:
    """Maps each file once. The size is re-checked before every copy: touching a page past
    the end of a file that shrank would kill the process with SIGBUS, not raise. (Files are
    replaced by rename, never rewritten in place, by ``outlier pack`` and by Hugging Face
    downloads; a program that truncates a mapped file in place between the check and the
    copy can still fault it, which no in-process check can prevent.)"""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[int, mmap.mmap]] = {}
        # Maps dropped after an error stay open until close(): another thread may copy from one.
        self._retired: list[tuple[int, mmap.mmap]] = []
        self._lock = threading.Lock()
        self.stats = {"reader": "mmap", "io_mode": "mmap"}

    def _map(self, path: str) -> tuple[int, mmap.mmap]:
        with self._lock:
            if path not in self._maps:
                fd = open_regular(path, error=ExpertReadError)
                try:
                    self._maps[path] = (fd, mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
                except (OSError, ValueError) as exc:
                    os.close(fd)
                    raise ExpertReadError(f"{path}: cannot map: {exc}", path) from exc
            return self._maps[path]

    def read(self, requests: Sequence[ReadRequest]) -> None:
        for request in requests:
            fd, mapped = self._map(request.path)
            end = request.offset + request.length
            size = os.fstat(fd).st_size
            if end > size or end > len(mapped):
                self._retire(request.path, size)
                raise ExpertReadError(
                    f"{request.path}: file ends at byte {size}, before {end} (truncated shard?)", request.path
                )
            request.out[:] = memoryview(mapped)[request.offset:end]

    def _retire(self, path: str, size: int) -> None:
        """Map ``path`` afresh next time if it now names another file (re-downloaded) or grew past
        the map; otherwise keep the map, so repeated failures never pile up maps and descriptors."""
        with self._lock:
            entry = self._maps.get(path)
            if entry is not None and (not same_file(entry[0], path) or size > len(entry[1])):
                self._retired.append(self._maps.pop(path))

    def close(self) -> None:
        with self._lock:
            maps, self._maps = [*self._maps.values(), *self._retired], {}
            self._retired = []
        for fd, mapped in maps:
            mapped.close()
            os.close(fd)
