"""Plugins: discovery through entry points, each hook, name clashes, third-party distributions."""

from __future__ import annotations

import inspect
import os
import re
import sys
from pathlib import Path

import pytest
from pluggy import PluginValidationError

import outlier_runtime
from outlier_runtime import CachePolicy, Loader, LoadedModel, PluginError, PluginOptions, Prefetcher, Reader, hookimpl
from outlier_runtime.core import hookspecs, plugin_manager
from outlier_runtime.core.plugin_manager import get_plugin_manager, get_registry, register_plugin, unregister_plugin
from outlier_runtime.core.catalog import resolve_tier

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "import os\n\ndef walk(path):\n"


@pytest.fixture
def add_plugin():
    """``add_plugin(obj, name)`` registers an in-process plugin for this test only."""
    names = []

    def add(plugin: object, name: str) -> None:
        register_plugin(plugin, name)
        names.append(name)

    yield add
    for name in names:
        unregister_plugin(name)


def hook_names() -> list[str]:
    return [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec")]


def greedy(runtime, max_tokens=8):
    return runtime.generate(PROMPT, max_tokens=max_tokens, temperature=0.0, chat=False)


# ------------------------------------------------------------------ built-ins


def test_builtin_plugins_come_from_the_outlier_runtime_distribution():
    rows = {row["name"]: row for row in outlier_runtime.plugins()}
    for name in ("dense", "paged_moe", "cache_lru", "cache_lfu", "readers"):
        assert rows[name]["distribution"] == "outlier-runtime"
        assert rows[name]["version"] == outlier_runtime.__version__
    assert rows["dense"]["provides"] == {"loader": ["dense"]}
    assert {"mmap", "pread"} <= set(rows["readers"]["provides"]["reader"])


def test_registry_holds_the_builtin_loaders_readers_and_policies():
    registry = get_registry()
    assert {"dense", "paged_moe"} <= set(registry.names("loader"))
    assert {"pread", "mmap"} <= set(registry.names("reader"))
    assert {"lru", "lfu"} <= set(registry.names("cache_policy"))
    assert isinstance(registry.create("loader", "dense"), Loader)
    assert isinstance(registry.create("cache_policy", "lfu"), CachePolicy)


def test_asking_for_an_unregistered_name_lists_the_available_ones():
    with pytest.raises(PluginError, match=r"Unknown cache policy 'fifo'. Available: .*lfu, lrfu, lru"):
        get_registry().create("cache_policy", "fifo")


# ------------------------------------------------------------------ mistakes fail fast


class AnotherLRU:
    @hookimpl
    def register_cache_policies(self, register):
        register("lru", dict)


class MisspeltHook:
    @hookimpl
    def register_cache_polices(self, register):
        register("never", dict)


def test_two_plugins_registering_one_name_is_an_error_naming_both(add_plugin):
    add_plugin(AnotherLRU(), "another-lru")
    with pytest.raises(PluginError) as caught:
        get_registry()
    message = str(caught.value)
    assert "cache_policy named 'lru'" in message
    assert "plugin 'cache_lru' (distribution 'outlier-runtime')" in message
    assert "plugin 'another-lru'" in message
    assert "OUTLIER_LOAD_PLUGINS" in message


def test_a_misspelt_hook_name_fails_when_the_plugin_manager_is_built(add_plugin):
    add_plugin(MisspeltHook(), "misspelt")
    with pytest.raises(PluginValidationError, match="register_cache_polices"):
        get_plugin_manager()


# ------------------------------------------------------------------ every hook, used by name


class RecordingLoader:
    """Loads like the dense loader and remembers what it was asked for."""

    requests: list = []

    def load(self, request):
        import mlx_lm

        RecordingLoader.requests.append(request)
        model, tokenizer = mlx_lm.load(str(request.model_path))
        return LoadedModel(model=model, tokenizer=tokenizer, stats=lambda: {"loader": "recording"})


class RecordingLoaderPlugin:
    @hookimpl
    def register_loaders(self, register):
        register("recording", RecordingLoader, "Dense, and remembers its requests.")


def test_register_loaders_adds_a_loader_a_tier_can_name(add_plugin, tiny):
    add_plugin(RecordingLoaderPlugin(), "recording-loader")
    RecordingLoader.requests.clear()
    path = tiny("llama")
    assert isinstance(get_registry().create("loader", "recording"), Loader)
    with outlier_runtime.load("nano", model=str(path), loader="recording", force=True) as runtime:
        result = greedy(runtime, 4)
    assert [(r.manifest.name, r.model_path) for r in RecordingLoader.requests] == [("nano", path)]
    assert result.engine == {"loader": "recording"}
    with outlier_runtime.load("nano", model=str(path), force=True) as dense:
        assert greedy(dense, 4).tokens == result.tokens
    rows = {row["name"]: row for row in outlier_runtime.plugins()}
    assert rows["recording-loader"] == {"name": "recording-loader", "distribution": None, "version": None,
                                        "provides": {"loader": ["recording"]},
                                        "options": {"loader": {"recording": []}}}


class FifoPolicy:
    """First in, first out: evicts the oldest entry, however often it was used."""

    def __init__(self):
        self.order: list = []

    def accessed(self, key):
        if key not in self.order:
            self.order.append(key)

    def evicted(self, key):
        if key in self.order:
            self.order.remove(key)

    def choose_victim(self, candidates):
        return next((key for key in self.order if key in candidates), next(iter(candidates)))


class FifoPlugin:
    @hookimpl
    def register_cache_policies(self, register):
        register("fifo", FifoPolicy, "Oldest first.")


def test_register_cache_policies_adds_a_policy_usable_by_name(add_plugin):
    add_plugin(FifoPlugin(), "fifo-policy")
    policy = get_registry().create("cache_policy", "fifo")
    assert isinstance(policy, CachePolicy)
    for key in [(0, 1), (0, 2), (0, 1), (0, 3)]:
        policy.accessed(key)
    assert policy.choose_victim({(0, 2), (0, 1)}) == (0, 1)  # LRU would pick (0, 2)
    # A manifest may name it now.
    assert resolve_tier("plus", get_registry(), {"cache_policy": "fifo"}).loader_options.cache_policy == "fifo"


class CountingReader:
    """Reads each range with os.pread and counts the bytes; remembers every instance."""

    instances: list = []

    def __init__(self, **options):
        self.options = options
        self.bytes_read = 0
        self.closed = False
        CountingReader.instances.append(self)

    def read(self, requests):
        for request in requests:
            fd = os.open(request.path, os.O_RDONLY)
            try:
                request.out[:] = os.pread(fd, request.length, request.offset)
            finally:
                os.close(fd)
            self.bytes_read += request.length

    def close(self):
        self.closed = True


class CountingOptions(PluginOptions):
    label: str = ""


class CountingReaderPlugin:
    @hookimpl
    def register_readers(self, register):
        register("counting", CountingReader, "pread, counted.", options=CountingOptions)


def test_register_readers_adds_a_reader_the_paged_engine_uses(add_plugin, tiny):
    add_plugin(CountingReaderPlugin(), "counting-reader")
    CountingReader.instances.clear()
    path = tiny("qwen3_moe")
    with outlier_runtime.load("plus", model=str(path), k_override=2, cache_gb=0, force=True) as stock:
        expected = greedy(stock).tokens
    runtime = outlier_runtime.load("plus", model=str(path), k_override=2, cache_gb=0, reader="counting",
                                   reader_options={"label": "test"}, force=True)
    result = greedy(runtime)
    runtime.close()
    [reader] = CountingReader.instances
    assert isinstance(reader, Reader)
    assert reader.options == {"label": "test"}
    assert result.tokens == expected
    assert reader.bytes_read == result.engine["total"]["bytes_read"] > 0
    assert result.engine["config"]["reader"] == "counting"
    assert reader.closed


class FirstExpertsPrefetcher:
    """Always guesses the first two experts of the next layer; remembers each call."""

    calls: list = []

    def predict(self, layer, hidden, next_layer):
        FirstExpertsPrefetcher.calls.append(layer)
        return [0, 1]


class PrefetcherPlugin:
    @hookimpl
    def register_prefetchers(self, register):
        register("first-two", FirstExpertsPrefetcher, "Guesses experts 0 and 1.")


def test_register_prefetchers_adds_a_prefetcher_the_paged_engine_asks(add_plugin, tiny):
    add_plugin(PrefetcherPlugin(), "first-two-prefetcher")
    FirstExpertsPrefetcher.calls.clear()
    assert isinstance(get_registry().create("prefetcher", "first-two"), Prefetcher)
    path = tiny("qwen3_moe")
    with outlier_runtime.load("plus", model=str(path), k_override=2, cache_gb=0.001, force=True) as stock:
        expected = greedy(stock).tokens
    with outlier_runtime.load("plus", model=str(path), k_override=2, cache_gb=0.001, prefetcher="first-two",
                              force=True) as runtime:
        result = greedy(runtime)
    assert result.tokens == expected  # a guess never changes the result
    assert result.engine["config"]["prefetcher"] == "first-two"
    # qwen3_moe has two MoE layers: only the first has a next layer to guess for.
    assert FirstExpertsPrefetcher.calls and set(FirstExpertsPrefetcher.calls) == {0}


# ------------------------------------------------------------------ a third-party distribution

THIRD_PARTY_MODULE = '''\
"""A third-party cache policy: first in, first out, with a record of every decision."""

from outlier_runtime import hookimpl

#: (candidates, victim) of every choose_victim call, for the test to inspect.
VICTIMS = []


class CountingFifo:
    def __init__(self):
        self.order = []

    def accessed(self, key):
        if key not in self.order:
            self.order.append(key)

    def evicted(self, key):
        if key in self.order:
            self.order.remove(key)

    def choose_victim(self, candidates):
        victim = next((key for key in self.order if key in candidates), next(iter(candidates)))
        VICTIMS.append((set(candidates), victim))
        return victim


@hookimpl
def register_cache_policies(register):
    register("counting-fifo", CountingFifo, "FIFO that records its victims.")
'''


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A separately installed distribution 'outlier-fifo-policy' 1.2.3 with entry point 'fifo'."""
    site = tmp_path / "site-packages"
    dist_info = site / "outlier_fifo_policy-1.2.3.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: outlier-fifo-policy\nVersion: 1.2.3\n")
    (dist_info / "entry_points.txt").write_text("[outlier_runtime]\nfifo = outlier_fifo_policy\n")
    (site / "outlier_fifo_policy.py").write_text(THIRD_PARTY_MODULE)
    monkeypatch.syspath_prepend(str(site))
    plugin_manager.reset()
    yield "outlier_fifo_policy"
    sys.modules.pop("outlier_fifo_policy", None)


def test_a_third_party_plugin_is_discovered_with_its_distribution(third_party):
    rows = {row["name"]: row for row in outlier_runtime.plugins()}
    assert rows["fifo"] == {"name": "fifo", "distribution": "outlier-fifo-policy", "version": "1.2.3",
                            "provides": {"cache_policy": ["counting-fifo"]},
                            "options": {"cache_policy": {"counting-fifo": []}}}
    registration = get_registry().get("cache_policy", "counting-fifo")
    assert (registration.plugin, registration.distribution) == ("fifo", "outlier-fifo-policy")
    assert rows["cache_lru"]["distribution"] == "outlier-runtime"


def test_a_user_manifest_can_page_plus_with_a_third_party_policy(third_party, isolated_home, tiny):
    (isolated_home / "tiers").mkdir(parents=True)
    (isolated_home / "tiers" / "plus.toml").write_text('[paging]\ncache_policy = "counting-fifo"\n')
    get_registry()
    victims = sys.modules[third_party]  # the plugin's own module, imported by discovery
    with outlier_runtime.load("plus", model=str(tiny("qwen3_moe")), k_override=1, cache_gb=0,
                              force=True) as runtime:
        result = greedy(runtime, 6)
    assert result.engine["config"]["cache_policy"] == "counting-fifo"
    assert len(victims.VICTIMS) == result.engine["total"]["evictions"] > 0
    assert all(victim in candidates for candidates, victim in victims.VICTIMS)


def test_outlier_load_plugins_empty_disables_third_party_plugins(third_party, monkeypatch):
    monkeypatch.setenv("OUTLIER_LOAD_PLUGINS", "")
    names = {row["name"] for row in outlier_runtime.plugins()}
    assert "fifo" not in names
    assert {"dense", "paged_moe", "cache_lru", "cache_lfu", "readers"} <= names
    assert "counting-fifo" not in get_registry().names("cache_policy")


@pytest.mark.parametrize("allowed", ["fifo", "some-other-plugin,fifo", "outlier-fifo-policy"])
def test_outlier_load_plugins_names_the_third_party_plugins_to_load(third_party, monkeypatch, allowed):
    monkeypatch.setenv("OUTLIER_LOAD_PLUGINS", allowed)
    assert "counting-fifo" in get_registry().names("cache_policy")
    assert "lru" in get_registry().names("cache_policy")


def test_outlier_load_plugins_naming_another_plugin_skips_this_one(third_party, monkeypatch):
    monkeypatch.setenv("OUTLIER_LOAD_PLUGINS", "some-other-plugin")
    assert "counting-fifo" not in get_registry().names("cache_policy")


# ------------------------------------------------------------------ hooks stay documented and tested


def test_every_hook_is_documented_and_tested():
    hooks = hook_names()
    assert {"register_loaders", "register_cache_policies", "register_readers", "register_prefetchers"} <= set(hooks)
    docs = re.sub(r"```.*?```", "", (ROOT / "docs" / "hooks.md").read_text(), flags=re.S)  # not code
    headings = [line for line in docs.splitlines() if line.startswith("#")]
    undocumented = [h for h in hooks if not any(re.search(rf"`{h}\(", line) for line in headings)]
    assert not undocumented, f"hooks without a heading in docs/hooks.md: {undocumented}"

    this_check = inspect.getsource(test_every_hook_is_documented_and_tested)
    sources = [p.read_text().replace(this_check, "") for p in sorted((ROOT / "tests").glob("test_*.py"))]
    untested = [h for h in hooks if not any(h in source for source in sources)]
    assert not untested, f"hooks no test uses: {untested}"
