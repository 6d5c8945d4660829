"""The packed expert layout: one page-aligned record per expert, one read per miss.

``write_pack(model_dir)`` rewrites every MoE layer's experts into ``<model>/experts-pack/
layer-NNN.bin``: expert ``e`` of the layer is its tensors back to back (the order of the
expert index) at offset ``e * stride``, ``stride`` a multiple of the alignment. ``index.json``
records the layout, a fingerprint of each source shard (size, mtime, inode, the Hugging Face
blob name when the shard links to one, and a hash of its header), optional per-expert CRC32s,
and a SHA-256 of itself, so a pack that no longer matches its checkpoint is refused, never used.

Every file is written under a temporary name, synced and renamed into place: a file that an
engine has open is replaced, never rewritten under it, and an interrupted run leaves only
``*.partial`` files, which the next run removes (and says so) and an engine reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

from outlier_runtime.engine.buffers import DEFAULT_ALIGNMENT, DIRECT_IO_ALIGNMENT, aligned_empty, round_up
from outlier_runtime.engine.checkpoint import shard_files
from outlier_runtime.core.errors import CheckpointError
from outlier_runtime.engine.experts import ExpertIndex, ExpertLayer, PackedLayer
from outlier_runtime.engine.fileio import open_regular

log = logging.getLogger(__name__)

PACK_DIR = "experts-pack"
PACK_INDEX = "index.json"
#: 2: shard fingerprints carry mtime_ns, inode and the blob name (format 1 packs are rebuilt).
FORMAT_VERSION = 2
#: Suffix of files being written; one left behind means a run was interrupted.
PARTIAL_SUFFIX = ".partial"
_BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")

Progress = Callable[[int, int], None]


def _shard_fingerprints(model_dir: Path) -> dict[str, dict[str, Any]]:
    """What changes when a shard's content does: its size, mtime and inode (a rewrite in place
    or a new file), the Hugging Face blob it links to (a content hash), and its header's hash."""
    prints = {}
    for shard in shard_files(model_dir):
        try:
            with os.fdopen(open_regular(shard), "rb") as handle:
                info = os.fstat(handle.fileno())
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = handle.read(min(header_len, info.st_size))
        except (OSError, struct.error) as exc:
            raise CheckpointError(f"{shard}: cannot fingerprint shard: {exc}", str(shard)) from exc
        prints[shard.name] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": info.st_ino,
                              "blob": _blob_name(shard), "header_sha256": hashlib.sha256(header).hexdigest()}
    return prints


def _blob_name(shard: Path) -> str | None:
    """The blob a Hugging Face snapshot's symlink points at (named by the file's hash), if any."""
    if not shard.is_symlink():
        return None
    name = os.path.basename(os.readlink(shard))
    return name if _BLOB_NAME.fullmatch(name) else None


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def pack_dir(model_dir: str | os.PathLike[str]) -> Path:
    """``<model>/experts-pack``, refused when it is a symlink (writing would go through it)."""
    out = Path(model_dir) / PACK_DIR
    if out.is_symlink():
        raise CheckpointError(f"{out}: is a symlink; the pack must be a real directory in the model directory "
                              f"(remove the link, then run `outlier pack {model_dir}`)", str(out))
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: is not a directory; remove it, then run `outlier pack {model_dir}`", str(out))
    return out


def leftovers(out: Path) -> list[Path]:
    """Files an interrupted ``outlier pack`` left behind in ``out``."""
    try:
        return sorted(p for p in out.iterdir() if p.name.endswith(PARTIAL_SUFFIX))
    except OSError:
        return []


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the renames are still atomic
    finally:
        os.close(fd)


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
    out = pack_dir(model_dir)
    out.mkdir(exist_ok=True)
    stale = leftovers(out)
    if stale:
        size = sum(p.stat().st_size for p in stale if p.is_file() and not p.is_symlink())
        for path in stale:
            path.unlink()
        log.warning("%s: removed %d file(s) (%.1f MB) left by an interrupted `outlier pack`",
                    out, len(stale), size / 1e6)
    index_path = out / PACK_INDEX
    index_path.unlink(missing_ok=True)  # until the new index lands, engines that start read the shards
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
    _write_file(out, PACK_INDEX, lambda handle: handle.write(
        json.dumps({**body, "sha256": _digest(body)}, indent=1).encode()))
    _fsync_dir(out)  # the index appears last, atomically: its presence means "complete"
    return index_path


def _write_file(out: Path, name: str, write: Callable[[Any], Any]) -> None:
    """Write ``out/name`` under a temporary name, sync it, then rename it into place."""
    tmp = out / (name + PARTIAL_SUFFIX)
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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

    def write(handle: Any) -> None:
        for expert in range(layer.num_experts):
            record[layer.expert_nbytes:] = 0
            for path, offset, length, start in layer.read_ranges(expert):
                if path not in sources:
                    sources[path] = os.fdopen(open_regular(path), "rb")
                sources[path].seek(offset)
                chunk = sources[path].read(length)
                if len(chunk) != length:
                    raise CheckpointError(f"{path}: truncated while packing (re-download the shard)", path)
                record[start:start + length] = memoryview(chunk)
            if checksums:
                sums.append(zlib.crc32(record[:layer.expert_nbytes]))
            handle.write(record.data)

    _write_file(out, name, write)
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
    recorded, current = body.get("shards"), _shard_fingerprints(model_dir)
    if recorded != current:
        raise refuse(_what_changed(recorded, current))
    layers = body.get("layers")
    if not isinstance(layers, list) or len(layers) != len(index.layers):
        raise refuse("its layers do not match the model's MoE layers")
    for entry, layer in zip(layers, index.layers):
        if (entry.get("path"), entry.get("num_experts"), entry.get("expert_nbytes"), entry.get("tensors")) != (
            layer.path, layer.num_experts, layer.expert_nbytes, _layout(layer)
        ):
            raise refuse(f"layer {layer.path} does not match the checkpoint's expert layout")
        name = entry.get("file")
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".bin"):
            raise refuse(f"layer {layer.path} names the file {name!r}, not a layer file of the pack")
        path = model_dir / PACK_DIR / name
        stride = entry.get("stride")
        if not isinstance(stride, int) or stride < layer.expert_nbytes:
            raise refuse(f"layer {layer.path} has an impossible stride {stride!r}")
        try:
            info = os.stat(path)
        except OSError:
            raise refuse(f"{path} is missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise refuse(f"{path} is not a regular file")
        size = info.st_size
        if size != stride * layer.num_experts:
            raise refuse(f"{path} has {size} bytes, expected {stride * layer.num_experts}")
    return body


def _what_changed(recorded: Any, current: dict[str, dict[str, Any]]) -> str:
    """One phrase naming the first shard whose fingerprint differs, and how."""
    if not isinstance(recorded, dict) or set(recorded) != set(current):
        return "the checkpoint's shard files are not the ones it was built from"
    for name, now in current.items():
        then = recorded[name]
        if then != now:
            fields = [k for k in now if not isinstance(then, dict) or then.get(k) != now[k]]
            return f"shard {name} changed since the pack was written ({', '.join(fields)} differ)"
    return "the source shards changed since the pack was written"


def attach_pack(model_dir: str | os.PathLike[str], index: ExpertIndex) -> bool:
    """Point ``index`` at a valid pack if there is one. Returns whether it did.

    A missing pack is normal (False); one an interrupted ``outlier pack`` left incomplete is
    reported (False). A pack that fails validation raises CheckpointError.
    """
    model_dir = Path(model_dir)
    out = model_dir / PACK_DIR
    stale = leftovers(out) if out.is_dir() else []
    if stale:
        log.warning("%s: %d file(s) left by an interrupted `outlier pack` (%s); run `outlier pack %s` "
                    "again, which removes them", out, len(stale), stale[0].name, model_dir)
    if not (out / PACK_INDEX).exists():
        if out.is_dir() and any(out.glob("layer-*.bin")):
            log.warning("%s: no %s (an interrupted `outlier pack`?): reading the shards; run `outlier pack %s` "
                        "to finish it, or delete the directory", out, PACK_INDEX, model_dir)
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
    from outlier_runtime.core.model_files import check_model_dir
    from outlier_runtime.engine.checkpoint import read_checkpoint
    from outlier_runtime.engine.experts import build_expert_index, find_switch_modules
    from outlier_runtime.engine.lazy_load import load_lazily

    pack_dir(model_dir)  # a symlinked pack directory is refused before anything is read
    check_model_dir(model_dir)
    entries = read_checkpoint(model_dir)
    model, _ = load_lazily(model_dir, entries)  # lazy: reads no weights
    sites = find_switch_modules(model)
    if not sites:
        raise CheckpointError(f"{model_dir}: model has no expert switch layers; nothing to pack", str(model_dir))
    index = build_expert_index(sites, entries)
    return write_pack(model_dir, index, alignment=alignment, checksums=checksums, progress=progress)
