"""Reading safetensors checkpoints without trusting them.

We parse shard headers ourselves (u64 little-endian length, JSON, data) so that every
offset can be checked against the file size before a byte is read, and so that a hostile
header cannot make us allocate gigabytes or read past the end of a file. Every failure is a
:class:`CheckpointError` that names the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outlier_runtime.core.errors import CheckpointError
from outlier_runtime.engine.fileio import open_regular

#: The safetensors format caps the header at 100 MB; a larger length is corrupt or hostile.
MAX_HEADER_BYTES = 100_000_000
INDEX_FILE = "model.safetensors.index.json"

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: ``nbytes`` bytes at absolute ``offset`` of ``path``."""

    name: str
    path: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_shard_header(path: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors file's header; returns its tensors by name."""
    path = str(path)
    fd = open_regular(path)  # a FIFO or a directory in a shard's place is refused, not waited on
    try:
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)", path)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise CheckpointError(
                    f"{path}: header length {header_len} is impossible for a {size}-byte file "
                    f"(corrupt or truncated shard; re-download it)",
                    path,
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read shard: {exc.strerror or exc}", path) from exc
    if len(raw) < header_len:
        raise CheckpointError(f"{path}: truncated header", path)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON: {exc}", path) from None
    except _DuplicateKey as exc:
        raise CheckpointError(f"{path}: header lists {exc.args[0]!r} twice", path) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object", path)
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, size)
    _check_overlaps(path, entries)
    return entries


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Plain json.loads keeps the last of two equal keys; a tensor listed twice is corruption.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _entry(path: str, name: str, info: Any, data_start: int, size: int) -> TensorEntry:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {why}", path)

    if not isinstance(info, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise bad(f"data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"data_offsets {offsets!r} are not ordered")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise bad(f"holds {end - begin} bytes but {dtype}{shape} needs {expected}")
    if data_start + end > size:
        raise bad(f"ends at byte {data_start + end} but the file has {size} bytes (truncated shard; re-download it)")
    return TensorEntry(name, path, dtype, tuple(shape), data_start + begin, end - begin)


def _check_overlaps(path: str, entries: dict[str, TensorEntry]) -> None:
    previous: TensorEntry | None = None
    for entry in sorted(entries.values(), key=lambda e: (e.offset, e.nbytes)):
        if previous is not None and entry.nbytes and entry.offset < previous.offset + previous.nbytes:
            raise CheckpointError(
                f"{path}: tensors {previous.name!r} and {entry.name!r} overlap on disk (corrupt shard)", path
            )
        if entry.nbytes:
            previous = entry


def shard_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint's shard files: from the index when there is one, else model*.safetensors."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        weight_map = read_index(index_path)
        names = sorted(set(weight_map.values()))
        return [model_dir / name for name in names]
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no model*.safetensors files and no {INDEX_FILE}", str(model_dir))
    return files


def read_index(index_path: Path) -> dict[str, str]:
    """The tensor-to-shard map of a model.safetensors.index.json, validated."""
    try:
        data = json.loads(index_path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{index_path}: cannot read: {exc.strerror or exc}", str(index_path)) from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{index_path}: not valid UTF-8 JSON: {exc}", str(index_path)) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index_path}: `weight_map` must map tensor names to shard file names", str(index_path))
    for shard in set(weight_map.values()):
        if Path(shard).name != shard:
            raise CheckpointError(f"{index_path}: shard name {shard!r} must be a plain file name", str(index_path))
    return weight_map


def read_checkpoint(model_dir: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint directory, validated against its shards' sizes."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    weight_map = read_index(index_path) if index_path.exists() else None
    entries: dict[str, TensorEntry] = {}
    for shard in shard_files(model_dir):
        if not shard.exists():
            raise CheckpointError(
                f"{shard}: shard listed in {INDEX_FILE} is missing (incomplete download? fetch it again)", str(shard)
            )
        for name, entry in read_shard_header(shard).items():
            if name in entries:
                raise CheckpointError(
                    f"{shard}: tensor {name!r} is also in {entries[name].path}; a tensor must live in one shard",
                    str(shard),
                )
            entries[name] = entry
    if weight_map is not None:
        for name, shard_name in weight_map.items():
            entry = entries.get(name)
            if entry is None or Path(entry.path).name != shard_name:
                raise CheckpointError(
                    f"{model_dir / shard_name}: {INDEX_FILE} says it holds {name!r} but its header does not",
                    str(model_dir / shard_name),
                )
    return entries
