"""The built-in ``lrfu`` policy: evicts the lowest use count, each use decaying with a half-life."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from outlier_cache_lrfu import LRFUPolicy
from pydantic import ValidationError

import outlier_runtime
from outlier_runtime.core.errors import PluginError
from outlier_runtime.core.plugin_manager import get_registry
from outlier_runtime.core.protocols import CachePolicy


def _used(policy, *keys):
    for key in keys:
        policy.accessed(key)
    return policy


def test_the_count_halves_every_half_life_accesses():
    policy = _used(LRFUPolicy(half_life=2.0), (0, 1), (0, 1), (0, 2), (0, 3))
    # (0, 1): used at t=0 and t=1 -> 1 + 2^-0.5 at t=1; (0, 3): 1 at t=3.
    assert policy.score((0, 1)) == pytest.approx(math.log2(1 + 2 ** -0.5) + 1 / 2)
    assert policy.score((0, 3)) == pytest.approx(0 + 3 / 2)
    # Seen from t=3, (0, 1) counts (1 + 2^-0.5) x 2^-1 = 0.85 < 1: it is the stalest.
    assert policy.choose_victim({(0, 1), (0, 3)}) == (0, 1)


def test_a_frequent_expert_survives_a_burst_while_its_uses_are_recent():
    policy = _used(LRFUPolicy(half_life=100.0), *[(0, 1)] * 5, (0, 2), (0, 3))
    assert policy.choose_victim({(0, 1), (0, 2), (0, 3)}) == (0, 2)


def test_popularity_long_ago_fades():
    # Five uses of (0, 1), then 40 accesses elsewhere: with a half-life of 10 they are worth 5/16 < 1.
    policy = _used(LRFUPolicy(half_life=10.0), *[(0, 1)] * 5, *[(0, 3)] * 39, (0, 2))
    assert policy.choose_victim({(0, 1), (0, 2)}) == (0, 1)


def test_a_short_half_life_is_lru_and_a_long_one_is_lfu():
    keys = [(0, 1), (0, 1), (0, 1), (0, 2), (0, 3)]
    assert _used(LRFUPolicy(half_life=0.01), *keys).choose_victim({(0, 1), (0, 2), (0, 3)}) == (0, 1)  # LRU
    assert _used(LRFUPolicy(half_life=1e6), *keys).choose_victim({(0, 1), (0, 2), (0, 3)}) == (0, 2)  # LFU


def test_a_never_seen_candidate_goes_first_and_eviction_keeps_the_history():
    policy = _used(LRFUPolicy(), (0, 1), (0, 1), (0, 2))
    assert policy.choose_victim({(0, 1), (0, 9), (0, 2)}) == (0, 9)
    policy.evicted((0, 1))
    policy.accessed((0, 3))
    assert policy.choose_victim({(0, 1), (0, 2), (0, 3)}) == (0, 2)  # (0, 1) came back with its uses


@given(uses=st.lists(st.integers(0, 7), max_size=60),
       candidates=st.sets(st.integers(0, 9), min_size=1), half_life=st.floats(0.01, 1e6))
def test_the_victim_is_always_one_of_the_candidates(uses, candidates, half_life):
    policy = _used(LRFUPolicy(half_life=half_life), *[(0, e) for e in uses])
    offered = {(0, e) for e in candidates}
    assert policy.choose_victim(offered) in offered


def test_lrfu_is_a_registered_builtin_with_a_described_half_life_option():
    registry = get_registry()
    assert "lrfu" in registry.names("cache_policy")
    assert isinstance(registry.create("cache_policy", "lrfu", {"half_life": 50}), CachePolicy)
    field = LRFUPolicy.Options.model_fields["half_life"]
    assert field.default == 100.0 and field.description
    with pytest.raises((PluginError, ValidationError)):
        registry.create("cache_policy", "lrfu", {"half_life": 0})


def test_a_paged_tier_with_lrfu_is_exact(tiny):
    import mlx_lm

    path = tiny("qwen3_moe")
    model, tokenizer = mlx_lm.load(str(path))
    expected = [r.token for r in mlx_lm.stream_generate(model, tokenizer, "def f(", max_tokens=8)]
    runtime = outlier_runtime.load("plus", model=str(path), k_override=4, cache_gb=0.002, cache_policy="lrfu",
                                   cache_policy_options={"half_life": 20.0}, force=True)
    try:
        result = runtime.generate("def f(", max_tokens=8, temperature=0.0, chat=False)
        assert result.tokens == expected
        assert result.engine["config"]["cache_policy"] == "lrfu"
        assert result.engine["total"]["evictions"] > 0  # the policy chose victims
    finally:
        runtime.close()
