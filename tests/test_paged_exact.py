"""The paged engine is exact: same logits (max abs diff 0) and same greedy tokens as stock mlx-lm."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import mlx_lm
import pytest

import outlier_runtime
from outlier_runtime.engine.experts import find_switch_modules, set_experts_per_token

PROMPT = "import os\n\ndef walk(path):\n    for name in os.listdir(path):\n"
SHORT_PROMPT = "def f("
NEW_TOKENS = 12
MOE_ARCHS = ["qwen3_5_moe", "qwen3_moe", "mixtral", "gpt_oss"]


def _stock(path):
    model, tokenizer = mlx_lm.load(str(path))
    return model, tokenizer


def _greedy_tokens(model, tokenizer, prompt, n=NEW_TOKENS):
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=n)]


def _top_k(model):
    return find_switch_modules(model)[0]


def _geometry(model):
    site = find_switch_modules(model)[0]
    experts = site.module.up_proj.weight.shape[0] if hasattr(site.module, "up_proj") else site.module.fc1.weight.shape[0]
    for name in ("top_k", "num_experts_per_tok"):
        if isinstance(getattr(site.block, name, None), int):
            return experts, getattr(site.block, name)
    raise AssertionError("no top-k attribute")


def _expert_gb(runtime):
    return runtime.engine_stats()["config"]["total_expert_bytes"] / 1e9


@pytest.fixture(scope="module", params=MOE_ARCHS)
def reference(request, tiny):
    path = tiny(request.param)
    model, tokenizer = _stock(path)
    ids = mx.array(tokenizer.encode(PROMPT))[None]
    short = mx.array(tokenizer.encode(SHORT_PROMPT))[None]
    experts, top_k = _geometry(model)
    # A prompt this long makes mlx-lm sort token-expert pairs (its prefill path).
    assert ids.size * top_k >= 64 and short.size * top_k < 64
    return {
        "arch": request.param,
        "path": path,
        "ids": ids,
        "short": short,
        "logits": model(ids),
        "short_logits": model(short),
        "tokens": _greedy_tokens(model, tokenizer, PROMPT),
        "experts": experts,
        "top_k": top_k,
    }


@pytest.mark.parametrize("slots", ["1", "2", "top_k", "all"])
@pytest.mark.parametrize("cache", ["zero", "some", "everything"])
def test_paged_matches_stock_bit_for_bit(reference, slots, cache):
    k = {"1": 1, "2": 2, "top_k": reference["top_k"], "all": reference["experts"]}[slots]
    probe = outlier_runtime.load("plus", model=str(reference["path"]), k_override=1, cache_gb=0, force=True)
    total_gb = _expert_gb(probe)
    probe.close()
    cache_gb = {"zero": 0.0, "some": total_gb / 3, "everything": total_gb * 2}[cache]
    runtime = outlier_runtime.load("plus", model=str(reference["path"]), k_override=k, cache_gb=cache_gb, force=True)
    try:
        assert mx.array_equal(runtime.model(reference["ids"]), reference["logits"]).item()
        assert mx.array_equal(runtime.model(reference["short"]), reference["short_logits"]).item()
        result = runtime.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, chat=False)
        assert result.tokens == reference["tokens"]
        total = result.engine["total"]
        config = result.engine["config"]
        if config["slots_per_layer"] == reference["experts"]:
            # A slot per expert: filled by the first call, then the original module, no lookups.
            assert total["resident_calls"] == total["calls"] > 0
            assert total["lookups"] == total["host_syncs"] == 0
        else:
            assert total["lookups"] == total["slot_hits"] + total["ram_hits"] + total["misses"] > 0
            assert total["resident_calls"] == 0
        held = total["slot_resident_bytes"] + total["ram_cache_bytes"]
        if cache == "everything":
            assert config["slots_per_layer"] == min(k, reference["experts"])
        else:
            # Everything held stays within cache_gb, except the floor of one slot per layer.
            floor = config["moe_layers"] * config["expert_bytes"]
            assert held <= max(cache_gb * 1e9, floor)
    finally:
        runtime.close()


def test_experts_per_token_override_changes_routing_like_stock(tiny):
    path = tiny("qwen3_moe")
    model, tokenizer = _stock(path)
    for site in find_switch_modules(model):
        set_experts_per_token(site, 1)
    ids = mx.array(tokenizer.encode(PROMPT))[None]
    expected = model(ids)
    runtime = outlier_runtime.load("plus", model=str(path), k_override=2, cache_gb=0.001,
                                   experts_per_token=1, force=True)
    try:
        assert mx.array_equal(runtime.model(ids), expected).item()
    finally:
        runtime.close()


def test_sharded_checkpoint_is_exact(tiny):
    # Small shards split a layer's expert tensors across files and add an index json.
    path = tiny("qwen3_5_moe", max_shard_bytes=200_000, seed=3)
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 2
    model, tokenizer = _stock(path)
    ids = mx.array(tokenizer.encode(PROMPT))[None]
    runtime = outlier_runtime.load("plus", model=str(path), k_override=3, cache_gb=0.0005, force=True)
    try:
        assert mx.array_equal(runtime.model(ids), model(ids)).item()
        assert runtime.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, chat=False).tokens == \
            _greedy_tokens(model, tokenizer, PROMPT)
    finally:
        runtime.close()


@pytest.mark.parametrize("reader", ["pread", "mmap"])
def test_each_reader_is_exact(tiny, reader):
    path = tiny("qwen3_moe")
    model, tokenizer = _stock(path)
    ids = mx.array(tokenizer.encode(PROMPT))[None]
    runtime = outlier_runtime.load("plus", model=str(path), k_override=2, cache_gb=0, reader=reader, force=True)
    try:
        assert mx.array_equal(runtime.model(ids), model(ids)).item()
        assert runtime.engine_stats()["config"]["reader"] == reader
    finally:
        runtime.close()


def test_prefill_reads_each_distinct_expert_once_per_layer(tiny):
    from outlier_runtime.bench.routing import recording_routes

    path = tiny("qwen3_moe", num_experts=16, top_k=4)
    model, tokenizer = _stock(path)
    ids = mx.array(tokenizer.encode(PROMPT * 3))[None]
    modules = [site.module for site in find_switch_modules(model)]
    with recording_routes(modules) as records:
        mx.eval(model(ids))
    distinct = [len({int(e) for e in np.asarray(r[0]).reshape(-1)}) for r in records]
    # Two slots for up to 16 distinct experts: the prefill runs in passes, each expert read once.
    runtime = outlier_runtime.load("plus", model=str(path), k_override=2, cache_gb=0, force=True)
    try:
        mx.eval(runtime.model(ids))
        layers = runtime.engine_stats()["layers"]
        assert [row["misses"] for row in layers] == distinct
        assert all(row["passes"] > 1 for row in layers)
    finally:
        runtime.close()
