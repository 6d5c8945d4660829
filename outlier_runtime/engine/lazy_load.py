"""mlx-lm's lazy load, with its complaints about a checkpoint turned into one line naming the file.

mlx-lm builds the model class from config.json, then checks each checkpoint tensor's shape
and name against it (``strict``); a mismatch is a bare ``ValueError`` or ``KeyError`` from
deep inside, and a wrong dtype (I32 where packed U32 weights belong) is not checked at all:
it computes garbage or fails in a kernel. :func:`load_lazily` names the shard, the tensor,
what the model expects and what the file holds. Nothing is read but headers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from outlier_runtime.core.errors import CheckpointError
from outlier_runtime.engine.checkpoint import TensorEntry

_SHAPE = re.compile(r"Expected shape \(([^)]*)\) but received shape \(([^)]*)\) for parameter (\S+)")
_MISSING = re.compile(r"Missing \d+ parameters?:\s*(\S+?)[,.]?\s")
_EXTRA = re.compile(r"Received \d+ parameters? not in model:\s*(\S+?)[,.]?\s")
FIX = "the checkpoint does not match its config.json: re-download or re-convert the model"
_SPELLED = {"uint32": "U32 (packed quantized weights)", "uint8": "U8", "floating": "a float dtype (F16, BF16 or F32)"}


def load_lazily(model_dir: str | Path, entries: dict[str, TensorEntry]) -> tuple[Any, Any]:
    """``mlx_lm.load(model_dir, lazy=True)``; a checkpoint that does not fit its model class
    raises :class:`CheckpointError` naming the shard, the tensor, expected and found."""
    import mlx_lm

    try:
        model, tokenizer = mlx_lm.load(str(model_dir), lazy=True)
    except (ValueError, KeyError) as exc:
        raise describe_mismatch(Path(model_dir), entries, exc) from None
    check_parameter_dtypes(model, entries)
    return model, tokenizer


def load_checked(model_dir: str | Path, entries: dict[str, TensorEntry]) -> tuple[Any, Any]:
    """:func:`load_lazily`, then every weight read (what a dense loader wants)."""
    import mlx.core as mx

    model, tokenizer = load_lazily(model_dir, entries)
    mx.eval(model.parameters())
    return model, tokenizer


def expected_dtype(owner: Any, leaf: str) -> str | None:
    """What a layer computes with for its parameter ``leaf``, whatever the file says: quantized
    weights are packed uint32, affine scales and biases floating point (other quantization
    modes keep scales as uint8), the weights of plain layers floating point. None: a layer
    type this check does not know, left to mlx."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    plain = (nn.Linear, nn.Embedding, SwitchLinear, nn.RMSNorm, nn.LayerNorm)
    if isinstance(owner, quantized):
        if leaf == "weight":
            return "uint32"
        if leaf == "scales" and getattr(owner, "mode", "affine") != "affine":
            return "uint8"
        return "floating"
    if isinstance(owner, plain):
        return "floating"
    return None


def dtype_fits(dtype: Any, wanted: str) -> bool:
    import mlx.core as mx

    if wanted == "floating":
        return mx.issubdtype(dtype, mx.floating)
    return dtype == getattr(mx, wanted)


def check_parameter_dtypes(model: Any, entries: dict[str, TensorEntry]) -> None:
    """Refuse a tensor whose dtype its layer cannot compute with (before any weight is read)."""
    for path, module in model.named_modules():
        for leaf, array in module.parameters().items():
            if not hasattr(array, "dtype"):
                continue  # a nested module or list: visited on its own
            wanted = expected_dtype(module, leaf)
            if wanted is not None and not dtype_fits(array.dtype, wanted):
                name = f"{path}.{leaf}" if path else leaf
                entry = entries.get(name)
                where = entry.path if entry is not None else "the checkpoint"
                found = entry.dtype if entry is not None else str(array.dtype)
                raise CheckpointError(f"{where}: tensor {name!r} is {found}, the model ({type(module).__name__}) "
                                      f"expects {_SPELLED[wanted]}; {FIX}", entry.path if entry is not None else None)


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.replace(" ", "").split(",") if d]


def describe_mismatch(model_dir: Path, entries: dict[str, TensorEntry], exc: BaseException) -> CheckpointError:
    """The one-line error for mlx-lm's ``exc`` about the checkpoint in ``model_dir``."""
    message = str(exc.args[0]) if exc.args else str(exc)
    where = str(model_dir / "config.json")

    def file_of(name: str) -> str:
        entry = entries.get(name)
        return entry.path if entry is not None else str(model_dir)

    match = _SHAPE.search(message)
    if match:
        expected, found, name = _dims(match.group(1)), _dims(match.group(2)), match.group(3)
        return CheckpointError(f"{file_of(name)}: tensor {name!r}: the model (config.json) expects shape {expected}, "
                               f"the file holds {found}; {FIX}", file_of(name))
    if isinstance(exc, KeyError) or _MISSING.search(message + " "):
        name = message.strip("'\"") if isinstance(exc, KeyError) else _MISSING.search(message + " ").group(1)
        parent = name.rpartition(".")[0]
        near = [n for n in entries if n.rpartition(".")[0] == parent
                and n.rpartition(".")[2] not in ("weight", "scales", "biases", "bias")]
        hint = f" (found {near[0]!r} instead: renamed?)" if near else ""
        return CheckpointError(f"{model_dir}: the checkpoint has no tensor {name!r}, which the model needs{hint}; "
                               f"{FIX}", str(model_dir))
    match = _EXTRA.search(message + " ")
    if match:
        name = match.group(1)
        return CheckpointError(f"{file_of(name)}: tensor {name!r} is not part of the model config.json describes; "
                               f"{FIX}", file_of(name))
    first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    return CheckpointError(f"{where}: mlx-lm cannot build the model from this checkpoint ({first}); {FIX}", where)
