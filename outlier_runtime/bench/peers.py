"""The exact peer ``boyle`` (0.2.1), loaded at a given number of expert slots per MoE layer.

boyle keeps ``capacity`` experts of each MoE layer in a slot tensor (LRU) and reads the rest
from the checkpoint's shards, with output identical to the resident model. Its own ``load()``
derives the capacity from a memory budget and sets a Metal wired limit; the bench needs the
same slot count as ours and runs on any mlx backend, so this adapter does what ``load()`` does
with the capacity given directly: mlx-lm's lazy load, boyle's ``apply_expert_offload`` with one
capacity per layer, then materialize the surviving weights.

Installed with the optional extra ``peers`` (``pip install 'outlier-runtime[peers]'``); every
function here imports boyle lazily, so the bench runs without it.
"""

from __future__ import annotations

import fcntl
from importlib import metadata
from pathlib import Path
from typing import Any

#: The peer and the version the comparison was written against (its private API is used).
PEER = "boyle"
PEER_REQUIREMENT = "boyle==0.2.1"


def peer_version() -> str | None:
    """boyle's installed version, or None when it is not installed."""
    try:
        return metadata.version(PEER)
    except metadata.PackageNotFoundError:
        return None


def absent_note() -> str:
    """The one line the bench prints when boyle is missing."""
    return (f"{PEER} is not installed ({PEER_REQUIREMENT}: pip install 'outlier-runtime[peers]'); "
            "the peer columns are skipped")


def direct_reads_supported() -> bool:
    """boyle's uncached reads use macOS's ``F_NOCACHE``; elsewhere it must read through mmap."""
    return hasattr(fcntl, "F_NOCACHE")


def load_boyle(model_dir: str | Path, slots_per_layer: int, io_workers: int = 8) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, info)``: boyle's offloaded model with ``slots_per_layer`` slots per MoE layer.

    ``info`` records what boyle actually did (layers wrapped, each layer's capacity: boyle
    never goes below 8 slots), so the bench can refuse a comparison at unequal slots.
    """
    import mlx.core as mx
    from boyle import _runtime as boyle_runtime
    from mlx_lm.utils import load_model, load_tokenizer

    model_dir = Path(model_dir)
    model, _config = load_model(model_dir, lazy=True)
    moe_layers = sum(1 for _ in boyle_runtime._iter_switch_glus(model))
    direct = direct_reads_supported()
    wrapped = boyle_runtime.apply_expert_offload(
        model, model_dir, capacity_plan=[slots_per_layer] * moe_layers, io_workers=io_workers, direct=direct)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(model_dir)
    capacities = [cache.capacity for cache in _caches(model)]
    info = {
        "peer": PEER,
        "version": peer_version(),
        "moe_layers": moe_layers,
        "wrapped_layers": wrapped,
        "slots_per_layer": sorted(set(capacities)),
        "io_workers": io_workers,
        "reads": "pread, F_NOCACHE" if direct else "mmap copy through the page cache (no F_NOCACHE here)",
    }
    return model, tokenizer, info


def boyle_stats(model: Any) -> dict[str, Any]:
    """boyle's hit/miss counters summed over its offloaded layers."""
    from boyle._runtime import offload_stats

    return offload_stats(model)


def _caches(model: Any) -> list[Any]:
    """Each offloaded layer's ExpertCache, in the model's layer order."""
    from boyle._runtime import OffloadSwitchGLU

    found: list[Any] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, OffloadSwitchGLU):
            found.append(obj.cache)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return found
