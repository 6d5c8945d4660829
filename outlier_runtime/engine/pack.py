"""The packed expert layout: one page-aligned record per expert, one read per miss.

``write_pack(model_dir)`` rewrites every MoE layer's experts into ``<model>/experts-pack/
layer-NNN.bin``: expert ``e`` of the layer is its tensors back to back (the order of the
expert index) at offset ``e * stride``, ``stride`` a multiple of the alignment. ``index.json``
records the layout, the source shards' sizes and header hashes, optional per-expert CRC32s,
and a SHA-256 of itself, so a pack that no longer matches its checkpoint is refused, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

from outlier_runtime.engine.buffers import DEFAULT_ALIGNMENT, DIRECT_IO_ALIGNMENT, aligned_empty, round_up
from outlier_runtime.engine.checkpoint import shard_files
from outlier_runtime.core.errors import CheckpointError
from outlier_runtime.engine.experts import ExpertIndex, ExpertLayer, PackedLayer

PACK_DIR = "experts-pack"
PACK_INDEX = "index.json"
FORMAT_VERSION = 1

Progress = Callable[[int, int], None]


def _shard_fingerprints(model_dir: Path) -> dict[str, dict[str, Any]]:
    """Size and header hash of each shard: cheap to check, and changes when the shard does."""
    prints = {}
    for shard in shard_files(model_dir):
        try:
            with open(shard, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = handle.read(min(header_len, size))
        except (OSError, struct.error) as exc:
            raise CheckpointError(f"{shard}: cannot fingerprint shard: {exc}", str(shard)) from exc
        prints[shard.name] = {"size": size, "header_sha256": hashlib.sha256(header).hexdigest()}
    return prints


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_pack(
    model_dir: str | os.PathLike[str],
    index: ExpertIndex,
    *,
    alignment: int = DEFAULT_ALIGNMENT,
    checksums: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Write the pack for ``index`` (built from ``model_dir``'s checkpoint); returns its index path."""
    model_dir = Path(model_dir)
    out = model_dir / PACK_DIR
    out.mkdir(exist_ok=True)
    index_path = out / PACK_INDEX
    index_path.unlink(missing_ok=True)  # an interrupted rewrite must not leave a valid-looking pack
    total = sum(layer.num_experts for layer in index.layers)
    done = 0
    layers = []
    sources: dict[str, Any] = {}
    try:
        for layer in index.layers:
            layers.append(_write_layer(out, layer, alignment, checksums, sources))
            done += layer.num_experts
            if progress:
                progress(done, total)
    finally:
        for handle in sources.values():
            handle.close()
    body = {
        "format": FORMAT_VERSION,
        "alignment": alignment,
        "shards": _shard_fingerprints(model_dir),
        "layers": layers,
    }
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**body, "sha256": _digest(body)}, indent=1))
    tmp.replace(index_path)  # the index appears last, atomically: its presence means "complete"
    return index_path


def _layout(layer: ExpertLayer) -> list[dict[str, Any]]:
    """How a layer's expert record is laid out: what the pack index stores and checks."""
    return [
        {"param": t.param, "source": t.entry.name, "nbytes": t.expert_nbytes, "offset": start}
        for t, start in zip(layer.tensors, layer.record_offsets)
    ]


def _write_layer(out: Path, layer: ExpertLayer, alignment: int, checksums: bool,
                 sources: dict[str, Any]) -> dict[str, Any]:
    stride = round_up(layer.expert_nbytes, alignment)
    name = f"layer-{layer.index:03d}.bin"
    record = aligned_empty(stride, alignment)
    sums = []
    with open(out / name, "wb") as handle:
        for expert in range(layer.num_experts):
            record[layer.expert_nbytes:] = 0
            for path, offset, length, start in layer.read_ranges(expert):
                if path not in sources:
                    sources[path] = open(path, "rb")
                sources[path].seek(offset)
                chunk = sources[path].read(length)
                if len(chunk) != length:
                    raise CheckpointError(f"{path}: truncated while packing (re-download the shard)", path)
                record[start:start + length] = memoryview(chunk)
            if checksums:
                sums.append(zlib.crc32(record[:layer.expert_nbytes]))
            handle.write(record.data)
    return {
        "path": layer.path,
        "file": name,
        "num_experts": layer.num_experts,
        "expert_nbytes": layer.expert_nbytes,
        "stride": stride,
        "tensors": _layout(layer),
        "crc32": sums or None,
    }


def check_pack(model_dir: str | os.PathLike[str], index: ExpertIndex) -> dict[str, Any]:
    """Validate the pack against its checkpoint and ``index``; return its body or raise CheckpointError."""
    model_dir = Path(model_dir)
    index_path = model_dir / PACK_DIR / PACK_INDEX
    try:
        data = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index_path}: unreadable pack index: {exc}", str(index_path)) from None

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{index_path}: pack refused: {why}; rebuild it with `outlier pack {model_dir}`",
                               str(index_path))

    if not isinstance(data, dict) or "sha256" not in data:
        raise refuse("not a pack index")
    body = {k: v for k, v in data.items() if k != "sha256"}
    if _digest(body) != data["sha256"]:
        raise refuse("index checksum mismatch (edited or corrupt)")
    if body.get("format") != FORMAT_VERSION:
        raise refuse(f"format {body.get('format')!r}, expected {FORMAT_VERSION}")
    if body.get("shards") != _shard_fingerprints(model_dir):
        raise refuse("the source shards changed since the pack was written")
    layers = body.get("layers")
    if not isinstance(layers, list) or len(layers) != len(index.layers):
        raise refuse("its layers do not match the model's MoE layers")
    for entry, layer in zip(layers, index.layers):
        if (entry.get("path"), entry.get("num_experts"), entry.get("expert_nbytes"), entry.get("tensors")) != (
            layer.path, layer.num_experts, layer.expert_nbytes, _layout(layer)
        ):
            raise refuse(f"layer {layer.path} does not match the checkpoint's expert layout")
        path = model_dir / PACK_DIR / str(entry.get("file"))
        stride = entry.get("stride")
        if not isinstance(stride, int) or stride < layer.expert_nbytes:
            raise refuse(f"layer {layer.path} has an impossible stride {stride!r}")
        try:
            size = path.stat().st_size
        except OSError:
            raise refuse(f"{path} is missing") from None
        if size != stride * layer.num_experts:
            raise refuse(f"{path} has {size} bytes, expected {stride * layer.num_experts}")
    return body


def attach_pack(model_dir: str | os.PathLike[str], index: ExpertIndex) -> bool:
    """Point ``index`` at a valid pack if there is one. Returns whether it did.

    A missing pack is normal (False). A pack that fails validation raises CheckpointError.
    """
    model_dir = Path(model_dir)
    if not (model_dir / PACK_DIR / PACK_INDEX).exists():
        return False
    body = check_pack(model_dir, index)
    alignment = int(body["alignment"])
    for entry, layer in zip(body["layers"], index.layers):
        stride = int(entry["stride"])
        # Read whole aligned blocks when the stride allows it, so O_DIRECT can be used.
        read_length = round_up(layer.expert_nbytes, DIRECT_IO_ALIGNMENT)
        if read_length > stride or alignment % DIRECT_IO_ALIGNMENT:
            read_length = layer.expert_nbytes
        crcs = tuple(entry["crc32"]) if entry.get("crc32") else None
        layer.packed = PackedLayer(str(model_dir / PACK_DIR / entry["file"]), stride, read_length, crcs)
    return True


def pack_model(model_dir: str | os.PathLike[str], *, alignment: int = DEFAULT_ALIGNMENT,
               checksums: bool = True, progress: Progress | None = None) -> Path:
    """Build the expert index of an mlx-lm MoE checkpoint and write its pack (``outlier pack``)."""
    import mlx_lm

    from outlier_runtime.engine.checkpoint import read_checkpoint
    from outlier_runtime.engine.experts import build_expert_index, find_switch_modules

    model, _ = mlx_lm.load(str(model_dir), lazy=True)  # lazy: reads no weights
    sites = find_switch_modules(model)
    if not sites:
        raise CheckpointError(f"{model_dir}: model has no expert switch layers; nothing to pack", str(model_dir))
    index = build_expert_index(sites, read_checkpoint(model_dir))
    return write_pack(model_dir, index, alignment=alignment, checksums=checksums, progress=progress)
