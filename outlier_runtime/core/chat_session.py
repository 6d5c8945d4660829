"""A multi-turn conversation that keeps the model's KV cache from one turn to the next.

Each turn renders the whole conversation with the chat template, then prefills only the tokens
the cache does not already hold (the end of the last reply, the new message, the generation
prompt), through a :class:`~outlier_runtime.core.prompt_cache.PrefixCache`. Where the template
re-renders earlier text differently from what the model saw, the cache is trimmed back to the
common prefix; a cache that cannot be trimmed starts over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator

from outlier_runtime.core.params import check_generation
from outlier_runtime.core.prompt_cache import PrefixCache
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
        # One conversation: its cache is taken, trimmed where the template re-renders differently,
        # extended and stored again; no byte bound beyond the context window it cannot outgrow.
        self._cache = PrefixCache(None, keep_branches=False)

    def send(self, text: str) -> Generator[Chunk, None, TurnStats]:
        """Stream the reply to ``text``; the generator's return value is the turn's statistics."""
        check_generation(text, **self.options)
        messages = [*self.messages, {"role": "user", "content": text}]
        tokens = self.runtime.encode(messages)
        result = yield from self._cache.stream(self.runtime, tokens, **self.options)
        self.messages = [*messages, {"role": "assistant", "content": result.text}]
        turn = TurnStats(len(tokens), result.prefill_tokens, result.generation_tokens, result.prompt_tps,
                         result.generation_tps, result.finish_reason)
        self.turns.append(turn)
        return turn
