"""One host sync per MoE layer call, prefetcher on or off; routers returning tuples are handled."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_slots_hold_true_experts, paged_store
from outlier_paged_moe.lookahead import NextLayerLookahead
from outlier_paged_moe.stats import LayerStats
from outlier_prefetch import NextLayerRouterPrefetcher

import outlier_runtime
from outlier_runtime.cli import main


@pytest.mark.parametrize("prefetcher", [None, "next-layer-router"])
def test_decode_makes_one_host_sync_per_moe_layer_call(tiny, prefetcher):
    path = tiny("qwen3_moe")  # top-4 of 16 experts, 2 MoE layers
    runtime = outlier_runtime.load("plus", model=str(path), k_override=4, cache_gb=0.01,
                                   prefetcher=prefetcher, force=True)
    try:
        # A one-token prompt: every call needs top-k = 4 experts, which fit the 4 slots (no passes).
        result = runtime.generate("x", max_tokens=6, temperature=0.0, chat=False)
        assert result.prompt_tokens == 1
        total = result.engine["total"]
        assert total["calls"] >= 2 * 6 and total["passes"] == 0
        assert total["host_syncs"] == total["calls"] and total["host_syncs_per_call"] == 1.0
        if prefetcher:
            assert total["prefetched"] > 0  # the guesses were read, in the same syncs
    finally:
        runtime.close()


@pytest.mark.parametrize("prefetcher", [None, "next-layer-router"])
def test_a_layer_holding_every_expert_runs_the_original_module_without_syncs(tiny, prefetcher):
    path = tiny("qwen3_moe")  # 16 experts, top-4, 2 MoE layers
    model, tokenizer = mlx_lm.load(str(path))
    ids = mx.array(tokenizer.encode("def walk(path):\n    for name in"))[None]
    expected_logits = model(ids)
    expected_tokens = [r.token for r in mlx_lm.stream_generate(model, tokenizer, "x", max_tokens=8)]
    runtime = outlier_runtime.load("plus", model=str(path), k_override=16, cache_gb=1.0,
                                   prefetcher=prefetcher, force=True)
    try:
        # The first call of each layer reads all of it, expert e into slot e: honest misses.
        assert mx.array_equal(runtime.model(ids), expected_logits).item()
        store = paged_store(runtime)
        for slots in store.layers:
            assert slots.expert_in_slot == list(range(16))
        assert_slots_hold_true_experts(runtime)
        warm = runtime.engine_stats()["total"]
        assert warm["misses"] == 2 * 16 and warm["slot_hits"] == 0 and warm["host_syncs"] == 0
        # After warm-up: no sync, no lookup, no read; the tokens are stock's.
        result = runtime.generate("x", max_tokens=8, temperature=0.0, chat=False)
        assert result.tokens == expected_tokens
        total = result.engine["total"]
        assert total["calls"] >= 2 * 8 and total["resident_calls"] == total["calls"]
        assert total["host_syncs"] == 0 and total["host_syncs_per_call"] == 0.0
        assert total["lookups"] == total["bytes_read"] == total["prefetched"] == 0
    finally:
        runtime.close()


def test_a_layer_with_fewer_slots_than_experts_still_pages(tiny):
    path = tiny("qwen3_moe")
    runtime = outlier_runtime.load("plus", model=str(path), k_override=15, cache_gb=1.0, force=True)
    try:
        total = runtime.generate("x", max_tokens=4, temperature=0.0, chat=False).engine["total"]
        assert total["resident_calls"] == 0 and total["host_syncs"] == total["calls"] > 0
    finally:
        runtime.close()


class _Store:
    def __init__(self):
        self.stats = [LayerStats(), LayerStats()]
        self.prefetched = []

    def prefetch(self, layer, experts):
        self.prefetched.append((layer, list(experts)))


class _PredictOnly:
    def predict(self, layer, hidden, next_block):
        return [3, 1]


def test_a_predict_only_prefetcher_costs_a_counted_sync():
    store = _Store()
    lookahead = NextLayerLookahead(store, _PredictOnly(), 0, object())
    assert lookahead.guess(mx.zeros((1, 4))) is None
    lookahead.start(mx.zeros((1, 4)), None)
    assert store.prefetched == [(1, [3, 1])]
    assert store.stats[0].host_syncs == 1


def test_a_guess_is_read_with_the_routed_ids_and_costs_no_sync():
    store = _Store()
    block = _LinearBlock(experts=8, top_k=2)
    lookahead = NextLayerLookahead(store, NextLayerRouterPrefetcher(), 0, block)
    hidden = mx.ones((1, 1, 4))
    guess = lookahead.guess(hidden)
    assert isinstance(guess, mx.array)
    lookahead.start(hidden, np.asarray(guess))
    assert store.stats[0].host_syncs == 0
    (layer, experts), = store.prefetched
    assert layer == 1 and len(experts) == 2 and set(experts) <= set(range(8))


class _LinearBlock(nn.Module):
    def __init__(self, experts, top_k):
        super().__init__()
        self.gate = nn.Linear(4, experts, bias=False)
        self.top_k = top_k


class _TupleGateBlock(nn.Module):
    """DeepSeek-V3 / GLM4-MoE style: the gate returns (expert ids, weights), already top-k."""

    def __init__(self, ids):
        super().__init__()
        self.ids = ids

    def gate(self, x):
        return mx.array(self.ids, dtype=mx.uint32)[None], mx.ones((1, len(self.ids)))


def test_router_returning_a_tuple_gives_its_ids():
    prefetcher = NextLayerRouterPrefetcher(extra=2)
    hidden = mx.ones((1, 1, 4))
    assert sorted(prefetcher.predict(0, hidden, _TupleGateBlock([5, 2, 9]))) == [2, 5, 9]
    assert np.asarray(prefetcher.guess(0, hidden, _TupleGateBlock([7]))).tolist() == [7]


def test_router_returning_a_tuple_of_floats_is_no_guess():
    class FloatTuple(nn.Module):
        def gate(self, x):
            return mx.ones((1, 4)), mx.ones((1, 4))

    assert NextLayerRouterPrefetcher().predict(0, mx.ones((1, 1, 4)), FloatTuple()) == []


def test_linear_router_guess_has_top_k_plus_extra_per_token():
    block = _LinearBlock(experts=8, top_k=2)
    guess = NextLayerRouterPrefetcher(extra=1).guess(0, mx.ones((1, 1, 4)), block)
    assert guess.shape == (3,)
    logits = block.gate(mx.ones((1, 4)))[0]
    assert set(np.asarray(guess).tolist()) == set(np.argsort(-np.asarray(logits))[:3].tolist())


def test_run_stats_show_host_syncs(tiny):
    path = tiny("qwen3_moe")
    result = CliRunner().invoke(main, ["run", "plus", "x", "--model", str(path), "--k-override", "4",
                                       "--cache-gb", "0.01", "--prefetcher", "next-layer-router",
                                       "--max-tokens", "3", "--raw", "--stats", "--force"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stderr.splitlines() if line.startswith("-- host syncs"))
    syncs, calls = int(line.split()[3]), int(line.split()[5])
    assert syncs == calls > 0 and line.endswith("(1.00 per call)")


def test_run_stats_count_calls_on_fully_resident_layers(tiny):
    path = tiny("qwen3_moe")  # 16 experts: 16 slots hold them all
    result = CliRunner().invoke(main, ["run", "plus", "x", "--model", str(path), "--k-override", "16",
                                       "--cache-gb", "1", "--max-tokens", "3", "--raw", "--stats", "--force"])
    assert result.exit_code == 0, result.output
    syncs = next(line for line in result.stderr.splitlines() if line.startswith("-- host syncs"))
    resident = next(line for line in result.stderr.splitlines() if "layers holding every expert" in line)
    assert syncs.startswith("-- host syncs 0 over ") and int(resident.split()[1]) == int(syncs.split()[5]) > 0
