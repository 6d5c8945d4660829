"""The routing report: run held-out text through the shipped demo MoE and check what it says."""

from __future__ import annotations

import sys

import itertools
import json
from functools import lru_cache

import numpy as np
import pytest

from outlier_runtime.embedded import demo_moe_path
from outlier_runtime.core.plugin_manager import get_registry
from outlier_runtime.engine.experts import find_switch_modules
from outlier_runtime.bench.routing import (
    RoutingReportError,
    recording_routes,
    routing_report,
    simulate_belady,
    simulate_policy,
)

FRACTIONS = (0.05, 0.10, 0.25, 0.50, 0.75)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("routing")


@pytest.fixture(scope="module")
def report(report_dir):
    return routing_report(demo_moe_path(), report_dir, max_tokens=256, fractions=FRACTIONS)


def test_finds_every_moe_layer_by_type(report):
    assert report["moe_layers"] == 6
    assert (report["num_experts"], report["top_k"]) == (64, 4)
    assert all(".switch_mlp" in layer["module"] for layer in report["layers"])


def test_histograms_count_every_routed_expert(report):
    assert report["tokens"] > 200  # 8 held-out files, up to 32 tokens each
    for layer in report["layers"]:
        assert len(layer["histogram"]) == layer["num_experts"]
        assert sum(layer["histogram"]) == layer["tokens"] * layer["top_k"]


def test_consecutive_tokens_share_experts_more_than_chance(report):
    overlaps = [layer["mean_consecutive_overlap"] for layer in report["layers"]]
    assert all(0.0 <= o <= 1.0 for o in overlaps)
    # Routing locality is what makes paging pay: a trained router reuses experts.
    assert report["summary"]["mean_consecutive_overlap"] > 1.5 * report["summary"]["random_routing_overlap"]


def test_by_default_every_registered_policy_is_simulated(report):
    simulated = report["provenance"]["config"]["policies"]
    assert {"lru", "lfu", "lfru"} <= set(simulated)
    assert set(simulated) <= set(get_registry().names("cache_policy"))
    assert set(report["summary"]["hit_rate"]) == set(simulated) | {"belady"}


def test_a_policy_that_needs_options_is_left_out_of_the_default():
    from pydantic import Field

    from outlier_runtime import PluginOptions, hookimpl
    from outlier_runtime.bench.routing import default_policies
    from outlier_runtime.core.plugin_manager import register_plugin, unregister_plugin

    class NeedsOptions:
        class Options(PluginOptions):
            window: int = Field(description="No default: must be set.")

        def __init__(self, window):
            self.window = window

    class Plugin:
        @hookimpl
        def register_cache_policies(self, register):
            register("needs-options", NeedsOptions, "Needs a window.")

    register_plugin(Plugin(), "needs-options")
    try:
        assert "needs-options" in get_registry().names("cache_policy")
        assert "needs-options" not in default_policies()
        assert "lfru" in default_policies()
    finally:
        unregister_plugin("needs-options")


def test_belady_bounds_every_policy_at_every_size(report):
    for layer in report["layers"]:
        rates = layer["hit_rate"]
        for policy in set(rates) - {"belady"}:
            for i, _ in enumerate(FRACTIONS):
                assert rates["belady"][i] >= rates[policy][i] >= 0.0, policy
            assert rates["belady"][i] <= 1.0
        # More cache never hurts the optimum (nor LRU, a stack algorithm).
        assert rates["belady"] == sorted(rates["belady"])
        assert rates["lru"] == sorted(rates["lru"])
        assert layer["capacities"][0] == layer["top_k"]  # 5% of 64 is below top_k: clamped


def test_writes_json_and_plots(report, report_dir):
    on_disk = json.loads((report_dir / "routing.json").read_text())
    assert on_disk["summary"] == report["summary"]
    for name in report["plots"]:
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recording_leaves_the_model_as_it_was():
    from mlx_lm import load

    model, _ = load(str(demo_moe_path()))
    modules = [site.module for site in find_switch_modules(model)]
    classes = [type(m) for m in modules]
    with recording_routes(modules) as records:
        assert all(type(m).__name__.startswith("Recording") for m in modules)
    assert [type(m) for m in modules] == classes
    assert records == [[] for _ in modules]


# --- the cache simulation on traces small enough to check by hand or by brute force ---

def brute_force_optimum(routes: np.ndarray, capacity: int) -> float:
    """Best hit rate over every eviction choice (a token's own experts stay)."""
    rows = [tuple(r) for r in routes.tolist()]

    @lru_cache(maxsize=None)
    def best(t: int, cached: frozenset) -> int:
        if t == len(rows):
            return 0
        needed = frozenset(rows[t])
        hits = len(needed & cached)
        overflow = len(cached | needed) - capacity
        evictable = sorted(cached - needed)
        options = itertools.combinations(evictable, overflow) if overflow > 0 else [()]
        return hits + max(best(t + 1, (cached | needed) - frozenset(out)) for out in options)

    return best(0, frozenset()) / routes.size


def test_belady_is_optimal_on_small_traces():
    rng = np.random.default_rng(0)
    lru = lambda: get_registry().create("cache_policy", "lru")  # noqa: E731
    for _ in range(20):
        routes = np.stack([rng.choice(6, size=2, replace=False) for _ in range(9)])
        for capacity in (2, 3, 4):
            optimum = brute_force_optimum(routes, capacity)
            assert simulate_belady(routes, capacity, 6) == pytest.approx(optimum)
            assert simulate_policy(routes, capacity, lru()) <= optimum + 1e-12


def test_lru_on_a_hand_checked_trace():
    # capacity 2, top-1: a b a c b -> miss miss hit miss(evicts b) miss(evicts a) = 1 hit of 5
    routes = np.array([[0], [1], [0], [2], [1]])
    assert simulate_policy(routes, 2, get_registry().create("cache_policy", "lru")) == pytest.approx(1 / 5)
    assert simulate_belady(routes, 2, 3) == pytest.approx(2 / 5)  # evicts a at c: b hits


def test_capacity_below_top_k_is_refused():
    routes = np.array([[0, 1, 2, 3]])
    with pytest.raises(RoutingReportError, match="below top_k"):
        simulate_belady(routes, 3, 4)


def test_plots_without_matplotlib_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from outlier_runtime.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a missing package looks like to import
    result = CliRunner().invoke(main, ["routing", "embedded:demo-moe", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: the routing report draws its plots with matplotlib, which is not "
                                     "installed: pip install 'outlier-runtime[plots]', or pass --no-plots")
    assert not list((tmp_path / "r").iterdir())  # refused before any work: nothing written


def test_cli_policies_option_still_picks_the_policies(tmp_path):
    from click.testing import CliRunner

    from outlier_runtime.cli import main

    result = CliRunner().invoke(main, ["routing", "embedded:demo-moe", "--out", str(tmp_path / "r"), "--no-plots",
                                       "--max-tokens", "64", "--policies", "lru,lfu", "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output)["hit_rate"]) == {"lru", "lfu", "belady"}


def test_the_bench_model_routes_its_tokenizers_corpus(tmp_path):
    from outlier_runtime.bench.routing import held_out_texts

    (tmp_path / "geometry.json").write_text("{}")  # what `outlier bench` writes beside its model
    texts = held_out_texts(tmp_path)
    assert texts and all(isinstance(text, str) and text for text in texts)
