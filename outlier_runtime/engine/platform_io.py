"""Reading around the page cache, per platform: O_DIRECT on Linux, F_NOCACHE on macOS.

Expert reads are large and rarely repeated soon; through the page cache they cost a copy and
memory the OS will not give back quickly (on a 32 GB Mac that memory is what the model needs).
- Linux: a descriptor opened with ``O_DIRECT`` reads straight into the caller's buffer; the
  offset, length and buffer address must be aligned to the logical block size. A file's cached
  pages can be dropped with ``posix_fadvise(DONTNEED)``.
- macOS has neither: ``fcntl(fd, F_NOCACHE, 1)`` turns caching off for reads through that
  descriptor (what Flash-MoE and boyle use), ``fcntl(fd, F_RDADVISE, radvisory)`` asks the
  kernel to start reading a range. Nothing drops another file's cached pages without root.
Everything platform-specific the readers and the benchmark use sits here, one class per
platform; tests run both on Linux with a stand-in ``fcntl`` module.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Any

#: <sys/fcntl.h> on macOS; Python's fcntl module exports F_NOCACHE there, not always F_RDADVISE.
MACOS_F_NOCACHE = 48
MACOS_F_RDADVISE = 44
#: struct radvisory { off_t ra_offset; int ra_count; }: 8 + 4 bytes, padded to 16.
_RADVISORY = struct.Struct("=qi4x")
_INT_MAX = 2**31 - 1
#: The page size the page cache works in (16 KiB on Apple Silicon, 4 KiB on most Linux).
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class LinuxIO:
    """O_DIRECT descriptors, posix_fadvise hints and eviction."""

    name = "linux"
    uncached_method = "O_DIRECT"
    #: What the fanout reader's io_mode calls reads that skipped the page cache.
    uncached_mode = "direct"
    page_cache_method = "fdatasync + posix_fadvise(POSIX_FADV_DONTNEED) on every file"

    def __init__(self, os_module: Any = os):
        self._os = os_module
        self.uncached_open_flags = getattr(os_module, "O_DIRECT", 0)

    @property
    def uncached_available(self) -> bool:
        return bool(self.uncached_open_flags)

    def prepare_uncached(self, fd: int) -> None:
        """Nothing to do: O_DIRECT was given to open()."""

    def advise(self, fd: int, offset: int, length: int) -> None:
        """Ask the kernel to start reading the range (a hint: failures are ignored)."""
        advise = getattr(self._os, "posix_fadvise", None)
        if advise is not None:
            try:
                advise(fd, offset, length, self._os.POSIX_FADV_WILLNEED)
            except OSError:
                pass

    def prepare_buffered(self, fd: int) -> None:
        """Expert reads jump around a shard: no readahead past each range (it would fill the page
        cache with neighbours no one asked for, pages that ``forget_range`` never sees)."""
        advise = getattr(self._os, "posix_fadvise", None)
        if advise is not None:
            try:
                advise(fd, 0, 0, self._os.POSIX_FADV_RANDOM)
            except OSError:
                pass

    def forget_range(self, fd: int, offset: int, length: int) -> None:
        """The range was read into our own buffer: drop its pages from the page cache, so buffered
        expert reads do not fill memory with a second copy (a hint: failures are ignored)."""
        advise = getattr(self._os, "posix_fadvise", None)
        if advise is not None:
            # The kernel drops only whole pages inside the range: widen it to page boundaries, or
            # the page an expert shares with its neighbour would stay cached after every read.
            start = offset - offset % PAGE
            end = -(-(offset + length) // PAGE) * PAGE
            try:
                advise(fd, start, end - start, self._os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def drop_cache(self, fd: int) -> bool:
        """Evict the file's pages from the page cache (dirty pages cannot be, so sync first)."""
        self._os.fdatasync(fd)
        self._os.posix_fadvise(fd, 0, 0, self._os.POSIX_FADV_DONTNEED)
        return True


class MacIO:
    """F_NOCACHE descriptors and F_RDADVISE hints; no eviction of other files' pages."""

    name = "darwin"
    uncached_method = "F_NOCACHE"
    uncached_mode = "nocache"
    uncached_open_flags = 0
    uncached_available = True
    page_cache_method = ("none available (macOS has no posix_fadvise): reads through F_NOCACHE "
                         "descriptors leave nothing cached; buffered reads may be served from cache")

    def __init__(self, fcntl_module: Any = None):
        if fcntl_module is None:
            import fcntl as fcntl_module
        self._fcntl = fcntl_module
        self._nocache = getattr(fcntl_module, "F_NOCACHE", MACOS_F_NOCACHE)
        self._rdadvise = getattr(fcntl_module, "F_RDADVISE", MACOS_F_RDADVISE)

    def prepare_uncached(self, fd: int) -> None:
        """Turn the page cache off for this descriptor's reads (raises OSError if refused)."""
        self._fcntl.fcntl(fd, self._nocache, 1)

    def advise(self, fd: int, offset: int, length: int) -> None:
        """F_RDADVISE: start reading the range now (a hint: failures are ignored)."""
        try:
            self._fcntl.fcntl(fd, self._rdadvise, _RADVISORY.pack(offset, min(length, _INT_MAX)))
        except OSError:
            pass

    def prepare_buffered(self, fd: int) -> None:
        """Nothing: macOS has no readahead advice per descriptor."""

    def forget_range(self, fd: int, offset: int, length: int) -> None:
        """Nothing: macOS cannot drop a range; readers that must not cache use F_NOCACHE instead."""

    def drop_cache(self, fd: int) -> bool:
        return False


def platform_io_for(system: str) -> LinuxIO | MacIO:
    """The implementation for ``sys.platform`` value ``system`` (Linux's serves other Unixes)."""
    return MacIO() if system == "darwin" else LinuxIO()


_CURRENT: LinuxIO | MacIO | None = None


def current_platform_io() -> LinuxIO | MacIO:
    """This machine's implementation."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = platform_io_for(sys.platform)
    return _CURRENT
