"""Soak: thousands of tokens through the paged engine with a small cache.

Not in the default run (it is marked ``soak``); run it with ``python -m pytest -m soak -s``.
RSS after warm-up must stay flat and the accounting consistent; the figures are printed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import outlier_runtime
from outlier_runtime.core.system import current_rss_bytes

TOTAL_TOKENS = 2000
PER_REQUEST = 100
#: Allowed RSS growth per generated token after warm-up (KV caches are freed per request).
MAX_SLOPE_BYTES_PER_TOKEN = 1024


@pytest.mark.soak
def test_soak_rss_flat_and_accounting_consistent(tiny):
    path = tiny("qwen3_5_moe", seed=11)
    runtime = outlier_runtime.load("plus", model=str(path), k_override=4, cache_gb=0.0015, force=True)
    tokens, samples = 0, []
    try:
        request = 0
        while tokens < TOTAL_TOKENS:
            result = runtime.generate("import os\n\ndef ", max_tokens=PER_REQUEST, temperature=1.0,
                                      seed=request, chat=False)
            request += 1
            tokens += result.generation_tokens
            total = result.engine["total"]
            assert total["lookups"] == total["slot_hits"] + total["ram_hits"] + total["misses"]
            assert total["bytes_read"] == total["misses"] * result.engine["config"]["expert_bytes"]
            assert total["ram_cache_bytes"] <= result.engine["config"]["ram_cache_budget_bytes"]
            samples.append((tokens, current_rss_bytes()))
    finally:
        runtime.close()
    warm = samples[len(samples) // 4:]
    x = np.array([t for t, _ in warm], dtype=float)
    y = np.array([r for _, r in warm], dtype=float)
    slope = float(np.polyfit(x, y, 1)[0])
    print(json.dumps({"tokens": tokens, "requests": request, "rss_slope_bytes_per_token": slope,
                      "rss_first_mb": samples[0][1] / 1e6, "rss_last_mb": samples[-1][1] / 1e6}))
    assert tokens >= TOTAL_TOKENS
    assert slope < MAX_SLOPE_BYTES_PER_TOKEN
