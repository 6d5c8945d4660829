"""A multi-turn conversation that keeps the model's KV cache from one turn to the next.

Each turn renders the whole conversation with the chat template, then prefills only the tokens
the cache does not already hold (the end of the last reply, the new message, the generation
prompt). Where the template re-renders earlier text differently from what the model saw, the
cache is trimmed back to the common prefix; a cache that cannot be trimmed starts over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator

from outlier_runtime.core.params import check_generation
from outlier_runtime.core.results import Chunk
from outlier_runtime.core.runtime import Message, Runtime


@dataclass
class TurnStats:
    """One turn's numbers."""

    #: The whole conversation's tokens, as rendered for this turn.
    prompt_tokens: int
    #: Of those, the ones prefilled now (the rest came from the cache).
    prefill_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    finish_reason: str | None


class ChatSession:
    """A conversation with a loaded tier; :meth:`send` streams a reply and remembers both sides."""

    def __init__(self, runtime: Runtime, *, system_prompt: str | None = None, **options: Any):
        check_generation(**options)  # max_tokens, temperature, top_p, seed: refuse bad ones now
        self.runtime = runtime
        self.system_prompt = system_prompt
        self.options = options
        self.clear()

    def clear(self) -> None:
        """Forget the conversation and its cache."""
        self.messages: list[Message] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.turns: list[TurnStats] = []
        self._cache: list[Any] | None = None
        self._cached_tokens: list[int] = []  # what the cache holds, token by token

    def send(self, text: str) -> Generator[Chunk, None, TurnStats]:
        """Stream the reply to ``text``; the generator's return value is the turn's statistics."""
        check_generation(text, **self.options)
        messages = [*self.messages, {"role": "user", "content": text}]
        tokens = self.runtime.encode(messages)
        keep = self._reuse(tokens)
        result = yield from self.runtime.stream_tokens(tokens, prompt_cache=self._cache, cached=keep, **self.options)
        self.messages = [*messages, {"role": "assistant", "content": result.text}]
        # The cache also holds a final end-of-sequence token, which result.tokens leaves out;
        # _reuse trims what is not known here at the start of the next turn.
        self._cached_tokens = [*tokens, *result.tokens]
        turn = TurnStats(len(tokens), len(tokens) - keep, result.generation_tokens, result.prompt_tps,
                         result.generation_tps, result.finish_reason)
        self.turns.append(turn)
        return turn

    def _reuse(self, tokens: list[int]) -> int:
        """Make the cache hold a prefix of ``tokens`` (creating or trimming it); returns its length."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

        held = _cache_length(self._cache)
        known = self._cached_tokens[:held] if held is not None else []
        keep = 0
        while keep < min(len(known), len(tokens) - 1) and known[keep] == tokens[keep]:
            keep += 1  # at least one token must be left to prefill: it yields the first logits
        if self._cache is not None and held is not None and held > keep and can_trim_prompt_cache(self._cache):
            trim_prompt_cache(self._cache, held - keep)
        elif self._cache is None or held is None or held > keep:
            self._cache, keep = make_prompt_cache(self.runtime.model), 0  # start over: prefill everything
        self._cached_tokens = list(tokens[:keep])
        return keep


def _cache_length(cache: list[Any] | None) -> int | None:
    """Tokens a prompt cache holds (its first attention layer's offset); None if unknown."""
    if not cache:
        return None
    return next((c.offset for c in cache if isinstance(getattr(c, "offset", None), int)), None)
