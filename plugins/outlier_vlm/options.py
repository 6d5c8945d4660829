"""The ``vlm`` loader's options (the manifest's ``[loader.options]`` table)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from outlier_runtime import PluginOptions


class VLMOptions(PluginOptions):
    """How mlx-vlm loads and prefills the model."""

    lazy_load: bool = Field(default=False, description="Read weights on first use instead of at load time.")
    prefill_step_size: Optional[int] = Field(
        default=None, ge=1,
        description="Prefill long prompts in chunks of this many tokens (less peak memory); None: mlx-vlm's default.")
