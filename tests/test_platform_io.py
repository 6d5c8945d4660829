"""Reads around the page cache on Linux (O_DIRECT) and macOS (F_NOCACHE), both tested on Linux.

macOS's branch runs against a stand-in ``fcntl`` module that records calls: the logic (which
commands, which arguments, what the reader reports) is checked here; the syscalls themselves
only on a Mac.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from outlier_runtime.core.protocols import ReadRequest
from outlier_runtime.engine.buffers import aligned_empty
from outlier_runtime.engine.platform_io import (
    MACOS_F_NOCACHE,
    MACOS_F_RDADVISE,
    LinuxIO,
    MacIO,
    current_platform_io,
    platform_io_for,
)


class FakeFcntl:
    """macOS's fcntl as far as the readers use it: records (fd, command, argument)."""

    def __init__(self, refuse: int | None = None, with_constants: bool = False):
        self.calls: list[tuple[int, int, object]] = []
        self.refuse = refuse
        if with_constants:
            self.F_NOCACHE, self.F_RDADVISE = 1048, 1044

    def fcntl(self, fd, command, argument=0):
        self.calls.append((fd, command, argument))
        if self.refuse is not None:
            raise OSError(self.refuse, os.strerror(self.refuse))
        return 0


class FakeOs:
    O_DIRECT = 0o40000
    POSIX_FADV_WILLNEED, POSIX_FADV_DONTNEED = 3, 4

    def __init__(self):
        self.calls: list[tuple] = []

    def posix_fadvise(self, fd, offset, length, advice):
        self.calls.append(("fadvise", fd, offset, length, advice))

    def fdatasync(self, fd):
        self.calls.append(("fdatasync", fd))


def test_platform_is_chosen_by_sys_platform():
    assert isinstance(platform_io_for("darwin"), MacIO)
    assert isinstance(platform_io_for("linux"), LinuxIO)
    assert current_platform_io().name == ("darwin" if os.uname().sysname == "Darwin" else "linux")


def test_linux_opens_with_o_direct_and_evicts_with_fadvise():
    fake = FakeOs()
    io = LinuxIO(fake)
    assert io.uncached_open_flags == FakeOs.O_DIRECT and io.uncached_available
    assert io.uncached_mode == "direct" and io.uncached_method == "O_DIRECT"
    io.prepare_uncached(7)  # nothing to do after open
    io.advise(7, 4096, 8192)
    assert io.drop_cache(7) is True
    assert fake.calls == [("fadvise", 7, 4096, 8192, 3), ("fdatasync", 7), ("fadvise", 7, 0, 0, 4)]
    assert "posix_fadvise" in io.page_cache_method


def test_linux_without_o_direct_reads_buffered():
    class NoDirect:
        pass

    io = LinuxIO(NoDirect())
    assert not io.uncached_available
    io.advise(3, 0, 10)  # no posix_fadvise: the hint is skipped, not an error


@pytest.mark.parametrize("with_constants", [False, True])
def test_macos_sets_f_nocache_and_advises_with_a_radvisory(with_constants):
    fake = FakeFcntl(with_constants=with_constants)
    io = MacIO(fake)
    nocache, rdadvise = (1048, 1044) if with_constants else (MACOS_F_NOCACHE, MACOS_F_RDADVISE)
    assert io.uncached_open_flags == 0 and io.uncached_available
    assert io.uncached_mode == "nocache" and io.uncached_method == "F_NOCACHE"
    io.prepare_uncached(5)
    io.advise(5, 1 << 33, 3 << 30)  # an offset past 4 GiB, a count clipped to INT_MAX
    (fd, command, argument), (fd2, command2, advisory) = fake.calls
    assert (fd, command, argument) == (5, nocache, 1)
    assert (fd2, command2) == (5, rdadvise)
    assert len(advisory) == 16 and struct.unpack("=qi4x", advisory) == (1 << 33, 2**31 - 1)
    assert io.drop_cache(5) is False
    assert "F_NOCACHE" in io.page_cache_method and "posix_fadvise" in io.page_cache_method


def test_macos_advise_failure_is_only_a_lost_hint():
    MacIO(FakeFcntl(refuse=errno.EINVAL)).advise(5, 0, 4096)


@pytest.fixture
def data_file(tmp_path: Path) -> str:
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 1 << 18, dtype=np.uint8).tobytes())
    return str(path)


def _fanout_on(monkeypatch, io):
    import outlier_fanout.reader as fanout

    monkeypatch.setattr(fanout, "current_platform_io", lambda: io)
    return fanout


def _read(reader, path, ranges):
    buffers = [aligned_empty(length) for _, length in ranges]
    reader.read([ReadRequest(path, offset, length, memoryview(b)) for (offset, length), b in zip(ranges, buffers)])
    return [b.tobytes() for b in buffers]


def test_fanout_on_macos_reads_aligned_requests_through_f_nocache(monkeypatch, data_file):
    fake = FakeFcntl()
    fanout = _fanout_on(monkeypatch, MacIO(fake))
    reader = fanout.FanoutReader(workers=2, chunk_bytes=8192)
    ranges = [(0, 65536), (8192, 4096 * 5)]
    got = _read(reader, data_file, ranges)
    data = Path(data_file).read_bytes()
    assert got == [data[o:o + n] for o, n in ranges]
    stats = reader.stats
    assert stats["io_mode"] == "nocache" and stats["uncached_method"] == "F_NOCACHE"
    assert stats["direct_bytes"] == 65536 + 4096 * 5 and stats["buffered_bytes"] == 0
    # One uncached descriptor per file, set up once.
    assert [(command, argument) for _, command, argument in fake.calls] == [(MACOS_F_NOCACHE, 1)]
    reader.close()


def test_fanout_on_macos_falls_back_when_f_nocache_is_refused(monkeypatch, data_file):
    fanout = _fanout_on(monkeypatch, MacIO(FakeFcntl(refuse=errno.ENOTSUP)))
    reader = fanout.FanoutReader(workers=1, chunk_bytes=8192)
    data = Path(data_file).read_bytes()
    assert _read(reader, data_file, [(0, 16384)]) == [data[:16384]]
    stats = reader.stats
    assert stats["io_mode"] == "buffered" and stats["direct_refused"] == [data_file]
    reader.close()


def test_fanout_advise_hints_every_buffered_range(monkeypatch, data_file):
    fake = FakeFcntl()
    fanout = _fanout_on(monkeypatch, MacIO(fake))
    reader = fanout.FanoutReader(workers=1, advise=True)
    buffers = [np.empty(n + 1, np.uint8)[1:] for n in (10, 9000)]  # unaligned: page-cache reads
    reader.read([ReadRequest(data_file, o, n, memoryview(b)) for (o, n), b in zip([(1, 10), (4095, 9000)], buffers)])
    advised = [struct.unpack("=qi4x", argument) for _, command, argument in fake.calls if command == MACOS_F_RDADVISE]
    assert advised == [(1, 10), (4095, 9000)]
    assert reader.stats["io_mode"] == "buffered" and reader.stats["advise"] is True
    reader.close()


def test_bad_advise_option_names_it():
    from outlier_fanout.reader import FanoutReader

    from outlier_runtime.core.errors import ManifestError

    with pytest.raises(ManifestError, match="reader_options.advise"):
        FanoutReader(advise="yes")


def test_bench_eviction_reports_macos_cannot(monkeypatch, tmp_path):
    import outlier_runtime.bench.worker as worker

    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 4096)
    monkeypatch.setattr(worker, "current_platform_io", lambda: MacIO(FakeFcntl()))
    assert worker.evict([path]) is False
    fake = FakeOs()
    monkeypatch.setattr(worker, "current_platform_io", lambda: LinuxIO(fake))
    assert worker.evict([path]) is True
    assert [call[0] for call in fake.calls] == ["fdatasync", "fadvise"]
