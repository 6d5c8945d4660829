"""The paged-MoE loader's options: the ``[paging]`` table of a tier manifest."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, PlainValidator, WithJsonSchema, model_validator

from outlier_runtime import PluginOptions, plugin_ref
from outlier_runtime.core.env_flags import MMAP_EXPERTS_ENV, env_flag



def _cache_gb(value: Any) -> float | str:
    if value == "auto":
        return "auto"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    raise ValueError('expected a number >= 0 (GB) or "auto"')


#: A size in GB, or "auto" (sized from available memory).
CacheGB = Annotated[Union[float, str], PlainValidator(_cache_gb),
                    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, {"const": "auto"}]})]


class PagedMoEOptions(PluginOptions):
    """The paged engine's knobs: the product's, plus ours."""

    k_override: int = Field(default=20, ge=1, description="Compute-ready expert slots per MoE layer.")
    cache_gb: CacheGB = Field(
        default="auto",
        description="Upper bound on every expert byte held: slots, RAM cache and reads in flight (GB = 1e9 "
                    "bytes); \"auto\" sizes it from available memory, leaving headroom.")
    mmap_experts: bool = Field(
        default=False,
        description=f"Read experts through mmap: shorthand for reader = 'mmap' ({MMAP_EXPERTS_ENV}=1/0 overrides).",
    )
    lazy_load: bool = Field(
        default=True,
        description="Read non-expert weights on first use instead of at load time. Stacked expert tensors "
                    "are never read whole either way.",
    )
    reader: str = plugin_ref("reader", "pread", options="reader_options",
                             description="A registered reader (`outlier plugins`).")
    reader_options: dict[str, Any] = Field(default_factory=dict, description="Options of the reader.")
    cache_policy: str = plugin_ref("cache_policy", "lru", options="cache_policy_options",
                                   description="A registered cache policy: picks which experts leave.")
    cache_policy_options: dict[str, Any] = Field(default_factory=dict, description="Options of the cache policy.")
    prefetcher: Optional[str] = plugin_ref("prefetcher", None, options="prefetcher_options",
                                           description="A registered prefetcher, or none.")
    prefetcher_options: dict[str, Any] = Field(default_factory=dict, description="Options of the prefetcher.")
    experts_per_token: Optional[int] = Field(default=None, ge=1,
                                             description="Override the router's top-k. Changes results.")
    use_pack: bool = Field(default=True, description="Use a packed expert layout when a valid one exists.")
    verify_checksums: bool = Field(default=True, description="Verify each pack record read from disk against its CRC32.")
    distributed: Optional[Literal["pipeline"]] = Field(
        default=None,
        description="\"pipeline\": inside an mlx.launch'ed job, split the layers across the ranks; each rank "
                    "loads, pages and reads only its own layers' experts (docs/distributed.md). None: one process.")
    distributed_backend: Literal["any", "ring", "mpi", "jaccl", "nccl"] = Field(
        default="any", description="The mlx.distributed backend (\"any\": the one mlx.launch set up).")
    pipeline_split: Optional[list[Annotated[int, Field(ge=1)]]] = Field(
        default=None,
        description="Layers per rank, rank 0 first (rank 0 runs the last layers); default an even split.")

    @model_validator(mode="before")
    @classmethod
    def _mmap_selects_the_reader(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        from_env = env_flag(MMAP_EXPERTS_ENV)
        data = dict(data)
        if from_env is not None:
            data["mmap_experts"] = from_env
        if data.get("mmap_experts") is True:
            data["reader"] = "mmap"
        return data
