"""The safetensors parser never crashes, hangs or over-allocates on hostile files.

Every malformed file ends in a CheckpointError naming the file; a well-formed one parses to
entries that lie inside the file and do not overlap. Cases found worth keeping live in
tests/corpus/safetensors/ and are replayed on every run.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outlier_runtime.engine.checkpoint import DTYPE_SIZES, INDEX_FILE, read_checkpoint, read_shard_header
from outlier_runtime.core.errors import CheckpointError

CORPUS = Path(__file__).parent / "corpus" / "safetensors"


def _file(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    return struct.pack("<Q", length) + raw + data


def _valid() -> bytes:
    return _file(
        {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
         "b": {"dtype": "U8", "shape": [4], "data_offsets": [16, 20]},
         "__metadata__": {"format": "mlx"}},
        bytes(range(20)),
    )


def _check(path: Path) -> None:
    """The parser's contract: entries that are sound, or a CheckpointError naming the file."""
    try:
        entries = read_shard_header(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
        return
    size = path.stat().st_size
    spans = sorted((e.offset, e.offset + e.nbytes) for e in entries.values() if e.nbytes)
    for (start, end), (next_start, _) in zip(spans, spans[1:]):
        assert end <= next_start
    for entry in entries.values():
        assert 8 <= entry.offset and entry.offset + entry.nbytes <= size
        count = 1
        for dim in entry.shape:
            count *= dim
        assert entry.nbytes == count * DTYPE_SIZES[entry.dtype]


def test_corpus_has_cases():
    assert len(list(CORPUS.glob("bad-*.safetensors"))) >= 15


@pytest.mark.parametrize("case", sorted(CORPUS.glob("bad-*.safetensors")), ids=lambda p: p.name)
def test_hostile_corpus_files_are_refused_naming_the_file(case):
    with pytest.raises(CheckpointError) as error:
        read_shard_header(case)
    assert str(case) in str(error.value)


def test_valid_file_parses(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(_valid())
    entries = read_shard_header(path)
    assert set(entries) == {"a", "b"} and entries["b"].nbytes == 4
    _check(path)


@pytest.mark.parametrize("case", sorted(CORPUS.glob("*.safetensors")), ids=lambda p: p.name)
def test_corpus_cases_keep_the_contract(case):
    _check(case)


entry = st.fixed_dictionaries({
    "dtype": st.sampled_from([*DTYPE_SIZES, "F99", 3]),
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.integers()),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 64), min_size=0, max_size=3), st.text(max_size=3)),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=4), entry, max_size=4), data=st.binary(max_size=64),
       skew=st.integers(-8, 8))
def test_fuzzed_headers(tmp_path, header, data, skew):
    raw = json.dumps(header).encode()
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_file(raw, data, header_len=max(0, len(raw) + skew)))
    _check(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 200))
def test_mutated_valid_file(tmp_path, flips, cut):
    raw = bytearray(_valid())
    for position, value in flips:
        if position < len(raw):
            raw[position] = value
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(raw[: max(cut, 0)] if cut < len(raw) else raw))
    _check(path)


@pytest.mark.parametrize("index, why", [
    (b"\xff\xfe", "UTF-8"),
    (b'{"weight_map": []}', "weight_map"),
    (b'{"weight_map": {"a": "../etc/passwd"}}', "plain file name"),
    (b'{"weight_map": {"a": "missing.safetensors"}}', "missing"),
    (b'{"weight_map": {"a": "one.safetensors", "c": "one.safetensors"}}', "does not"),
])
def test_hostile_index_files(tmp_path, index, why):
    (tmp_path / "one.safetensors").write_bytes(_valid())
    (tmp_path / INDEX_FILE).write_bytes(index)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path)
    assert why in str(error.value)


def test_tensor_in_two_shards_is_refused(tmp_path):
    (tmp_path / "model-1.safetensors").write_bytes(_valid())
    (tmp_path / "model-2.safetensors").write_bytes(_valid())
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path)
    assert "one shard" in str(error.value)
