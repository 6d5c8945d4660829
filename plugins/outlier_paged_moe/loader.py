"""The ``paged_moe`` loader: stock mlx-lm model, experts paged from the checkpoint on demand."""

from __future__ import annotations

import logging

import mlx.core as mx
from mlx.utils import tree_flatten

from outlier_runtime.engine.checkpoint import read_checkpoint
from outlier_runtime.engine.lazy_load import load_lazily
from outlier_runtime.core.errors import CheckpointError, ParameterError
from outlier_runtime.engine.experts import (
    ExpertIndex,
    SwitchSite,
    build_expert_index,
    find_switch_modules,
    module_at,
    set_experts_per_token,
)
from outlier_runtime.engine.pack import attach_pack
from outlier_runtime.core.plugin_manager import get_registry
from outlier_runtime.core.memory import (MemoryPlan, apply_wired_limit, available_bytes, headroom_bytes,
                                         kv_cache_bytes, text_config)
from outlier_runtime.engine.geometry import checkpoint_geometry
from outlier_runtime.core.protocols import LoadedModel, LoadRequest

from .memory import ExpertLayout, PagedBudget, plan_paged
from .distributed import model_fingerprint, planned_layers, split_pipeline
from .lookahead import NextLayerLookahead
from .store import ExpertStore, LayerSlots
from .switch import PagedSwitch

log = logging.getLogger(__name__)

GB = 1e9


def _budget(request: LoadRequest, layout: ExpertLayout, non_expert_bytes: int, activation_bytes: int,
            config: dict, layers: range | None = None) -> PagedBudget:
    """The plan for ``layers`` (a pipeline rank's KV cache), or every layer."""
    context = request.manifest.generation.context_window
    kv = kv_cache_bytes(config, context, activation_bytes, layers)
    return plan_paged(request.options, layout, non_expert_bytes, kv, context, available_bytes(), headroom_bytes(),
                      reserved=list(request.reserved))


def _install_slot_buffers(site: SwitchSite, slots: LayerSlots) -> None:
    """Point the switch module's stacked expert parameters at the slot buffers."""
    for tensor, buffer in zip(slots.layer.tensors, slots.buffers):
        owner_path, _, attr = tensor.param.rpartition(".")
        setattr(module_at(site.module, owner_path), attr, buffer)




class PagedMoELoader:
    """Loads non-expert weights, keeps stacked expert tensors on disk, pages experts per token."""

    def plan_memory(self, request: LoadRequest) -> MemoryPlan:
        """The memory plan from the checkpoint's headers and config (no weights read, no mlx_lm)."""
        geometry = checkpoint_geometry(request.model_path)
        if not geometry.expert_nbytes:
            raise CheckpointError(f"{request.model_path}: no stacked expert tensors found; use the 'dense' "
                                  f"loader for it", str(request.model_path))
        share = planned_layers(request.options, int(text_config(geometry.config)["num_hidden_layers"]))
        if share is None:
            count = len(geometry.expert_nbytes)
            layout = ExpertLayout([geometry.num_experts] * count, geometry.expert_nbytes, geometry.expert_nbytes)
            return _budget(request, layout, geometry.non_expert_bytes, geometry.activation_bytes, geometry.config).plan
        # A pipeline rank: only its layers' weights, KV cache, slots and experts.
        layers, rank, size = share
        own = [n for n, layer in zip(geometry.expert_nbytes, geometry.expert_layers) if layer in layers]
        layout = ExpertLayout([geometry.num_experts] * len(own), own, own)
        plan = _budget(request, layout, geometry.non_expert_bytes_of(layers), geometry.activation_bytes,
                       geometry.config, layers).plan
        plan.notes.insert(0, f"pipeline rank {rank} of {size}: layers {layers.start}-{layers.stop - 1}, "
                             f"{len(own)} of {len(geometry.expert_nbytes)} MoE layers (this plan is this rank's share)")
        return plan

    def load(self, request: LoadRequest) -> LoadedModel:
        paging = request.options
        path = request.model_path
        # Validate every shard first: a missing or truncated file is named here, not deep in mlx.
        entries = read_checkpoint(path)
        # lazy=True: nothing is read until evaluated, so the stacked experts are never read whole.
        model, tokenizer = load_lazily(path, entries)  # a checkpoint unlike its config.json is named
        # Split first: other ranks' layers leave the model, so their experts get no index entry,
        # no slots and no reads here.
        shard = split_pipeline(model, paging, path) if paging.distributed == "pipeline" else None
        if shard is not None:
            shard.check_same_model(model_fingerprint(path, entries), path)
            shard.share_random_seed()
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
            experts = min(layer.num_experts for layer in index.layers)
            if paging.experts_per_token > experts:
                raise ParameterError(
                    f"paging.experts_per_token (--experts-per-token) is {paging.experts_per_token}, but {path} "
                    f"has {experts} experts per layer; choose 1 to {experts}, or unset it."
                )
            for site in sites:
                set_experts_per_token(site, paging.experts_per_token)

        registry = get_registry()
        reader_name = paging.reader  # mmap_experts = true already made it "mmap"
        reader = registry.create("reader", reader_name, paging.reader_options)
        expert_names = index.expert_tensor_names
        non_expert_bytes = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k not in expert_names)
        layout = ExpertLayout([layer.num_experts for layer in index.layers],
                              [layer.expert_nbytes for layer in index.layers],
                              [layer.read_nbytes for layer in index.layers])
        geometry = checkpoint_geometry(path, entries)
        budget = _budget(request, layout, non_expert_bytes, geometry.activation_bytes, geometry.config,
                         range(shard.start, shard.end) if shard is not None else None)
        num_slots, ram_budget = budget.slots_per_layer, budget.ram_budget
        info = {
            "k_override": paging.k_override,
            "slots_per_layer": num_slots,
            "cache_gb": paging.cache_gb,
            "cache_bytes": budget.cache_bytes,
            "ram_cache_budget_bytes": ram_budget,
            "memory_plan": budget.plan.to_dict(),
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
        if shard is not None:
            info["distributed"] = {**shard.info(), "moe_layer_paths": [layer.path for layer in index.layers]}
        store = ExpertStore(
            index, num_slots, ram_budget, reader,
            lambda: registry.create("cache_policy", paging.cache_policy, paging.cache_policy_options), info,
            verify_checksums=paging.verify_checksums,
        )
        prefetcher = None
        if paging.prefetcher is not None:
            prefetcher = registry.create("prefetcher", paging.prefetcher, paging.prefetcher_options)
        for number, (site, slots) in enumerate(zip(sites, store.layers)):
            _install_slot_buffers(site, slots)
            lookahead = None
            if prefetcher is not None and number + 1 < len(sites):
                lookahead = NextLayerLookahead(store, prefetcher, number, sites[number + 1].block)
            site.replace(PagedSwitch(site.module, store, number, lookahead))
        mx.eval([slots.buffers for slots in store.layers])
        # On Metal, keep the slots and non-expert weights wired, as mlx-lm's generate does.
        info["wired_limit_bytes"] = apply_wired_limit(store.slot_bytes + non_expert_bytes)
        if not paging.lazy_load:
            mx.eval(model.parameters())  # read every non-expert weight now, not on first use
        log.info(
            "paged %d MoE layers: %d slots/layer, RAM cache %.2f GB, reader %s, policy %s",
            len(sites), num_slots, ram_budget / GB, reader_name, paging.cache_policy,
        )
        if shard is None:
            return LoadedModel(model=model, tokenizer=tokenizer, stats=store.snapshot,
                               reset_stats=store.reset_stats, close=store.close)
        try:
            shard.synchronize()  # every rank loaded: none starts generating while another still loads
        except RuntimeError as exc:
            store.close()
            raise (shard.explain_error(exc) or exc) from exc
        log.info("pipeline rank %d of %d: layers %d-%d of %d", shard.rank, shard.size, shard.start,
                 shard.end - 1, shard.num_layers)

        def close() -> None:
            shard.finish()
            store.close()

        def reset_stats() -> None:
            store.reset_stats()
            shard.timer.reset()

        return LoadedModel(model=model, tokenizer=tokenizer, stats=store.snapshot, reset_stats=reset_stats,
                           close=close, explain_error=shard.explain_error,
                           result_stats=lambda: shard.gather_stats(store.snapshot()))
