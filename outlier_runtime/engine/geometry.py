"""A checkpoint's memory geometry from its headers alone: no weights read, no mlx imported.

Stacked expert tensors are recognised the way mlx-lm stores them: a tensor under a switch
module (``switch_mlp``, ``experts``, ``switch_glu``) whose first dimension is the config's
expert count. Everything else is a non-expert weight. The paged loader's exact expert index
(``engine/experts.py``) finds the same tensors through the model's modules; a test keeps the
two in agreement.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outlier_runtime.core.errors import CheckpointError
from outlier_runtime.core.memory import text_config
from outlier_runtime.engine.checkpoint import TensorEntry, read_checkpoint

#: A decoder layer's tensors: ``model.layers.N.`` (``language_model.model.layers.N.`` in qwen3_5),
#: not the ``mtp.layers.N.`` of multi-token-prediction heads.
_DECODER_LAYER = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.")

#: Module names under which mlx-lm keeps stacked experts.
SWITCH_MODULES = ("switch_mlp", "experts", "switch_glu")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


@dataclass
class CheckpointGeometry:
    """What a checkpoint holds, in bytes."""

    config: dict[str, Any]
    num_experts: int
    #: Bytes of one expert, per MoE layer (in layer order).
    expert_nbytes: list[int]
    non_expert_bytes: int
    #: Bytes per element of the activations (and so of the KV cache).
    activation_bytes: int
    #: The decoder layer of each MoE layer in ``expert_nbytes`` (None where a name has no layer number).
    expert_layers: list[int | None] = field(default_factory=list)
    #: Non-expert bytes of each decoder layer (``...model.layers.N.``); the rest of
    #: ``non_expert_bytes`` (embeddings, final norm, head) is outside the layers.
    layer_bytes: dict[int, int] = field(default_factory=dict)

    def non_expert_bytes_of(self, layers: range) -> int:
        """Non-expert bytes a pipeline rank holding ``layers`` loads: those layers' and every
        weight outside the layers (each rank keeps the embeddings, final norm and head)."""
        outside = self.non_expert_bytes - sum(self.layer_bytes.values())
        return outside + sum(self.layer_bytes.get(layer, 0) for layer in layers)

    @property
    def total_expert_bytes(self) -> int:
        return sum(self.expert_nbytes) * self.num_experts


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the model's config ({exc}); is this an mlx-lm model "
                              f"directory?", str(path)) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object", str(path))
    return config


def checkpoint_geometry(model_dir: str | Path, entries: dict[str, TensorEntry] | None = None) -> CheckpointGeometry:
    """Expert and non-expert bytes of the checkpoint in ``model_dir``, from its headers."""
    config = read_config(Path(model_dir))
    entries = read_checkpoint(model_dir) if entries is None else entries
    text = text_config(config)
    num_experts = next((int(text[k]) for k in EXPERT_COUNT_KEYS if isinstance(text.get(k), int)), 0)
    per_layer: dict[str, int] = {}
    layer_bytes: dict[int, int] = {}
    expert_total = 0
    for name, entry in entries.items():
        layer = _switch_module(name)
        if layer is not None and num_experts and entry.shape and entry.shape[0] == num_experts:
            per_layer[layer] = per_layer.get(layer, 0) + entry.nbytes // num_experts
            expert_total += entry.nbytes
            continue
        number = decoder_layer(name)
        if number is not None:
            layer_bytes[number] = layer_bytes.get(number, 0) + entry.nbytes
    total = sum(entry.nbytes for entry in entries.values())
    layers = sorted(per_layer, key=_natural)
    return CheckpointGeometry(config, num_experts, [per_layer[name] for name in layers],
                              total - expert_total, _activation_bytes(entries),
                              [decoder_layer(name + ".") for name in layers], layer_bytes)


def decoder_layer(name: str) -> int | None:
    """The decoder layer a tensor name belongs to (``model.layers.N.`` anywhere in it), else None."""
    match = _DECODER_LAYER.search(name)
    return int(match.group(1)) if match else None


def _switch_module(name: str) -> str | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in SWITCH_MODULES:
            return ".".join(parts[:i + 1])
    return None


def _natural(path: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def _activation_bytes(entries: dict[str, TensorEntry]) -> int:
    """The embedding's float dtype (its scales when quantized): what activations are computed in."""
    for suffix in ("embed_tokens.scales", "embed_tokens.weight", "wte.weight", "tok_embeddings.weight"):
        entry = next((e for name, e in entries.items() if name.endswith(suffix)), None)
        if entry is not None and entry.dtype in DTYPE_BYTES:
            return DTYPE_BYTES[entry.dtype]
    return 2
