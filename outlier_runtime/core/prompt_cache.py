"""KV caches kept between generations by token prefix, so a request prefills only what is new.

A :class:`PrefixCache` holds mlx-lm prompt caches, each with the exact tokens it holds, within a
byte budget; the least recently used entry goes first. A call takes the entry sharing the longest
prefix with its prompt: an entry the prompt extends is taken as it is; one that runs past the
common prefix is copied and trimmed back to it (mlx-lm's ``trim_prompt_cache``), and the original
stays for the conversation it came from. A cache that cannot be trimmed (recurrent layers, a
rotating window that has wrapped) is reused only when the prompt extends it; otherwise the call
starts from a fresh cache. The server keeps one per host; ``outlier chat`` one per conversation.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generator, Sequence

import numpy as np

from outlier_runtime.core.results import Chunk, GenerationResult


@dataclass
class Reuse:
    """What a call starts from: an mlx-lm prompt cache that holds the prompt's first ``cached`` tokens."""

    cache: list[Any]
    cached: int


@dataclass
class _Entry:
    tokens: np.ndarray
    cache: list[Any]
    nbytes: int


class PrefixCache:
    """Prompt caches by (model key, tokens), at most ``max_bytes`` in all (None: no bound).

    ``keep_branches=False`` takes an entry out even when it must be trimmed, instead of copying
    it: right for one conversation, where the old branch is never asked for again.
    """

    def __init__(self, max_bytes: int | None, *, keep_branches: bool = True):
        self.max_bytes = max_bytes
        self.keep_branches = keep_branches
        self._entries: OrderedDict[tuple[str, bytes], _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes the stored caches hold (their allocated buffers)."""
        return sum(entry.nbytes for entry in self._entries.values())

    def clear(self, key: str | None = None) -> None:
        """Drop every entry (of one model key, when given)."""
        with self._lock:
            for name in [name for name in self._entries if key is None or name[0] == key]:
                del self._entries[name]

    def fetch(self, key: str, model: Any, tokens: Sequence[int]) -> Reuse:
        """A cache for ``tokens`` on ``model``: the best stored one, else a fresh one (cached=0).

        At least one token is always left to prefill: its logits start the generation.
        """
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

        wanted = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            best, common = None, 0
            for name, entry in self._entries.items():
                if name[0] == key:
                    shared = _common_prefix(entry.tokens, wanted)
                    if shared > common:
                        best, common = name, shared
            common = min(common, len(wanted) - 1)
            if best is not None and common > 0:
                entry = self._entries[best]
                if common == len(entry.tokens):  # the prompt extends it: no copy needed
                    del self._entries[best]
                    return Reuse(entry.cache, common)
                if can_trim_prompt_cache(entry.cache):
                    if self.keep_branches:
                        self._entries.move_to_end(best)
                        cache = copy.deepcopy(entry.cache)
                    else:
                        del self._entries[best]
                        cache = entry.cache
                    trim_prompt_cache(cache, len(entry.tokens) - common)
                    return Reuse(cache, common)
        return Reuse(make_prompt_cache(model), 0)

    def store(self, key: str, cache: list[Any], tokens: Sequence[int]) -> bool:
        """Keep ``cache``, which holds a prefix of ``tokens`` (a prompt and what was generated).

        The cache's own length says how much of ``tokens`` it holds; one that holds more than
        is known (a final end-of-sequence token) is trimmed back, or dropped if it cannot be.
        Returns whether it was kept.
        """
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        held = cache_length(cache)
        if held is None or held == 0:
            return False
        if held > len(tokens):
            if not can_trim_prompt_cache(cache):
                return False
            trim_prompt_cache(cache, held - len(tokens))
            held = len(tokens)
        known = np.asarray(tokens[:held], dtype=np.int64)
        entry = _Entry(known, cache, sum(c.nbytes for c in cache))
        if self.max_bytes is not None and entry.nbytes > self.max_bytes:
            return False
        with self._lock:
            if can_trim_prompt_cache(cache):
                # A stored prefix of these tokens can be served by trimming this one: it only takes room.
                for name in [name for name, old in self._entries.items()
                             if name[0] == key and _common_prefix(old.tokens, known) == len(old.tokens)]:
                    del self._entries[name]
            self._entries[(key, known.tobytes())] = entry
            self._entries.move_to_end((key, known.tobytes()))
            while self.max_bytes is not None and self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)
        return True

    def stream(self, runtime: Any, tokens: Sequence[int], **options: Any) -> Generator[Chunk, None, GenerationResult]:
        """``runtime.stream_tokens`` from the best stored cache; the cache is stored again after.

        A generation closed early (a client that left) or failed drops its cache. A runtime
        that takes no mlx-lm prompt caches (a vision model) prefills every prompt whole.
        """
        if not getattr(runtime, "reuses_prompt_cache", True):
            return (yield from runtime.stream_tokens(tokens, **options))
        reuse = self.fetch(runtime.name, runtime.model, tokens)
        result = yield from runtime.stream_tokens(tokens, prompt_cache=reuse.cache, cached=reuse.cached, **options)
        self.store(runtime.name, reuse.cache, [*tokens, *result.tokens])
        return result


def cache_length(cache: list[Any] | None) -> int | None:
    """Tokens a prompt cache holds (its first attention layer's offset); None if unknown."""
    if not cache:
        return None
    return next((c.offset for c in cache if isinstance(getattr(c, "offset", None), int)), None)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
