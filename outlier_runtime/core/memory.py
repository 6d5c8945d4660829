"""Memory plans: what a tier will hold, line by line, and whether it fits in this machine now.

A loader that knows its memory (the paged loader) returns a :class:`MemoryPlan` from
``plan_memory(request)``; admission then checks the plan instead of the tier's headline
``min_ram_gb``. The pieces every model has (its KV cache at the tier's context window, the
headroom left to the OS and other programs) are computed here from ``config.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GB = 1e9
#: Left free for the OS, other programs and allocator slack: 10% of RAM, at least 1 GB.
HEADROOM_FRACTION = 0.10
MIN_HEADROOM_BYTES = int(1 * GB)
#: mlx-lm's KVCache grows its buffers in steps of this many tokens.
KV_STEP = 256


@dataclass
class PlanLine:
    """One item of a plan: what it is, its bytes, and how it was derived."""

    name: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    """What a loaded tier will hold, against what this machine has available now."""

    lines: list[PlanLine]
    available_bytes: int
    headroom_bytes: int
    #: Why the plan chose what it chose (e.g. how ``cache_gb = "auto"`` was sized).
    notes: list[str] = field(default_factory=list)
    #: What the user should know before loading (e.g. fewer slots than asked for).
    warnings: list[str] = field(default_factory=list)
    #: A problem that makes the plan impossible whatever memory is free (e.g. cache below one slot).
    problem: str | None = None
    #: What to change when it does not fit.
    knob: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(line.bytes for line in self.lines)

    @property
    def fits(self) -> bool:
        return self.problem is None and self.total_bytes + self.headroom_bytes <= self.available_bytes

    def reason(self) -> str:
        """One line: the total against what is available, or the problem."""
        if self.problem:
            return self.problem
        need = (self.total_bytes + self.headroom_bytes) / GB
        verdict = "fits" if self.fits else "does not fit"
        return (f"plan {self.total_bytes / GB:.2f} GB + {self.headroom_bytes / GB:.1f} GB headroom = {need:.2f} GB "
                f"{verdict} in {self.available_bytes / GB:.1f} GB available")

    def to_dict(self) -> dict[str, Any]:
        return {
            "lines": [{"name": line.name, "gb": line.bytes / GB, "note": line.note} for line in self.lines],
            "total_gb": self.total_bytes / GB,
            "headroom_gb": self.headroom_bytes / GB,
            "available_gb": self.available_bytes / GB,
            "fits": self.fits,
            "reason": self.reason(),
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "problem": self.problem,
        }


def available_bytes() -> int:
    """Memory the OS can give this process now without swapping (free plus reclaimable)."""
    import psutil

    return int(psutil.virtual_memory().available)


def headroom_bytes(total_ram: int | None = None) -> int:
    import psutil

    total = psutil.virtual_memory().total if total_ram is None else total_ram
    return max(MIN_HEADROOM_BYTES, int(total * HEADROOM_FRACTION))


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's settings: top level, or ``text_config`` in multimodal checkpoints."""
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def attention_kinds(config: dict[str, Any]) -> list[str]:
    """Per layer: "full", "sliding" or "linear" attention, as the model's cache classes see it."""
    text = text_config(config)
    layers = int(text["num_hidden_layers"])
    kinds = text.get("layer_types")
    if isinstance(kinds, list) and len(kinds) == layers:
        return ["linear" if "linear" in str(k) else "sliding" if "sliding" in str(k) else "full" for k in kinds]
    interval = text.get("full_attention_interval")
    if isinstance(interval, int) and interval > 0 and "linear_num_value_heads" in text:
        # qwen3_next / qwen3_5: every interval-th layer is full attention, the rest linear.
        return ["full" if (i + 1) % interval == 0 else "linear" for i in range(layers)]
    return ["full"] * layers


def kv_cache_bytes(config: dict[str, Any], tokens: int, dtype_bytes: int, layers: range | None = None) -> int:
    """Bytes of one sequence's cache at ``tokens`` tokens, as mlx-lm's cache classes allocate it
    (for the decoder layers in ``layers`` only, when given: a pipeline rank's).

    Full attention (``KVCache``): keys and values for every token, grown in steps of 256.
    Sliding window (``RotatingKVCache``): at most the window. Linear attention (qwen3_next
    style ``ArraysCache``): a convolution state in the activation dtype and a float32
    recurrent state, the same size at any length.
    """
    text = text_config(config)
    heads = int(text.get("num_attention_heads", 1))
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    per_token = 2 * kv_heads * head_dim * dtype_bytes  # keys and values
    window = int(text.get("sliding_window") or tokens)
    total = 0
    kinds = attention_kinds(config)
    for kind in kinds if layers is None else [kinds[i] for i in layers if i < len(kinds)]:
        if kind == "full":
            total += per_token * _steps(tokens)
        elif kind == "sliding":
            total += per_token * min(_steps(tokens), window)
        else:
            total += _linear_state_bytes(text, dtype_bytes)
    return total


def _steps(tokens: int) -> int:
    return math.ceil(max(tokens, 1) / KV_STEP) * KV_STEP


def _linear_state_bytes(text: dict[str, Any], dtype_bytes: int) -> int:
    key_heads = int(text.get("linear_num_key_heads", 0))
    value_heads = int(text.get("linear_num_value_heads", 0))
    key_dim = int(text.get("linear_key_head_dim", 0))
    value_dim = int(text.get("linear_value_head_dim", 0))
    kernel = int(text.get("linear_conv_kernel_dim", 4))
    conv_channels = 2 * key_heads * key_dim + value_heads * value_dim
    conv = (kernel - 1) * conv_channels * dtype_bytes
    recurrent = value_heads * value_dim * key_dim * 4  # float32
    return conv + recurrent


def wired_limit_bytes(wanted: int, max_recommended: int, current_limit: int = 0) -> int:
    """The wired limit to ask mlx for on Apple Silicon: enough for ``wanted`` bytes kept resident
    (the slot buffers and non-expert weights), never above the GPU's recommended working set,
    never below a limit already set."""
    return max(current_limit, min(wanted, max_recommended))


def apply_wired_limit(wanted: int) -> int | None:
    """Wire ``wanted`` bytes on Metal, as mlx-lm's generate does; None where there is no Metal."""
    import mlx.core as mx

    if not mx.metal.is_available():
        return None
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    limit = wired_limit_bytes(wanted, int(info["max_recommended_working_set_size"]))
    mx.set_wired_limit(limit)
    return limit
