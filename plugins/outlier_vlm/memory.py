"""The Vision tier's memory plan: the vision tower and the language model, from the checkpoint
headers alone (no weights read, no mlx-vlm import), plus the KV cache at the context window."""

from __future__ import annotations

from pathlib import Path

from outlier_runtime.core.memory import MemoryPlan, PlanLine, available_bytes, headroom_bytes, kv_cache_bytes
from outlier_runtime.engine.checkpoint import TensorEntry, read_checkpoint
from outlier_runtime.engine.geometry import read_config

#: Name prefixes of vision-tower tensors, as mlx-vlm saves them and as Hugging Face checkpoints
#: name them before mlx-vlm's sanitize (``model.visual``) in the Qwen-VL families and others.
VISION_PREFIXES = ("vision_tower.", "vision_model.", "visual.", "model.visual.", "model.vision_tower.",
                   "model.language_model.visual.", "multi_modal_projector.", "mm_projector.")
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def is_vision_tensor(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


def split_bytes(entries: dict[str, TensorEntry]) -> tuple[int, int]:
    """(vision tower bytes, language model bytes) of a checkpoint's tensors."""
    vision = sum(e.nbytes for name, e in entries.items() if is_vision_tensor(name))
    return vision, sum(e.nbytes for e in entries.values()) - vision


def _activation_bytes(entries: dict[str, TensorEntry]) -> int:
    for name, entry in entries.items():
        if name.endswith(("embed_tokens.scales", "embed_tokens.weight")) and entry.dtype in DTYPE_BYTES:
            return DTYPE_BYTES[entry.dtype]
    return 2


def plan_vlm(model_path: Path, context_window: int) -> MemoryPlan:
    """Every weight is resident (a dense load): vision tower + language model + KV cache."""
    entries = read_checkpoint(model_path)
    vision, language = split_bytes(entries)
    config = read_config(model_path)
    kv = kv_cache_bytes(config, context_window, _activation_bytes(entries))
    lines = [
        PlanLine("vision tower weights", vision, "from the checkpoint headers"),
        PlanLine("language model weights", language, "from the checkpoint headers"),
        PlanLine("KV cache", kv, f"{context_window}-token context window"),
    ]
    return MemoryPlan(lines, available_bytes(), headroom_bytes(),
                      knob="generation.context_window (or use a smaller tier)")
