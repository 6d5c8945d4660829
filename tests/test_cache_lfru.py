"""The built-in ``lfru`` policy: evicts the lowest uses x weight + recency, among the candidates only."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from outlier_cache_lfru import LFRUPolicy
from pydantic import ValidationError

import outlier_runtime
from outlier_runtime.core.errors import PluginError
from outlier_runtime.core.plugin_manager import get_registry
from outlier_runtime.core.protocols import CachePolicy


def _used(policy, *keys):
    for key in keys:
        policy.accessed(key)
    return policy


def test_a_frequent_expert_survives_a_burst_that_lru_would_let_evict_it():
    # (0, 1) used three times long ago, then (0, 2) and (0, 3) once each, more recently.
    policy = _used(LFRUPolicy(weight=2.0), (0, 1), (0, 1), (0, 1), (0, 2), (0, 3))
    # scores: (0, 1) = 3 x 2 + 2 = 8, (0, 2) = 2 + 3 = 5, (0, 3) = 2 + 4 = 6
    assert policy.choose_victim({(0, 1), (0, 2), (0, 3)}) == (0, 2)


def test_an_expert_popular_long_ago_ages_out():
    # (0, 1): three uses long ago; (0, 2): one use after ten others. LFU would keep (0, 1).
    policy = _used(LFRUPolicy(weight=2.0), *[(0, 1)] * 3, *[(0, 3)] * 10, (0, 2))
    assert (policy.score((0, 1)), policy.score((0, 2))) == (3 * 2 + 2, 1 * 2 + 13)
    assert policy.choose_victim({(0, 1), (0, 2)}) == (0, 1)


def test_weight_zero_is_lru_and_a_large_weight_is_lfu():
    keys = [(0, 1), (0, 1), (0, 1), (0, 2), (0, 3)]
    assert _used(LFRUPolicy(weight=0.0), *keys).choose_victim({(0, 1), (0, 2), (0, 3)}) == (0, 1)  # LRU
    assert _used(LFRUPolicy(weight=1000.0), *keys).choose_victim({(0, 1), (0, 2), (0, 3)}) == (0, 2)  # LFU


def test_counts_survive_eviction():
    policy = _used(LFRUPolicy(weight=10.0), (0, 1), (0, 1), (0, 2))
    policy.evicted((0, 1))
    policy.accessed((0, 1))  # back in the cache with three uses
    policy.accessed((0, 3))
    assert policy.choose_victim({(0, 1), (0, 2), (0, 3)}) == (0, 2)


def test_a_never_seen_candidate_goes_first():
    policy = _used(LFRUPolicy(), (0, 1), (0, 2))
    assert policy.choose_victim({(0, 1), (0, 9), (0, 2)}) == (0, 9)


@given(uses=st.lists(st.integers(0, 7), max_size=40),
       candidates=st.sets(st.integers(0, 9), min_size=1), weight=st.floats(0, 100))
def test_the_victim_is_always_one_of_the_candidates(uses, candidates, weight):
    policy = _used(LFRUPolicy(weight=weight), *[(0, e) for e in uses])
    offered = {(0, e) for e in candidates}
    assert policy.choose_victim(offered) in offered


def test_lfru_is_a_registered_builtin_with_a_described_weight_option():
    registry = get_registry()
    assert "lfru" in registry.names("cache_policy")
    policy = registry.create("cache_policy", "lfru", {"weight": 0.5})
    assert isinstance(policy, CachePolicy)
    field = LFRUPolicy.Options.model_fields["weight"]
    assert field.default == 4.0 and field.description
    with pytest.raises((PluginError, ValidationError)):
        registry.create("cache_policy", "lfru", {"weight": -1.0})


def test_a_paged_tier_with_lfru_is_exact(tiny):
    import mlx_lm

    path = tiny("qwen3_moe")
    model, tokenizer = mlx_lm.load(str(path))
    expected = [r.token for r in mlx_lm.stream_generate(model, tokenizer, "def f(", max_tokens=8)]
    runtime = outlier_runtime.load("plus", model=str(path), k_override=4, cache_gb=0.002, cache_policy="lfru",
                                   cache_policy_options={"weight": 2.0}, force=True)
    try:
        result = runtime.generate("def f(", max_tokens=8, temperature=0.0, chat=False)
        assert result.tokens == expected
        assert result.engine["config"]["cache_policy"] == "lfru"
        assert result.engine["total"]["evictions"] > 0  # the policy chose victims
    finally:
        runtime.close()
