"""What generation returns: text plus statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from outlier_runtime.core.logprobs import TokenLogprob


@dataclass
class GenerationResult:
    """The outcome of one :meth:`Runtime.generate` call."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    #: mlx's own peak allocation (0 on backends that do not track it).
    peak_memory_gb: float
    #: The process's peak resident set size so far (what the OS charged us).
    peak_rss_gb: float
    finish_reason: Optional[str]
    tier: str
    #: Engine statistics for this call (paged tiers: hits, misses, bytes read, ...).
    engine: dict[str, Any] = field(default_factory=dict)
    #: Of the prompt's tokens, those a prompt cache already held (not prefilled by this call).
    cached_tokens: int = 0
    #: Each generated token's log probability, when the call asked for them (``top_logprobs``).
    logprobs: Optional[list["TokenLogprob"]] = None

    @property
    def prefill_tokens(self) -> int:
        """The prompt tokens this call prefilled."""
        return self.prompt_tokens - self.cached_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Chunk:
    """One streamed piece of text and the token that produced it."""

    text: str
    token: int
    #: The log probabilities of the tokens whose text this chunk carries, when asked for.
    logprobs: list["TokenLogprob"] = field(default_factory=list)
