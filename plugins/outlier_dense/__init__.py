"""Built-in loader ``dense``: stock mlx-lm, the whole model in memory (Nano to Vision)."""

from __future__ import annotations

from outlier_runtime import hookimpl
from outlier_runtime.engine.checkpoint import read_checkpoint
from outlier_runtime.engine.lazy_load import load_checked
from outlier_runtime.core.protocols import LoadedModel, LoadRequest


class DenseLoader:
    """Loads every weight with ``mlx_lm.load``; small MoE tiers load whole too."""

    def load(self, request: LoadRequest) -> LoadedModel:
        # A missing or truncated shard is named here, not deep inside mlx.
        entries = read_checkpoint(request.model_path)
        # A checkpoint unlike its config.json (dtype, shape, a renamed tensor) is one line naming
        # the shard and tensor. Remote code is never enabled: a manifest cannot run a repo's Python.
        model, tokenizer = load_checked(request.model_path, entries)
        return LoadedModel(model=model, tokenizer=tokenizer)


@hookimpl
def register_loaders(register):
    register("dense", DenseLoader, "Stock mlx-lm: every weight resident.")
