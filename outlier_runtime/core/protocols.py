"""What a plugin implements: the Loader, CachePolicy, Reader and Prefetcher protocols.

These are structural (``typing.Protocol``): a plugin needs no base class, only the methods.
docs/hooks.md explains each one with a worked example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Hashable, Iterator, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from outlier_runtime.core.manifest import TierManifest

#: A cached expert is identified by (MoE layer number, expert id).
ExpertKey = tuple[int, int]


@runtime_checkable
class CachePolicy(Protocol):
    """Decides which cached entry to evict. One instance serves one cache.

    The cache tells the policy about every use and every eviction, and asks it for a victim
    when it is full. Keys are hashable (for expert caches: ``(layer, expert_id)``).
    """

    def accessed(self, key: Hashable) -> None:
        """``key`` was used: a hit, or a new entry just inserted."""

    def evicted(self, key: Hashable) -> None:
        """``key`` left the cache (chosen as victim, or dropped)."""

    def choose_victim(self, candidates: Collection[Hashable]) -> Hashable:
        """Return one of ``candidates`` (never empty) to evict."""


@dataclass(frozen=True)
class ReadRequest:
    """Read ``length`` bytes at ``offset`` of the file at ``path`` into ``out``."""

    path: str
    offset: int
    length: int
    out: memoryview


@runtime_checkable
class Reader(Protocol):
    """Fetches byte ranges of checkpoint files into caller-owned buffers."""

    def read(self, requests: Sequence[ReadRequest]) -> None:
        """Fill every request's ``out`` completely, or raise ``ExpertReadError`` naming the file.

        A reader may also offer ``read_background(requests)`` (same contract) for prefetch
        guesses, served after every ``read``; the engine uses ``read`` where it is missing.
        """

    def close(self) -> None:
        """Release open files and workers."""


@dataclass
class LoadRequest:
    """What a loader is asked to build."""

    manifest: "TierManifest"
    model_path: Path
    #: The loader's options, an instance of the options model it registered (validated).
    options: Any = None
    #: Memory the caller keeps beside the model (the server's prompt cache), as ``core.memory.PlanLine``s:
    #: a loader that plans memory counts them as lines of its plan and sizes what it chooses around them.
    reserved: Sequence[Any] = ()


@dataclass
class LoadedModel:
    """A model a loader built, ready for mlx-lm's generation loop."""

    model: Any
    tokenizer: Any
    #: Returns a JSON-able snapshot of engine statistics (paging loaders: hits, misses, ...).
    stats: Callable[[], dict[str, Any]] = dict
    #: Resets the statistics counters (called before each generation).
    reset_stats: Callable[[], None] = lambda: None
    #: Frees what the loader holds beyond the model (open files, workers, caches).
    close: Callable[[], None] = lambda: None
    #: Turns an error raised while generating into one that says what happened and what to do
    #: (a distributed loader: a lost peer), or returns None to let it through unchanged.
    explain_error: Callable[[BaseException], BaseException | None] = lambda exc: None
    #: The statistics a generation's result carries, called once at the end of each generation
    #: (every pipeline rank at the same point, so a distributed loader may gather its ranks'
    #: there); None: ``stats``.
    result_stats: Callable[[], dict[str, Any]] | None = None
    #: A vision-language model (a loader such as ``vlm``): it takes images, and the runtime
    #: generates through it instead of mlx-lm's loop. None: a text-only model.
    vision: "VisionModel | None" = None


@dataclass
class PreparedPrompt:
    """A prompt a :class:`VisionModel` made ready: its token ids (image placeholders expanded)
    and whatever else its generation needs (pixel values, grids, masks)."""

    tokens: list[int]
    inputs: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class VisionModel(Protocol):
    """What a vision-language loader adds: prompts with images, and their generation loop."""

    def prepare(self, prompt: "str | list[dict[str, Any]]", images: Sequence[Any], chat: bool) -> PreparedPrompt:
        """Render ``prompt`` (text, or chat messages whose image parts are ``{"type": "image"}``
        markers) with the processor's chat template when ``chat``, and process ``images``
        (decoded RGB PIL images, in order) into the model's inputs."""

    def stream(self, prompt: PreparedPrompt, *, max_tokens: int, sampler: Any,
               logits_processors: list[Any] | None) -> Iterator[Any]:
        """Generate: one response per token, shaped as mlx-lm's ``GenerationResponse`` (``text``,
        ``token``, ``finish_reason``, ``prompt_tps``, ``generation_tps``)."""


@runtime_checkable
class Loader(Protocol):
    """Builds a model for a tier."""

    def load(self, request: LoadRequest) -> LoadedModel:
        """Build the model at ``request.model_path`` following the tier's manifest."""


@runtime_checkable
class Prefetcher(Protocol):
    """Guesses which experts the next MoE layer will need, so their reads start early.

    A guess only costs bandwidth: a wrong one never changes results (the step reads what it
    really needs), so prefetchers may be approximate.
    """

    def predict(self, layer: int, hidden: Any, next_block: Any) -> Sequence[int]:
        """Expert ids of MoE layer ``layer + 1`` worth reading ahead.

        ``hidden`` is the input of MoE layer ``layer``'s experts; ``next_block`` is the
        MoE block (router and experts) of layer ``layer + 1``.

        Optional, and preferred: ``guess(layer, hidden, next_block) -> mx.array | None``, the
        same ids as a lazy mx array. The engine then evaluates the guess together with the
        routed ids it reads anyway, so the prefetcher adds no host sync; ``predict`` reading
        its guess on the host costs one more sync per layer.
        """
