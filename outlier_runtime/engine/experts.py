"""Where each expert's bytes live: the expert index of an mlx-lm MoE checkpoint.

mlx-lm stores a layer's experts stacked: ``<switch>.{gate,up,down}_proj.{weight,scales,biases}``
with shape ``[E, ...]``, so expert ``e`` of a tensor is one contiguous byte range. The switch
modules are found by type (``SwitchGLU``/``SwitchMLP``), not by attribute name, so any mlx-lm
MoE architecture works (``switch_mlp``, ``experts``, ``switch_glu``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from outlier_runtime.engine.checkpoint import TensorEntry
from outlier_runtime.core.errors import CheckpointError



def switch_types() -> tuple[type, ...]:
    """mlx-lm's expert switch module types."""
    # Imported on use: importing mlx_lm costs about a second (it pulls in transformers), and
    # listing commands import this module through the plugins without needing it.
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    return (SwitchGLU, SwitchMLP)

#: Attribute names MoE blocks use for the router's experts-per-token.
TOP_K_ATTRIBUTES = ("top_k", "num_experts_per_tok", "num_activated_experts")

SAFETENSORS_TO_MX = {
    "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I16": mx.int16, "U32": mx.uint32,
    "I32": mx.int32, "U64": mx.uint64, "I64": mx.int64, "F16": mx.float16, "BF16": mx.bfloat16,
    "F32": mx.float32, "BOOL": mx.bool_,
}


@dataclass
class SwitchSite:
    """A switch module in a model, and where it hangs (so it can be replaced)."""

    path: str
    module: nn.Module
    parent: Any
    key: str | int

    def replace(self, new: Any) -> None:
        if isinstance(self.key, int):
            self.parent[self.key] = new
        else:
            setattr(self.parent, self.key, new)

    @property
    def block(self) -> Any:
        """The MoE block that owns the router (the switch module's parent)."""
        return self.parent


def _natural_key(path: str) -> list[Any]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in path.split(".")]


def module_at(root: Any, path: str) -> Any:
    """The module (or list) at dotted ``path`` below ``root``; digits index lists."""
    node = root
    for part in filter(None, path.split(".")):
        node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    return node


def find_switch_modules(model: nn.Module) -> list[SwitchSite]:
    """Every expert switch module of ``model``, in layer order."""
    sites = []
    types = switch_types()
    for path, module in model.named_modules():
        if not isinstance(module, types) or not path:
            continue
        parent_path, _, last = path.rpartition(".")
        parent = module_at(model, parent_path)
        key: str | int = int(last) if isinstance(parent, (list, tuple)) else last
        sites.append(SwitchSite(path, module, parent, key))
    return sorted(sites, key=lambda site: _natural_key(site.path))


def set_experts_per_token(site: SwitchSite, k: int) -> int:
    """Change the router's top-k on the block that owns ``site``; returns the old value."""
    for name in TOP_K_ATTRIBUTES:
        value = getattr(site.block, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(site.block, name, k)
            return value
    raise CheckpointError(
        f"{site.path}: cannot find the router's experts-per-token on {type(site.block).__name__} "
        f"(looked for {', '.join(TOP_K_ATTRIBUTES)}); unset `experts_per_token` for this model."
    )


@dataclass(frozen=True)
class ExpertTensor:
    """One stacked expert tensor of a layer, e.g. ``gate_proj.weight`` of shape [E, out, in]."""

    param: str
    entry: TensorEntry
    dtype: Any  # mx.Dtype
    expert_shape: tuple[int, ...]
    expert_nbytes: int

    def range_of(self, expert: int) -> tuple[str, int, int]:
        """(path, absolute offset, length) of one expert's slice of this tensor."""
        return self.entry.path, self.entry.offset + expert * self.expert_nbytes, self.expert_nbytes


@dataclass(frozen=True)
class PackedLayer:
    """A layer's experts rewritten as one aligned record each: expert e at ``e * stride``."""

    path: str
    stride: int
    #: Bytes to read per expert: the record rounded up to the read alignment.
    read_length: int
    #: Optional CRC32 of each expert's record (computed at pack time).
    checksums: tuple[int, ...] | None = None


@dataclass
class ExpertLayer:
    """All stacked expert tensors of one MoE layer. An expert's record is its tensors back to back."""

    index: int
    path: str
    num_experts: int
    tensors: list[ExpertTensor]
    #: Byte offset of each tensor inside an expert's record.
    record_offsets: list[int] = field(default_factory=list)
    #: Where the layer's packed records live, when a valid pack is in use.
    packed: PackedLayer | None = None

    def __post_init__(self) -> None:
        offsets, total = [], 0
        for tensor in self.tensors:
            offsets.append(total)
            total += tensor.expert_nbytes
        self.record_offsets = offsets
        self.expert_nbytes = total

    @property
    def read_nbytes(self) -> int:
        """Size of the buffer one expert is read into (padded for aligned pack reads)."""
        return self.packed.read_length if self.packed else self.expert_nbytes

    def read_ranges(self, expert: int) -> list[tuple[str, int, int, int]]:
        """(path, file offset, length, offset in the record buffer) for each read of one expert.

        From a pack: one aligned read. From the shards: one read per stacked tensor.
        """
        if self.packed is not None:
            return [(self.packed.path, expert * self.packed.stride, self.packed.read_length, 0)]
        return [(*t.range_of(expert), start) for t, start in zip(self.tensors, self.record_offsets)]


@dataclass
class ExpertIndex:
    """The byte ranges of every (layer, expert, tensor) of a checkpoint."""

    layers: list[ExpertLayer]

    @property
    def total_expert_bytes(self) -> int:
        return sum(layer.expert_nbytes * layer.num_experts for layer in self.layers)

    @property
    def expert_tensor_names(self) -> set[str]:
        return {t.entry.name for layer in self.layers for t in layer.tensors}


def expert_params(site: SwitchSite) -> dict[str, mx.array]:
    """The switch module's stacked per-expert parameters, by name relative to the module."""
    return dict(tree_flatten(site.module.parameters()))


def build_expert_index(sites: list[SwitchSite], entries: dict[str, TensorEntry]) -> ExpertIndex:
    """Match each switch module's parameters to checkpoint tensors and check their shapes."""
    layers = []
    for number, site in enumerate(sites):
        params = expert_params(site)
        if not params:
            raise CheckpointError(f"{site.path}: switch module has no parameters")
        num_experts = None
        tensors = []
        for param, array in sorted(params.items()):
            name = f"{site.path}.{param}"
            entry = entries.get(name)
            if entry is None:
                raise CheckpointError(
                    f"checkpoint has no tensor {name!r} for the experts of {site.path} "
                    f"(is this an mlx-lm converted checkpoint? convert it with mlx_lm.convert)"
                )
            if num_experts is None:
                num_experts = array.shape[0]
            if entry.shape != tuple(array.shape) or array.shape[0] != num_experts:
                raise CheckpointError(
                    f"{entry.path}: tensor {name!r} has shape {list(entry.shape)}, the model expects "
                    f"{list(array.shape)} with {num_experts} experts first",
                    entry.path,
                )
            dtype = SAFETENSORS_TO_MX.get(entry.dtype)
            if dtype is None or dtype != array.dtype:
                raise CheckpointError(
                    f"{entry.path}: tensor {name!r} is {entry.dtype}, the model expects {array.dtype}", entry.path
                )
            tensors.append(ExpertTensor(param, entry, dtype, tuple(array.shape[1:]), entry.nbytes // num_experts))
        assert num_experts is not None
        layers.append(ExpertLayer(number, site.path, num_experts, tensors))
    return ExpertIndex(layers)
