"""Memory is bounded: with experts 10x larger than cache_gb, peak RSS stays near the bound."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: What a paged process may hold beyond non-expert weights and cache_gb: the mlx allocator's
#: cached blocks, one step's read buffers, KV cache and activations, the tokenizer.
FIXED_OVERHEAD_BYTES = 120_000_000

PROBE = r"""
import json, sys
import mlx_lm, outlier_runtime
from outlier_runtime.core.system import current_rss_bytes, peak_rss_bytes
path, cache_gb = sys.argv[1], float(sys.argv[2])
mlx_lm.load  # imports done; what follows is the cost of the model and the engine
baseline = current_rss_bytes()
runtime = outlier_runtime.load("plus", model=path, k_override=4, cache_gb=cache_gb, force=True)
result = runtime.generate("import os\n\ndef walk(path):\n    for name in os.listdir(path):\n",
                          max_tokens=16, temperature=0.0, chat=False)
print(json.dumps({"baseline": baseline, "peak": peak_rss_bytes(), "engine": result.engine,
                  "tokens": result.generation_tokens}))
"""


@pytest.fixture(scope="module")
def big_moe(tiny):
    # ~250 MB of experts: materializing them whole would blow the bound below by far.
    return tiny("qwen3_moe", hidden_size=512, num_experts=128, top_k=4, num_layers=4,
                moe_intermediate_size=512, seed=7)


def _probe(path, cache_gb):
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(cache_gb)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_rss_stays_under_non_experts_plus_cache_plus_overhead(big_moe):
    probe = _probe(big_moe, 0.0)
    config = probe["engine"]["config"]
    cache_gb = config["total_expert_bytes"] / 10 / 1e9
    report = _probe(big_moe, cache_gb)
    config = report["engine"]["config"]
    assert config["total_expert_bytes"] >= 10 * cache_gb * 1e9
    bound = report["baseline"] + config["non_expert_bytes"] + cache_gb * 1e9 + FIXED_OVERHEAD_BYTES
    assert report["peak"] <= bound, (report["peak"] - report["baseline"]) / 1e6
    # Reading the stacked tensors whole would cost more than the whole allowance.
    assert config["total_expert_bytes"] > cache_gb * 1e9 + FIXED_OVERHEAD_BYTES


def test_bytes_read_are_whole_experts_and_match_misses(big_moe):
    report = _probe(big_moe, 0.01)
    total, config = report["engine"]["total"], report["engine"]["config"]
    assert total["misses"] > 0
    assert total["bytes_read"] == total["misses"] * config["expert_bytes"]
    per_layer = sum(row["bytes_read"] for row in report["engine"]["layers"])
    assert per_layer == total["bytes_read"]
    assert total["lookups"] == total["slot_hits"] + total["ram_hits"] + total["misses"]
