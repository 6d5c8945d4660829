"""Several tiers kept loaded in the server (serve/tier_pool.py), and the prompt cache as a line of
the memory plan: two tiny tiers (nano: a tiny dense llama; plus: the embedded demo MoE, paged)
under forced memory budgets."""

from __future__ import annotations

import httpx
import pytest

import outlier_runtime
from outlier_runtime.core.catalog import resolve_tier
from outlier_runtime.core.memory import GB, PlanLine
from outlier_runtime.core.plugin_manager import get_registry
from outlier_runtime.serve.openai_api import ApiError
from outlier_runtime.serve.tier_pool import TierPool, tier_bytes

from helpers import running_server
from outlier_paged_moe.memory import ExpertLayout, plan_paged
from outlier_paged_moe.options import PagedMoEOptions

PROMPT_CACHE = PlanLine("prompt cache", 1_000_000, "--prompt-cache-gb")


@pytest.fixture
def overrides(tiny):
    per_tier = {"nano": {"model": str(tiny("llama"))}, "lite": {"model": str(tiny("qwen3"))},
                "plus": {"model": "embedded:demo-moe", "k_override": 4, "cache_gb": 0.002}}
    return lambda tier: per_tier[tier]


@pytest.fixture
def footprints(overrides):
    return {tier: tier_bytes(resolve_tier(tier, get_registry(), overrides(tier)))[0]
            for tier in ("nano", "lite", "plus")}


def _pool(overrides, budget: int, loads: list[str], reserved=(PROMPT_CACHE,)) -> TierPool:
    def load(tier: str):
        loads.append(tier)
        return outlier_runtime.load(tier, force=True, reserve=list(reserved), **overrides(tier))

    return TierPool(load, lambda tier: tier_bytes(resolve_tier(tier, get_registry(), overrides(tier))), budget, 0,
                    list(reserved))


def _generate(runtime) -> str:
    return runtime.generate("def f(x):", chat=False, max_tokens=3, temperature=0).text


def test_tiers_that_fit_together_stay_loaded_when_switching(overrides, footprints):
    loads: list[str] = []
    pool = _pool(overrides, PROMPT_CACHE.bytes + footprints["nano"] + footprints["plus"], loads)
    nano = pool.acquire("nano")
    text = _generate(nano)
    plus = pool.acquire("plus")
    _generate(plus)
    assert pool.acquire("nano") is nano and _generate(nano) == text  # not closed, not loaded again
    assert loads == ["nano", "plus"] and pool.loaded == ["plus", "nano"]
    plan = pool.plan()
    assert [line.name for line in plan.lines] == ["prompt cache", "tier plus", "tier nano"] and plan.fits
    # The paged tier counts its own memory plan, without the prompt-cache line it was planned beside.
    assert plan.lines[1].bytes == plus.memory_plan.total_bytes - PROMPT_CACHE.bytes
    assert "prompt cache" in [line.name for line in plus.memory_plan.lines]
    pool.close()


def test_the_least_recently_used_idle_tier_is_unloaded_first(overrides, footprints):
    loads: list[str] = []
    # Room for the prompt cache and two tiers, not three.
    budget = PROMPT_CACHE.bytes + sum(sorted(footprints.values())[1:])
    assert budget < PROMPT_CACHE.bytes + sum(footprints.values())
    pool = _pool(overrides, budget, loads)
    nano, lite = pool.acquire("nano"), pool.acquire("lite")
    pool.acquire("nano")  # nano is now the most recently used: lite goes first
    pool.acquire("plus")
    assert "lite" not in pool.loaded and "nano" in pool.loaded and "plus" in pool.loaded
    with pytest.raises(outlier_runtime.RuntimeClosedError):
        _generate(lite)  # closed when unloaded
    _generate(nano)
    pool.close()


def test_a_tier_serving_a_request_is_never_unloaded_under_it(overrides, footprints):
    loads: list[str] = []
    pool = _pool(overrides, PROMPT_CACHE.bytes + max(footprints["nano"], footprints["plus"]), loads)  # one tier
    job = object()
    nano = pool.acquire("nano", user=job)
    with pytest.raises(ApiError) as refused:
        pool.acquire("plus")
    assert refused.value.status == 503 and refused.value.code == "tier_busy" and "nano" in refused.value.message
    assert pool.loaded == ["nano"] and _generate(nano)  # still loaded and working
    pool.release(job)
    plus = pool.acquire("plus")  # idle now: unloaded to make room
    assert pool.loaded == ["plus"] and _generate(plus) and loads == ["nano", "plus"]
    pool.close()


def test_the_prompt_cache_budget_is_a_line_admission_counts(overrides, footprints):
    # Two tiers fit the budget alone, but not beside a prompt cache as large as the room left.
    both = footprints["nano"] + footprints["plus"]
    big_cache = PlanLine("prompt cache", footprints["nano"], "--prompt-cache-gb")
    pool = _pool(overrides, both + 1000, [], reserved=(big_cache,))
    pool.acquire("nano")
    pool.acquire("plus")
    assert pool.loaded == ["plus"]  # nano had to go: the prompt cache's budget is counted
    assert not pool.plan(("nano", footprints["nano"], "")).fits
    pool.close()


def test_a_paged_plan_counts_reserved_lines_and_auto_leaves_room_for_them():
    layout = ExpertLayout([64] * 4, [1 << 20] * 4, [1 << 20] * 4)
    options = PagedMoEOptions(k_override=8, cache_gb="auto")
    alone = plan_paged(options, layout, GB, GB // 2, 4096, int(2.6 * GB), GB)
    beside = plan_paged(options, layout, GB, GB // 2, 4096, int(2.6 * GB), GB,
                        reserved=[PlanLine("prompt cache", 50_000_000, "--prompt-cache-gb")])
    assert beside.cache_bytes == alone.cache_bytes - 50_000_000
    assert beside.plan.lines[-1] == PlanLine("prompt cache", 50_000_000, "--prompt-cache-gb")
    assert beside.plan.total_bytes == alone.plan.total_bytes and "- 0.05 GB prompt cache" in beside.plan.notes[0]
    fixed = PagedMoEOptions(k_override=8, cache_gb=0.05)
    tight = plan_paged(fixed, layout, GB, GB // 2, 4096, int(2.6 * GB), GB,
                       reserved=[PlanLine("prompt cache", GB, "--prompt-cache-gb")])
    assert not tight.plan.fits  # the same tier fits alone; not beside a 1 GB prompt cache


def test_a_paged_tier_that_fits_alone_is_refused_beside_a_prompt_cache_that_does_not():
    with outlier_runtime.load("plus", model="embedded:demo-moe", k_override=4, cache_gb=0.002) as runtime:
        assert runtime.memory_plan.fits
    huge = PlanLine("prompt cache", 10**15, "--prompt-cache-gb")
    with pytest.raises(outlier_runtime.AdmissionError, match="does not fit"):
        outlier_runtime.load("plus", model="embedded:demo-moe", k_override=4, cache_gb=0.002, reserve=[huge])


def test_the_server_keeps_one_tier_under_a_budget_for_one(tiny, tmp_path_factory, footprints):
    home = tmp_path_factory.mktemp("serve-pool")
    budget_gb = (max(footprints["nano"], footprints["plus"]) + 1000) / GB
    args = ["--memory-gb", f"{budget_gb:.9f}", "--prompt-cache-gb", "0",
            "--tier-override", "plus=embedded:demo-moe", "--tier-override", "plus.paging.cache_gb=0.002",
            "--tier-override", "plus.paging.k_override=4"]
    key = {"Authorization": "Bearer pool-key"}
    with running_server(tiny, home, "pool-key", 128, extra_args=args) as (process, base_url, log_path):
        def complete(model: str) -> None:
            body = {"model": model, "prompt": "def f(x):", "max_tokens": 2, "temperature": 0}
            assert httpx.post(f"{base_url}/completions", json=body, headers=key, timeout=60).status_code == 200

        def loaded() -> list[str]:
            health = httpx.get(f"{base_url.removesuffix('/v1')}/health", headers=key, timeout=10)
            return health.json()["loaded_models"]

        complete("outlier-nano")
        complete("outlier-plus")
        assert loaded() == ["outlier-plus"]
        complete("outlier-nano")
        assert loaded() == ["outlier-nano"]
        stats = httpx.get(f"{base_url}/outlier/stats", headers=key, timeout=10).json()
        assert [line["name"] for line in stats["memory_plan"]["lines"]] == ["tier nano"]


def test_a_served_pipeline_switches_tiers_only_through_its_leader():
    """Closing a pipeline tier is a collective: the pool must never close one on rank 0 alone,
    before the leader has told the followers to switch (they would wait in another collective)."""
    from outlier_runtime.serve.model_host import ModelHost

    events = []

    class Runtime:
        memory_plan = None

        def __init__(self, name):
            self.name = name

        def close(self):
            events.append(f"close {self.name}")

    class Leader:
        def switch(self, tier, unload):
            events.append(f"send load {tier}")
            unload()
            return Runtime(tier)

    host = ModelHost(pipeline=Leader(), memory_bytes=10)
    host.tiers.acquire("a")
    host.tiers.acquire("b")
    assert events == ["send load a", "send load b", "close a"]
    assert host.tiers.loaded == ["b"]
