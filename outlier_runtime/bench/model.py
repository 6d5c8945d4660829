"""The benchmark checkpoint: the Plus tier's expert geometry, a few layers deep, built offline.

Plus (Qwen3.5-397B-A17B) has 512 experts per layer, each three 4096x1024 projections, top-10,
4-bit with group 64. ``build_tiny_model`` draws every weight in float32 before quantizing, and
one such layer is 26 GB of float32 experts: more than this machine's memory. So the model is
built at the same geometry with a few experts per layer (``base_experts``), then *widened*:
expert ``e`` of the benchmark checkpoint is base expert ``e % base_experts`` with its rows and
quantization groups rotated by ``e // base_experts`` (distinct bytes, the same statistics),
and each router gets fresh random rows for all 512 experts, quantized as mlx-lm quantizes
routers. The result is a normal mlx-lm checkpoint (one shard of experts per layer, not page
aligned, as mlx writes them), followed by its expert pack (``outlier pack``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from outlier_runtime.engine.checkpoint import INDEX_FILE, TensorEntry, read_checkpoint
from outlier_runtime.core.errors import OutlierError
from outlier_runtime.engine.pack import FORMAT_VERSION, PACK_DIR, PACK_INDEX, pack_model

#: Bump when the builder changes what it writes, so cached benchmark models are rebuilt.
BENCH_MODEL_VERSION = 1
GB = 1e9

Progress = Callable[[str, int, int], None]


class BenchError(OutlierError):
    """A benchmark cannot run as asked (not enough disk, bad sizes, a configuration failed)."""


@dataclass(frozen=True)
class Geometry:
    """Sizes of the benchmark model. The defaults are the Plus tier's expert geometry."""

    arch: str = "qwen3_5_moe"
    hidden_size: int = 4096
    moe_intermediate_size: int = 1024
    num_experts: int = 512
    top_k: int = 10
    num_layers: int = 2
    #: Experts per layer of the float32 model that is built, then widened to num_experts.
    base_experts: int = 16
    seed: int = 0

    @property
    def expert_bytes(self) -> int:
        """One expert's record: three projections, 4-bit weights plus f32 scales and biases per 64."""
        weights = self.hidden_size * self.moe_intermediate_size
        return 3 * (weights // 2 + 2 * 4 * (weights // 64))

    @property
    def total_expert_bytes(self) -> int:
        return self.expert_bytes * self.num_experts * self.num_layers

    def disk_bytes(self) -> int:
        """Disk the cached benchmark model needs: checkpoint + pack, plus the base model while building."""
        stride = -(-self.expert_bytes // 16384) * 16384
        pack = stride * self.num_experts * self.num_layers
        base = self.expert_bytes * self.base_experts * self.num_layers
        non_expert = 40 * self.hidden_size * self.hidden_size * self.num_layers // 8 + 64 * 2**20
        return self.total_expert_bytes + pack + 2 * base + 2 * non_expert

    def key(self) -> str:
        data = {**asdict(self), "version": BENCH_MODEL_VERSION}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def check(self) -> None:
        if self.num_layers < 1 or self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise BenchError(f"impossible geometry {self}: need layers >= 1 and 1 <= top_k <= experts")
        if not self.top_k <= self.base_experts <= self.num_experts:
            raise BenchError(f"base_experts={self.base_experts} must be between top_k and num_experts")
        for name in ("hidden_size", "moe_intermediate_size"):
            if getattr(self, name) % 64:
                raise BenchError(f"{name}={getattr(self, name)} must be a multiple of 64 (the quantization group)")


#: The Plus tier's experts, two layers deep: 8 GB of experts.
FULL = Geometry()
#: Small enough that a whole `outlier bench --quick` runs in well under two minutes on 2 CPU cores.
QUICK = Geometry(hidden_size=256, moe_intermediate_size=128, num_experts=64, top_k=4, num_layers=2,
                 base_experts=8)


def model_files(model_dir: Path) -> list[Path]:
    """Every file whose pages a cold run must not find cached: shards and pack."""
    files = sorted(model_dir.glob("*.safetensors"))
    files += sorted((model_dir / PACK_DIR).glob("*.bin"))
    return files


def check_disk(directory: Path, needed: int) -> None:
    """Refuse, with what to do, when ``directory``'s disk has less than ``needed`` bytes free."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed + GB:  # keep 1 GB for everyone else
        raise BenchError(
            f"the benchmark model needs {needed / GB:.1f} GB in {directory} (plus 1 GB spare), but its disk "
            f"has {free / GB:.1f} GB free. Free some space, pass --cache-dir on a bigger disk, or use "
            f"fewer layers (--layers) or --quick."
        )


def benchmark_model(geometry: Geometry, cache_dir: Path, progress: Progress | None = None) -> Path:
    """The path of the cached benchmark model (checkpoint and pack) of ``geometry``; built on first use."""
    geometry.check()
    target = cache_dir / f"bench-{geometry.arch}-{geometry.key()}"
    if (target / PACK_DIR / "index.json").exists():
        if not pack_is_stale(target):
            return target
        # A model cached before the pack format changed: the engine would refuse its pack and
        # silently read the shards instead, so the bench would not measure what it says.
        if progress:
            progress("build", 2, 3)
        pack_model(target, progress=(lambda done, total: progress("pack", done, total)) if progress else None)
        return target
    check_disk(cache_dir, geometry.disk_bytes())
    with _building(target) as tmp:
        from outlier_runtime.testing.tiny_models import build_tiny_model

        if progress:
            progress("build", 0, 3)
        overrides: dict[str, Any] = {"moe_intermediate_size": geometry.moe_intermediate_size}
        if geometry.arch == "qwen3_5_moe":
            overrides["shared_expert_intermediate_size"] = geometry.moe_intermediate_size
        base = build_tiny_model(
            tmp / "base", geometry.arch, seed=geometry.seed, num_experts=geometry.base_experts,
            top_k=geometry.top_k, hidden_size=geometry.hidden_size, num_layers=geometry.num_layers,
            cache_dir=cache_dir, **overrides,
        )
        if progress:
            progress("build", 1, 3)
        model = tmp / "model"
        widen_experts(base, model, geometry.num_experts, seed=geometry.seed)
        shutil.rmtree(base)
        if progress:
            progress("build", 2, 3)
        pack_model(model, progress=(lambda done, total: progress("pack", done, total)) if progress else None)
        for path in model.iterdir():
            path.rename(tmp / path.name)
        model.rmdir()
        (tmp / "geometry.json").write_text(json.dumps(asdict(geometry), indent=1))
        if progress:
            progress("build", 3, 3)
    return target


def pack_is_stale(model_dir: Path) -> bool:
    """True when ``model_dir``'s pack was written in another pack format than the engine reads."""
    try:
        return json.loads((model_dir / PACK_DIR / PACK_INDEX).read_text()).get("format") != FORMAT_VERSION
    except (OSError, ValueError, AttributeError):
        return True


@contextlib.contextmanager
def _building(target: Path) -> Iterator[Path]:
    """A temporary directory next to ``target`` that becomes ``target`` only when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ widening


def _is_router(name: str) -> bool:
    return name.rsplit(".", 1)[0].endswith("mlp.gate")


def _groups(entries: dict[str, TensorEntry], name: str) -> int:
    """Quantization groups per row of tensor ``name`` (1 if it is not quantized)."""
    stem = name.rsplit(".", 1)[0]
    scales = entries.get(f"{stem}.scales")
    return scales.shape[-1] if scales is not None and name.rsplit(".", 1)[1] in ("weight", "scales", "biases") else 1


def _load(entry: TensorEntry) -> np.ndarray:
    """A tensor's raw bytes, shaped [rows..., row_bytes] (dtype-agnostic)."""
    raw = np.fromfile(entry.path, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
    return raw.reshape(*entry.shape[:-1], -1) if entry.shape else raw


def _wide_expert(base: np.ndarray, expert: int, groups: int) -> np.ndarray:
    """Base expert ``expert % n`` with rows and quantization groups rotated by ``expert // n``."""
    n = base.shape[0]
    source, shift = base[expert % n], expert // n
    if shift == 0:
        return source
    rotated = np.roll(source, shift, axis=0) if source.ndim > 1 else source
    group_bytes = rotated.shape[-1] // groups
    return np.roll(rotated, shift * group_bytes, axis=-1)


def _wide_tensor(base: np.ndarray, num_experts: int, groups: int) -> Iterator[np.ndarray]:
    for expert in range(num_experts):
        yield _wide_expert(base, expert, groups)


def _router(entries: dict[str, TensorEntry], stem: str, num_experts: int, seed: int) -> dict[str, np.ndarray]:
    """Fresh router rows for ``num_experts``, quantized with the base router's bits and group size."""
    import mlx.core as mx

    weight = entries[f"{stem}.weight"]
    scales = entries.get(f"{stem}.scales")
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{stem}".encode()).digest()[:8], "little"))
    if scales is None:
        hidden = weight.shape[-1]
        value = mx.array(rng.standard_normal((num_experts, hidden), dtype=np.float32) * hidden**-0.5)
        return {f"{stem}.weight": _bytes(value.astype(_mx_dtype(weight.dtype)))}
    biases = entries[f"{stem}.biases"]
    # The bits and group size that give the base router's shapes (mlx-lm uses 8 bits, group 64).
    shapes = [(bits, group) for bits in (8, 4, 6, 5, 3, 2) for group in (64, 32, 128)
              if weight.shape[-1] * 32 == scales.shape[-1] * group * bits]
    if not shapes:
        raise BenchError(f"{weight.path}: cannot tell how router {stem} is quantized")
    bits, group = shapes[0]
    hidden = scales.shape[-1] * group
    value = mx.array(rng.standard_normal((num_experts, hidden), dtype=np.float32) * hidden**-0.5)
    q, s, b = mx.quantize(value, group_size=group, bits=bits)
    s, b = s.astype(_mx_dtype(scales.dtype)), b.astype(_mx_dtype(biases.dtype))
    return {f"{stem}.weight": _bytes(q), f"{stem}.scales": _bytes(s), f"{stem}.biases": _bytes(b)}


def _mx_dtype(name: str) -> Any:
    from outlier_runtime.engine.experts import SAFETENSORS_TO_MX

    return SAFETENSORS_TO_MX[name]


def _bytes(array: Any) -> np.ndarray:
    import mlx.core as mx

    mx.eval(array)
    return np.asarray(array.view(mx.uint8)).reshape(array.shape[0], -1)


def widen_experts(base_dir: Path, out_dir: Path, num_experts: int, *, seed: int = 0) -> Path:
    """Write ``base_dir``'s checkpoint to ``out_dir`` with ``num_experts`` experts per layer."""
    entries = read_checkpoint(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    text = config.get("text_config", config)
    base_experts = text["num_experts"]
    out_dir.mkdir(parents=True)

    def widened(entry: TensorEntry) -> bool:
        return bool(entry.shape) and entry.shape[0] == base_experts and (
            ".switch_mlp." in entry.name or _is_router(entry.name)
        )

    # One shard per MoE layer's experts (as a large checkpoint's shards hold a few layers each),
    # one for everything else.
    shards: dict[str, list[TensorEntry]] = {}
    for entry in sorted(entries.values(), key=lambda e: e.name):
        key = entry.name.split(".switch_mlp.")[0] if ".switch_mlp." in entry.name else ""
        shards.setdefault(key, []).append(entry)
    names = sorted(shards, key=lambda k: (k != "", [int(p) if p.isdigit() else 0 for p in k.split(".")]))
    weight_map, total = {}, 0
    routers: dict[str, np.ndarray] = {}
    for stem in sorted({e.name.rsplit(".", 1)[0] for e in entries.values() if _is_router(e.name) and widened(e)}):
        routers.update(_router(entries, stem, num_experts, seed))
    for number, key in enumerate(names, start=1):
        file_name = f"model-{number:05d}-of-{len(names):05d}.safetensors"
        tensors = []
        for entry in shards[key]:
            if entry.name in routers:
                data = routers[entry.name]
                tensors.append((entry.name, entry.dtype, [num_experts, *entry.shape[1:]], [data]))
            elif widened(entry):
                pieces = _wide_tensor(_load(entry), num_experts, _groups(entries, entry.name))
                tensors.append((entry.name, entry.dtype, [num_experts, *entry.shape[1:]], pieces))
            else:
                tensors.append((entry.name, entry.dtype, list(entry.shape), [_load(entry)]))
            weight_map[entry.name] = file_name
        total += _write_safetensors(out_dir / file_name, tensors)
    (out_dir / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    text["num_experts"] = num_experts
    (out_dir / "config.json").write_text(json.dumps(config, indent=4))
    for path in base_dir.iterdir():
        if path.suffix != ".safetensors" and path.name not in (INDEX_FILE, "config.json") and path.is_file():
            shutil.copyfile(path, out_dir / path.name)
    return out_dir


def _write_safetensors(path: Path, tensors: list[tuple[str, str, list[int], Any]]) -> int:
    """Stream tensors (name, dtype, shape, iterable of byte arrays) into a safetensors file."""
    from outlier_runtime.engine.checkpoint import DTYPE_SIZES

    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, dtype, shape, _ in tensors:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, _, _, pieces in tensors:
            start = handle.tell()
            for piece in pieces:
                handle.write(memoryview(np.ascontiguousarray(piece)).cast("B"))
            expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if handle.tell() - start != expected:
                raise BenchError(f"{path}: wrote {handle.tell() - start} bytes of {name}, expected {expected}")
        handle.flush()
        os.fsync(handle.fileno())  # so that evicting its pages later really leaves it cold
    return offset
