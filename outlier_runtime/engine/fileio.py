"""Building blocks for readers: a table of open files, and a positional read that fills a buffer.

Readers run in the generating thread and in prefetch or worker threads at once, so both are
thread safe, and a descriptor is never closed while another thread may still read from it.
A descriptor is kept for as long as its path names the same file: a file replaced on disk
(renamed over, as ``outlier pack`` and Hugging Face downloads do) never changes under a
reader, and is opened afresh only after a read error, once the path names another file.
"""

from __future__ import annotations

import os
import stat
import threading
from typing import Callable

from outlier_runtime.core.errors import CheckpointError, ExpertReadError


def open_regular(path: str | os.PathLike[str], flags: int = 0, error: type[CheckpointError] = CheckpointError) -> int:
    """Open ``path`` read-only and return its descriptor, refusing anything but a regular file.

    Opened non-blocking first: ``open()`` of a FIFO would wait forever for a writer.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | flags)
    except OSError as exc:
        raise error(f"{path}: cannot open: {exc.strerror or exc}", path) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: not a regular file ({_kind(mode)}); replace it with the real file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open on ``fd`` (True when the path is gone: keep reading it)."""
    try:
        now = os.stat(path)
    except OSError:
        return True
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


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
                fd = open_regular(path, self._flags, ExpertReadError)
                if self._prepare is not None:
                    try:
                        self._prepare(fd)
                    except OSError as exc:
                        os.close(fd)
                        raise ExpertReadError(f"{path}: cannot set up reads: {exc.strerror or exc}", path) from exc
                self._fds[path] = fd
            return self._fds[path]

    def forget(self, path: str) -> None:
        """After a read error: if ``path`` now names another file (a shard re-downloaded), the next
        read opens it afresh. Otherwise the descriptor is kept, so that repeated failures of the
        same file never pile up descriptors (retired ones stay open until close())."""
        with self._lock:
            fd = self._fds.get(path)
            if fd is not None and not same_file(fd, path):
                self._retired.append(self._fds.pop(path))

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
