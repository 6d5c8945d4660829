"""Checks shared by the paged-engine tests (imported as ``helpers``: tests/ is on sys.path)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from outlier_paged_moe.store import EMPTY, ExpertStore
from outlier_paged_moe.switch import PagedSwitch


def paged_store(runtime) -> ExpertStore:
    """The expert store behind a paged runtime's switch layers."""
    for _, module in runtime.model.named_modules():
        if isinstance(module, PagedSwitch):
            return module._store
    raise LookupError(f"tier {runtime.name!r} has no paged switch layers")


def assert_slots_hold_true_experts(runtime) -> None:
    """Every slot marked valid holds exactly its expert's bytes from the checkpoint."""
    store = paged_store(runtime)
    for slots in store.layers:
        assert set(slots.slot_of.values()) == {s for s, e in enumerate(slots.expert_in_slot) if e != EMPTY}
        for expert, slot in slots.slot_of.items():
            assert slots.expert_in_slot[slot] == expert
            for buffer, tensor in zip(slots.buffers, slots.layer.tensors):
                file, offset, length = tensor.range_of(expert)
                with open(file, "rb") as handle:
                    handle.seek(offset)
                    expected = np.frombuffer(handle.read(length), dtype=np.uint8)
                got = np.asarray(buffer[slot].view(mx.uint8)).reshape(-1)
                assert np.array_equal(got, expected), (slots.layer.path, expert, tensor.param)
