"""The memory plan of a pipeline rank counts only its layers: their non-expert weights, their KV
cache, their slots. Checked against what mlx-lm's own ``pipeline()`` split leaves in the model,
with a stand-in for the mlx.distributed group (the plan only asks it for its rank and size)."""

from __future__ import annotations

import mlx_lm
import pytest
from mlx.utils import tree_flatten

from outlier_paged_moe.distributed import pipeline_layers, pipeline_model
from outlier_runtime.core.memory import kv_cache_bytes
from outlier_runtime.core.runtime import admit
from outlier_runtime.engine.geometry import checkpoint_geometry

NUM_LAYERS = 5  # two ranks split it 3 + 2: the extra layer goes to rank 0, as in mlx-lm


class StandInGroup:
    """What the plan and mlx-lm's pipeline() ask of an mlx.distributed group."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def _plan(model, monkeypatch, group=None, **overrides) -> tuple[dict[str, int], list[str]]:
    import mlx.core as mx

    if group is not None:
        monkeypatch.setattr(mx.distributed, "init", lambda backend="any": group)
    _, _, plan = admit("plus", force=True, **{"model": str(model), "k_override": 2, "cache_gb": 1.0, **overrides})
    return {line.name: line.bytes for line in plan.lines}, plan.notes


def _stock_split(model, rank: int, size: int) -> tuple[range, int]:
    """The layers mlx-lm's pipeline() gives ``rank``, and the non-expert bytes it keeps there."""
    stock, _ = mlx_lm.load(str(model), lazy=True)  # lazy: shapes only, nothing read
    inner = pipeline_model(stock)
    inner.pipeline(StandInGroup(rank, size))
    kept = sum(array.nbytes for name, array in tree_flatten(stock.parameters()) if "switch_mlp" not in name)
    return range(inner.start_idx, inner.end_idx), kept


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe"])
def test_a_ranks_plan_is_its_share_of_the_whole(arch, tiny, monkeypatch):
    model = tiny(arch, num_layers=NUM_LAYERS)
    whole, _ = _plan(model, monkeypatch)
    geometry = checkpoint_geometry(model)
    ranks = []
    for rank in range(2):
        plan, notes = _plan(model, monkeypatch, StandInGroup(rank, 2), distributed="pipeline")
        layers, kept = _stock_split(model, rank, 2)
        assert pipeline_layers(NUM_LAYERS, 2, rank) == layers  # the plan's arithmetic is mlx-lm's
        assert f"pipeline rank {rank} of 2: layers {layers.start}-{layers.stop - 1}" in notes[0]
        # The weights mlx-lm keeps on the rank are what its plan counts.
        assert plan["non-expert weights"] == kept
        assert plan["KV cache"] == kv_cache_bytes(geometry.config, _context(model), geometry.activation_bytes, layers)
        ranks.append((layers, plan))
    (first, rank_0), (second, rank_1) = ranks
    assert (len(first), len(second)) == (3, 2) and first.start == second.stop  # rank 0 runs the last layers
    # Together the ranks hold every layer once; the weights outside the layers (embeddings,
    # norm, head) are on each rank.
    outside = whole["non-expert weights"] - sum(geometry.layer_bytes.values())
    assert outside > 0
    assert rank_0["non-expert weights"] + rank_1["non-expert weights"] == whole["non-expert weights"] + outside
    assert rank_0["KV cache"] + rank_1["KV cache"] == whole["KV cache"]
    assert rank_0["expert slots"] + rank_1["expert slots"] == whole["expert slots"]
    assert rank_0["expert slots"] == whole["expert slots"] * 3 // 5
    # So the rank's share is smaller, and the RAM cache (what cache_gb leaves after the slots) larger.
    for plan in (rank_0, rank_1):
        assert plan["non-expert weights"] < whole["non-expert weights"] and plan["KV cache"] <= whole["KV cache"]
        assert plan["RAM cache + read buffers"] > whole["RAM cache + read buffers"]


def _context(model) -> int:
    from outlier_runtime.core.catalog import resolve_tier
    from outlier_runtime.core.plugin_manager import get_registry

    return resolve_tier("plus", get_registry(), {"model": str(model)}).generation.context_window


def test_cache_gb_auto_sizes_from_the_ranks_share(tiny, monkeypatch):
    """``cache_gb = "auto"`` is what memory allows after this rank's weights and KV cache: on a machine
    where the whole model leaves 400 kB for experts, rank 1 (two linear-attention layers of five)
    has room to cache every one of its experts."""
    import outlier_paged_moe.loader as loader

    model = tiny("qwen3_5_moe", num_layers=NUM_LAYERS)
    whole, _ = _plan(model, monkeypatch)
    spare = 400_000
    monkeypatch.setattr(loader, "headroom_bytes", lambda: 0)
    monkeypatch.setattr(loader, "available_bytes", lambda: whole["non-expert weights"] + whole["KV cache"] + spare)
    auto_whole, _ = _plan(model, monkeypatch, cache_gb="auto")
    assert auto_whole["expert slots"] + auto_whole["RAM cache + read buffers"] == spare
    share, notes = _plan(model, monkeypatch, StandInGroup(1, 2), distributed="pipeline", cache_gb="auto")
    auto = next(note for note in notes if note.startswith("cache_gb auto"))
    assert "capped at every expert cached" in auto
    assert share["expert slots"] + share["RAM cache + read buffers"] > spare
