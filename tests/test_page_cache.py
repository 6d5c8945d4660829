"""Buffered expert reads leave nothing in the page cache: the engine's copy is the only one."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from outlier_runtime.core.plugin_manager import get_registry
from outlier_runtime.core.protocols import ReadRequest
from outlier_runtime.engine.buffers import aligned_empty

SIZE = 8 << 20
CHUNK = 61_440  # a demo-sized expert record: not page-aligned, so the fanout reader reads it buffered


def _cached(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.fixture
def cold_file(tmp_path):
    if shutil.which("fincore") is None:
        pytest.fail("fincore (util-linux) is needed to measure the page cache; install util-linux")
    path = tmp_path / "shard.bin"
    path.write_bytes(os.urandom(SIZE))
    fd = os.open(path, os.O_RDONLY)
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert _cached(path) == 0
    return path


def _read_all(reader, path) -> bytes:
    buffer = aligned_empty(SIZE)
    view = memoryview(buffer)
    reader.read([ReadRequest(str(path), offset, min(CHUNK, SIZE - offset), view[offset:offset + CHUNK])
                 for offset in range(1, SIZE - CHUNK, CHUNK)])
    return bytes(buffer)


@pytest.mark.parametrize("name, options", [("pread", {}), ("fanout", {"workers": 2}),
                                           ("fanout", {"workers": 2, "direct": False})])
def test_readers_that_drop_what_they_read_still_read_the_true_bytes(cold_file, name, options):
    reader = get_registry().create("reader", name, options)
    try:
        got = _read_all(reader, cold_file)
    finally:
        reader.close()
    expected = cold_file.read_bytes()  # (this read caches the file; the reader's result is known)
    assert got[1:SIZE - CHUNK] == expected[1:SIZE - CHUNK]


@pytest.mark.parametrize("name, options", [("pread", {}), ("fanout", {"workers": 2}),
                                           ("fanout", {"workers": 2, "direct": False})])
def test_what_a_reader_leaves_cached_is_measured_against_a_plain_read(cold_file, name, options):
    reader = get_registry().create("reader", name, options)
    try:
        _read_all(reader, cold_file)
    finally:
        reader.close()
    assert _cached(cold_file) <= 0.05 * SIZE
    fd = os.open(cold_file, os.O_RDONLY)
    try:
        os.pread(fd, SIZE, 0)  # the product's plain read, for contrast: the whole file stays cached
    finally:
        os.close(fd)
    assert _cached(cold_file) >= 0.95 * SIZE


@pytest.mark.parametrize("keep", [True, False])
def test_keep_page_cache_leaves_what_the_fanout_reader_read_cached(cold_file, keep):
    # The option the peer bench uses to measure what an mmap reader gains from the page cache:
    # with it the bytes read stay cached (outside the memory plan), without it they are dropped.
    reader = get_registry().create("reader", "fanout", {"workers": 2, "direct": False, "keep_page_cache": keep})
    try:
        got = _read_all(reader, cold_file)
        assert reader.stats["keep_page_cache"] is keep and reader.stats["io_mode"] == "buffered"
    finally:
        reader.close()
    read_span = (SIZE - CHUNK) - 1  # the reads cover bytes 1 .. SIZE - CHUNK
    if keep:
        assert _cached(cold_file) >= 0.95 * read_span
    else:
        assert _cached(cold_file) <= 0.05 * SIZE
    assert got[1:SIZE - CHUNK] == cold_file.read_bytes()[1:SIZE - CHUNK]
