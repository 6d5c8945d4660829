"""The plugin author's path: examples/pinned-lru-policy installed as its own distribution,
selected by name in a user manifest, and used by the paged engine on a tiny MoE."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import outlier_runtime
from outlier_runtime import CachePolicy, cli
from outlier_runtime.core import plugin_manager

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pinned-lru-policy"
DISTRIBUTION = "outlier-pinned-lru"


@pytest.fixture(scope="module")
def installed_example() -> None:
    """Install the example like a user would (CI installs it beforehand; see .ci/run)."""
    try:
        importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps",
                        "-e", str(EXAMPLE)], check=True)
        importlib.invalidate_caches()
    if importlib.util.find_spec("outlier_pinned_lru") is None:
        # An editable install takes effect in new processes; this one needs the path itself.
        sys.path.insert(0, str(EXAMPLE))
    plugin_manager.reset()


@pytest.fixture
def only_the_example(installed_example, monkeypatch) -> None:
    """Load no third-party plugin but the example (built-ins always load)."""
    monkeypatch.setenv(plugin_manager.LOAD_PLUGINS_ENV, DISTRIBUTION)
    plugin_manager.reset()


def test_outlier_plugins_lists_the_example_and_its_policy(only_the_example):
    row = {row["name"]: row for row in outlier_runtime.plugins()}["pinned_lru"]
    assert row["distribution"] == DISTRIBUTION
    assert row["provides"] == {"cache_policy": ["pinned-lru"]}
    listing = CliRunner().invoke(cli.main, ["plugins"])
    assert listing.exit_code == 0 and "pinned-lru" in listing.output


def test_pinned_lru_spares_the_most_used_key(installed_example):
    from outlier_pinned_lru import PinnedLRUPolicy

    policy = PinnedLRUPolicy(pinned=1)
    assert isinstance(policy, CachePolicy)
    for key in ["hot", "hot", "hot", "warm", "cold"]:
        policy.accessed(key)
    # Plain LRU would evict "hot" (least recently used); the policy keeps it as the most used.
    assert policy.choose_victim({"hot", "warm", "cold"}) == "warm"
    assert (policy.victims_chosen, policy.pinned_spared, policy.all_pinned) == (1, 1, 0)
    policy.evicted("warm")
    assert policy.choose_victim({"hot"}) == "hot"  # nothing else can go
    assert policy.all_pinned == 1


def test_user_manifest_selects_the_example_for_the_plus_tier(only_the_example, isolated_home, tiny):
    from outlier_pinned_lru import PinnedLRUPolicy

    tiers = isolated_home / "tiers"
    tiers.mkdir(parents=True)
    (tiers / "plus.toml").write_text('[paging]\ncache_policy = "pinned-lru"\n')
    PinnedLRUPolicy.totals.clear()

    runtime = outlier_runtime.load("plus", model=str(tiny("qwen3_moe")), k_override=1, cache_gb=0, force=True)
    try:
        result = runtime.generate("def fibonacci(n):", max_tokens=8, temperature=0.0, chat=False)
    finally:
        runtime.close()

    assert result.engine["config"]["cache_policy"] == "pinned-lru"
    assert result.engine["total"]["evictions"] > 0
    assert PinnedLRUPolicy.totals["victims_chosen"] >= result.engine["total"]["evictions"]
