"""The fanout reader reads exactly what pread reads, in parallel, with O_DIRECT where aligned."""

from __future__ import annotations

import errno
import os
import random
import shutil

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

import outlier_runtime
from outlier_runtime.engine.platform_io import current_platform_io
from outlier_runtime.engine.buffers import aligned_empty
from outlier_runtime.core.errors import ExpertReadError, ManifestError
from outlier_runtime.engine.pack import pack_model
from outlier_runtime.core.catalog import resolve_tier
from outlier_runtime.core.plugin_manager import get_registry
from outlier_fanout.reader import FanoutReader
from outlier_runtime.core.protocols import ReadRequest

PROMPT = "import os\n\ndef walk(path):\n    for name in os.listdir(path):\n"
FILE_BYTES = 1 << 20


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, FILE_BYTES, dtype=np.uint8).tobytes())
    return str(path)


def _reader(name, **options):
    return get_registry().create("reader", name, options)


def _read_all(reader, ranges, path, aligned):
    """Read ``ranges`` [(offset, length)] in one batch; returns the bytes of each."""
    buffers = [aligned_empty(length) if aligned else np.empty(length + 1, np.uint8)[1:] for _, length in ranges]
    reader.read([ReadRequest(path, offset, length, memoryview(buf)) for (offset, length), buf in zip(ranges, buffers)])
    reader.close()
    return [buf.tobytes() for buf in buffers]


def test_aligned_requests_match_pread_and_use_o_direct(data_file):
    ranges = [(0, 65536), (16384, 4096 * 37), (4096 * 100, 4096 * 3)]
    reader = _reader("fanout", workers=4, chunk_bytes=8192)
    got = _read_all(reader, ranges, data_file, aligned=True)
    assert got == _read_all(_reader("pread"), ranges, data_file, aligned=True)
    stats = reader.stats
    assert stats["reader"] == "fanout"
    assert stats["direct_bytes"] + stats["buffered_bytes"] == sum(length for _, length in ranges)
    if not stats["direct_refused"]:  # this filesystem reads uncached: every aligned byte went that way
        # "direct" (O_DIRECT) on Linux, "nocache" (F_NOCACHE) on macOS.
        assert stats["io_mode"] == current_platform_io().uncached_mode and stats["buffered_bytes"] == 0


@pytest.mark.parametrize("buffered_chunk_bytes", [0, 4096])
def test_unaligned_requests_match_pread_and_read_buffered(data_file, buffered_chunk_bytes):
    ranges = [(1, 10), (4095, 9000), (123457, 70001), (FILE_BYTES - 5, 5)] + [(7, 300_000)]
    reader = _reader("fanout", workers=3, chunk_bytes=4096, buffered_chunk_bytes=buffered_chunk_bytes)
    assert _read_all(reader, ranges, data_file, aligned=False) == _read_all(_reader("pread"), ranges, data_file,
                                                                            aligned=False)
    assert reader.stats["io_mode"] == "buffered"
    assert reader.stats["direct_bytes"] == 0


def test_many_requests_in_one_batch(data_file):
    rng = random.Random(1)
    ranges = []
    for _ in range(300):
        offset = rng.randrange(FILE_BYTES - 1)
        ranges.append((offset, rng.randrange(1, min(20000, FILE_BYTES - offset) + 1)))
    reader = _reader("fanout", workers=8, chunk_bytes=4096, buffered_chunk_bytes=8192)
    assert _read_all(reader, ranges, data_file, aligned=False) == _read_all(_reader("pread"), ranges, data_file,
                                                                            aligned=False)
    assert reader.stats["reads"] == 1 and reader.stats["pieces"] >= 300


@pytest.mark.parametrize("aligned", [True, False])
def test_truncated_file_names_the_file(data_file, aligned):
    reader = _reader("fanout", workers=4, chunk_bytes=4096)
    offset = FILE_BYTES - 8192 if aligned else FILE_BYTES - 8191
    big, buffer = aligned_empty(1 << 19), aligned_empty(16384)  # enough bytes to use the worker threads
    with pytest.raises(ExpertReadError, match="file ends before byte") as caught:
        reader.read([ReadRequest(data_file, 0, 1 << 19, memoryview(big)),
                     ReadRequest(data_file, offset, 16384, memoryview(buffer))])
    assert data_file in str(caught.value) and caught.value.path == data_file
    reader.close()


def test_missing_file_names_the_file(tmp_path):
    reader = _reader("fanout")
    missing = str(tmp_path / "gone.bin")
    with pytest.raises(ExpertReadError, match="cannot open") as caught:
        reader.read([ReadRequest(missing, 0, 4096, memoryview(aligned_empty(4096)))])
    assert missing in str(caught.value)
    reader.close()


def test_filesystem_refusing_o_direct_falls_back_to_buffered(data_file, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    ranges = [(0, 65536), (8192, 4096)]
    reader = _reader("fanout", workers=2, chunk_bytes=16384)
    assert _read_all(reader, ranges, data_file, aligned=True) == _read_all(_reader("pread"), ranges, data_file,
                                                                           aligned=True)
    stats = reader.stats
    assert stats["io_mode"] == "buffered" and stats["buffered_bytes"] == 65536 + 4096
    if hasattr(os, "O_DIRECT"):
        assert stats["direct_refused"] == [data_file]


def test_direct_can_be_switched_off(data_file):
    reader = _reader("fanout", direct=False)
    _read_all(reader, [(0, 65536)], data_file, aligned=True)
    assert reader.stats["io_mode"] == "buffered" and reader.stats["direct_enabled"] is False


@pytest.mark.parametrize("options, field", [({"workers": 0}, "workers"), ({"chunk_bytes": 1000}, "chunk_bytes"),
                                            ({"direct": "yes"}, "direct"),
                                            ({"buffered_chunk_bytes": -1}, "buffered_chunk_bytes"),
                                            ({"keep_page_cache": "maybe"}, "keep_page_cache")])
def test_bad_options_name_the_option(options, field):
    # In a manifest: the file, the key path and the plugin, before anything loads.
    with pytest.raises(ManifestError, match=rf"plus.toml.*key `paging\.reader_options\.{field}`: reader 'fanout'"):
        resolve_tier("plus", get_registry(), {"reader": "fanout", "reader_options": options})
    # Built directly, the reader checks the same constraints.
    with pytest.raises(ManifestError, match=f"reader_options.{field}"):
        FanoutReader(**options)


@pytest.fixture(scope="module")
def stock(tiny):
    path = tiny("qwen3_moe")
    model, tokenizer = mlx_lm.load(str(path))
    ids = mx.array(tokenizer.encode(PROMPT))[None]
    tokens = [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=8)]
    return path, ids, model(ids), tokens


@pytest.mark.parametrize("packed", [False, True])
def test_paged_engine_with_fanout_is_exact(stock, tmp_path, packed):
    source, ids, logits, tokens = stock
    path = tmp_path / "model"
    shutil.copytree(source, path)  # the pack is written next to the checkpoint: use a copy
    if packed:
        pack_model(path)
    runtime = outlier_runtime.load("plus", model=str(path), k_override=2, cache_gb=0, reader="fanout",
                                   reader_options={"workers": 4, "chunk_bytes": 4096}, use_pack=packed, force=True)
    try:
        assert mx.array_equal(runtime.model(ids), logits).item()
        result = runtime.generate(PROMPT, max_tokens=8, temperature=0.0, chat=False)
        assert result.tokens == tokens
        config = result.engine["config"]
        assert config["reader"] == "fanout" and config["pack"] == ("used" if packed else "not used")
        io = config["reader_io"]
        assert io["reader"] == "fanout" and io["direct_bytes"] + io["buffered_bytes"] > 0
        if packed and not io["direct_refused"]:
            assert io["io_mode"] == current_platform_io().uncached_mode  # pack reads are aligned end to end
        if not packed:
            assert io["buffered_bytes"] > 0  # shard ranges are not aligned
    finally:
        runtime.close()
