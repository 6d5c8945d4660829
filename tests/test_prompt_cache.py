"""PrefixCache: KV caches reused by longest common token prefix, within a byte budget."""

from __future__ import annotations

import pytest

import outlier_runtime
from outlier_runtime.core.prompt_cache import PrefixCache, cache_length




def run(cache: PrefixCache, runtime, tokens, **options):
    chunks = cache.stream(runtime, tokens, max_tokens=options.pop("max_tokens", 5), temperature=0.0, **options)
    while True:
        try:
            next(chunks)
        except StopIteration as done:
            return done.value


def test_a_longer_prompt_prefills_only_its_new_tokens_and_matches_a_fresh_run(nano):
    cache = PrefixCache(10**9)
    first = nano.encode("def add(a, b):", chat=False)
    result = run(cache, nano, first)
    assert result.cached_tokens == 0 and len(cache) == 1
    longer = [*first, *result.tokens, *nano.encode("\n\ndef sub(a, b):", chat=False)]
    again = run(cache, nano, longer)
    assert again.cached_tokens == len(first) + len(result.tokens) and again.prefill_tokens == len(longer) - again.cached_tokens
    assert again.tokens == run(PrefixCache(0), nano, longer).tokens  # the same as prefilling everything
    assert len(cache) == 1  # the extended cache replaced the one it grew from


def test_a_branch_is_copied_and_trimmed_and_the_original_stays(nano):
    cache = PrefixCache(10**9)
    base = nano.encode("class Stack:\n    def push(self, x):", chat=False)
    run(cache, nano, base)
    (held_tokens,) = [entry.tokens for entry in cache._entries.values()]
    branch = [*base[:-2], *nano.encode(" pop", chat=False)]
    reuse = cache.fetch(nano.name, nano.model, branch)
    assert reuse.cached == len(base) - 2 and cache_length(reuse.cache) == reuse.cached
    (kept,) = cache._entries.values()
    assert list(kept.tokens) == list(held_tokens) and cache_length(kept.cache) == len(held_tokens)
    fresh = run(PrefixCache(0), nano, branch)
    assert run(cache, nano, branch).tokens == fresh.tokens
    assert len(cache) == 2  # both branches


def test_the_byte_budget_evicts_the_least_recently_used(nano):
    probe = PrefixCache(None)
    run(probe, nano, nano.encode("import os", chat=False))
    one = probe.nbytes
    cache = PrefixCache(one)  # room for one entry of this size
    run(cache, nano, nano.encode("import os", chat=False))
    run(cache, nano, nano.encode("print(1)", chat=False))
    assert len(cache) == 1 and cache.nbytes <= one
    (entry,) = cache._entries.values()
    assert list(entry.tokens[:2]) == nano.encode("print(1)", chat=False)[:2]
    disabled = PrefixCache(0)
    assert run(disabled, nano, nano.encode("import os", chat=False)).cached_tokens == 0 and len(disabled) == 0


class _Untrimmable:
    """A recurrent layer's cache stand-in: a length, bytes, and no way back."""

    def __init__(self, offset: int):
        self.offset = offset
        self.nbytes = 64

    def is_trimmable(self) -> bool:
        return False


def test_a_cache_that_cannot_be_trimmed_is_reused_only_when_extended(nano):
    cache = PrefixCache(10**6)
    assert cache.store(nano.name, [_Untrimmable(4)], [1, 2, 3, 4, 5])
    assert not cache.store(nano.name, [_Untrimmable(7)], [1, 2, 3])  # holds an unknown token: dropped
    diverging = cache.fetch(nano.name, nano.model, [1, 2, 9, 9])
    assert diverging.cached == 0 and cache_length(diverging.cache) == 0 and len(cache) == 1
    extending = cache.fetch(nano.name, nano.model, [1, 2, 3, 4, 8, 9])
    assert extending.cached == 4 and isinstance(extending.cache[0], _Untrimmable) and len(cache) == 0
    assert cache.fetch("other-tier", nano.model, [1, 2, 3, 4, 8]).cached == 0
