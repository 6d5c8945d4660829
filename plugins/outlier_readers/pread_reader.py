"""``pread``: one positional read per requested range, one after another."""

from __future__ import annotations

from typing import Sequence

from outlier_runtime.core.errors import ExpertReadError
from outlier_runtime.engine.fileio import FileTable, pread_into
from outlier_runtime.core.protocols import ReadRequest



class PreadReader:
    """The product's baseline: a plain read per tensor range, in the calling thread."""

    def __init__(self) -> None:
        self._files = FileTable()
        self.stats = {"reader": "pread", "io_mode": "buffered"}

    def read(self, requests: Sequence[ReadRequest]) -> None:
        for request in requests:
            try:
                pread_into(self._files.fd(request.path), request.out, request.offset, request.path)
            except ExpertReadError:
                # Reopen on the next attempt: the file may have been replaced, not just damaged.
                self._files.forget(request.path)
                raise

    def close(self) -> None:
        self._files.close()
