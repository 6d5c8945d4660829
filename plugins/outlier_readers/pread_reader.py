"""``pread``: one positional read per requested range, one after another."""

from __future__ import annotations

from typing import Sequence

from outlier_runtime.core.errors import ExpertReadError
from outlier_runtime.engine.fileio import FileTable, pread_into
from outlier_runtime.engine.platform_io import current_platform_io
from outlier_runtime.core.protocols import ReadRequest



class PreadReader:
    """The product's baseline: a plain read per tensor range, in the calling thread.

    Unlike the product's, each range read is then dropped from the page cache (Linux): the engine
    keeps its own bounded copy, and a second one in the page cache would break the memory bound.
    """

    def __init__(self) -> None:
        self._io = current_platform_io()
        self._files = FileTable(prepare=self._io.prepare_buffered)
        self.stats = {"reader": "pread", "io_mode": "buffered"}

    def read(self, requests: Sequence[ReadRequest]) -> None:
        for request in requests:
            try:
                fd = self._files.fd(request.path)
                pread_into(fd, request.out, request.offset, request.path)
                self._io.forget_range(fd, request.offset, len(request.out))
            except ExpertReadError:
                # Reopen on the next attempt: the file may have been replaced, not just damaged.
                self._files.forget(request.path)
                raise

    def close(self) -> None:
        self._files.close()
