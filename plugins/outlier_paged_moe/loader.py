"""The ``paged_moe`` loader: stock mlx-lm model, experts paged from the checkpoint on demand."""

from __future__ import annotations

import logging

import mlx.core as mx
from mlx.utils import tree_flatten

from outlier_runtime.engine.checkpoint import read_checkpoint
from outlier_runtime.engine.lazy_load import load_lazily
from outlier_runtime.core.errors import CheckpointError
from outlier_runtime.engine.experts import (
    ExpertIndex,
    SwitchSite,
    build_expert_index,
    find_switch_modules,
    module_at,
    set_experts_per_token,
)
from outlier_runtime.core.manifest import PagingSection
from outlier_runtime.engine.pack import attach_pack
from outlier_runtime.core.plugin_manager import get_registry
from outlier_runtime.core.protocols import LoadedModel, LoadRequest, Prefetcher

from .store import ExpertStore, LayerSlots
from .switch import PagedSwitch

log = logging.getLogger(__name__)

GB = 1e9


def plan_memory(index: ExpertIndex, paging: PagingSection) -> tuple[int, int]:
    """Slots per layer and RAM-cache bytes such that slots + cache <= cache_gb.

    Slots come first (they are what computes); a cache too small for ``k_override`` slots
    in every layer gets fewer, never fewer than one per layer (the floor needed to compute).
    """
    budget = int(paging.cache_gb * GB)
    per_slot_row = sum(layer.expert_nbytes for layer in index.layers)  # one slot in every layer
    most_experts = max(layer.num_experts for layer in index.layers)
    slots = min(paging.k_override, most_experts)
    if slots * per_slot_row > budget:
        slots = max(1, budget // per_slot_row)
    slot_bytes = sum(layer.expert_nbytes * min(slots, layer.num_experts) for layer in index.layers)
    return slots, max(0, budget - slot_bytes)


def _install_slot_buffers(site: SwitchSite, slots: LayerSlots) -> None:
    """Point the switch module's stacked expert parameters at the slot buffers."""
    for tensor, buffer in zip(slots.layer.tensors, slots.buffers):
        owner_path, _, attr = tensor.param.rpartition(".")
        setattr(module_at(site.module, owner_path), attr, buffer)


def _prefetch_next(store: ExpertStore, prefetcher: Prefetcher, number: int, next_site: SwitchSite):
    def prefetch(hidden: mx.array) -> None:
        store.prefetch(number + 1, prefetcher.predict(number, hidden, next_site.block))

    return prefetch


class PagedMoELoader:
    """Loads non-expert weights, keeps stacked expert tensors on disk, pages experts per token."""

    def load(self, request: LoadRequest) -> LoadedModel:
        paging = request.manifest.paging or PagingSection()
        path = request.model_path
        # Validate every shard first: a missing or truncated file is named here, not deep in mlx.
        entries = read_checkpoint(path)
        # lazy=True: nothing is read until evaluated, so the stacked experts are never read whole.
        model, tokenizer = load_lazily(path, entries)  # a checkpoint unlike its config.json is named
        sites = find_switch_modules(model)
        if not sites:
            raise CheckpointError(
                f"{path}: model has no expert switch layers; use the 'dense' loader for it", str(path)
            )
        index = build_expert_index(sites, entries)
        pack = "not used"
        if paging.use_pack:
            try:
                pack = "used" if attach_pack(path, index) else "none"
            except CheckpointError as exc:
                # A pack that does not match its shards is refused, never used: read the shards.
                log.warning("%s", exc)
                pack = f"refused: {exc}"
        if paging.experts_per_token is not None:
            for site in sites:
                set_experts_per_token(site, paging.experts_per_token)

        registry = get_registry()
        reader_name = "mmap" if paging.mmap_experts else paging.reader
        reader = registry.create("reader", reader_name, **paging.reader_options)
        num_slots, ram_budget = plan_memory(index, paging)
        expert_names = index.expert_tensor_names
        non_expert_bytes = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k not in expert_names)
        info = {
            "k_override": paging.k_override,
            "slots_per_layer": num_slots,
            "cache_gb": paging.cache_gb,
            "ram_cache_budget_bytes": ram_budget,
            "reader": reader_name,
            "cache_policy": paging.cache_policy,
            "experts_per_token": paging.experts_per_token,
            "moe_layers": len(index.layers),
            "experts_per_layer": max(layer.num_experts for layer in index.layers),
            "expert_bytes": index.layers[0].expert_nbytes,
            "total_expert_bytes": index.total_expert_bytes,
            "non_expert_bytes": non_expert_bytes,
            "pack": pack,
            "prefetcher": paging.prefetcher,
            "verify_checksums": paging.verify_checksums,
        }
        store = ExpertStore(
            index, num_slots, ram_budget, reader,
            lambda: registry.create("cache_policy", paging.cache_policy), info,
            verify_checksums=paging.verify_checksums,
        )
        prefetcher = None
        if paging.prefetcher is not None:
            prefetcher = registry.create("prefetcher", paging.prefetcher)
        for number, (site, slots) in enumerate(zip(sites, store.layers)):
            _install_slot_buffers(site, slots)
            prefetch = None
            if prefetcher is not None and number + 1 < len(sites):
                prefetch = _prefetch_next(store, prefetcher, number, sites[number + 1])
            site.replace(PagedSwitch(site.module, store, number, prefetch))
        mx.eval([slots.buffers for slots in store.layers])
        if not paging.lazy_load:
            mx.eval(model.parameters())  # read every non-expert weight now, not on first use
        log.info(
            "paged %d MoE layers: %d slots/layer, RAM cache %.2f GB, reader %s, policy %s",
            len(sites), num_slots, ram_budget / GB, reader_name, paging.cache_policy,
        )
        return LoadedModel(model=model, tokenizer=tokenizer, stats=store.snapshot,
                           reset_stats=store.reset_stats, close=store.close)
