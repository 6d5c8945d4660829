"""Typed plugin options: each plugin declares what it accepts, and the manifest is checked against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import Field

import outlier_runtime
from outlier_runtime import ManifestError, ParameterError, PluginError, PluginOptions, hookimpl
from outlier_runtime.cli import main
from outlier_runtime.core.manifest import tomllib
from outlier_runtime.core.catalog import resolve_tier
from outlier_runtime.core.plugin_manager import DEFAULT_PLUGINS, get_registry, register_plugin

REPO = Path(__file__).resolve().parents[1]
PROMPT = "import os\n\ndef walk(path):\n"


def write_tier(home: Path, name: str, text: str) -> Path:
    path = home / "tiers" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def outlier(*args: str):
    return CliRunner().invoke(main, list(args))


# One wrong option per plugin kind: (tier, manifest text, key path in the message, plugin in the message).
WRONG_OPTIONS = {
    "loader": ("nano", "[loader]\nname = 'dense'\noptions = { lazy = true }\n",
               "loader.options.lazy", "loader 'dense'"),
    "reader": ("plus", "[paging]\nreader = 'fanout'\nreader_options = { workers = 'eight' }\n",
               "paging.reader_options.workers", "reader 'fanout'"),
    "cache_policy": ("plus", "[paging]\ncache_policy = 'lru'\ncache_policy_options = { size = 3 }\n",
                     "paging.cache_policy_options.size", "cache policy 'lru'"),
    "prefetcher": ("plus", "[paging]\nprefetcher = 'next-layer-router'\nprefetcher_options = { extra = -1 }\n",
                   "paging.prefetcher_options.extra", "prefetcher 'next-layer-router'"),
}


@pytest.mark.parametrize("kind", sorted(WRONG_OPTIONS))
def test_a_wrong_option_is_one_line_naming_file_key_and_plugin(isolated_home, kind):
    tier, text, key, plugin = WRONG_OPTIONS[kind]
    path = write_tier(isolated_home, tier, text)
    result = outlier("run", tier, "hello")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert str(path) in lines[0] and f"`{key}`" in lines[0] and plugin in lines[0]
    assert "Traceback" not in result.output


def test_an_unknown_option_lists_what_the_plugin_accepts(isolated_home):
    write_tier(isolated_home, "plus", "[paging]\nreader = 'fanout'\nreader_options = { threads = 4 }\n")
    with pytest.raises(ManifestError, match="no option 'threads'; it accepts: workers, chunk_bytes, direct"):
        resolve_tier("plus", get_registry())


def test_mmap_from_the_environment_checks_reader_options_against_mmap(isolated_home, monkeypatch):
    write_tier(isolated_home, "plus", "[paging]\nreader = 'fanout'\nreader_options = { workers = 8 }\n")
    assert resolve_tier("plus", get_registry()).loader_options.reader_options == {"workers": 8}
    monkeypatch.setenv("OUTLIER_MMAP_EXPERTS", "1")
    with pytest.raises(ManifestError, match=r"`paging.reader_options.workers`: unknown key: reader 'mmap'"):
        resolve_tier("plus", get_registry())


def test_a_boolean_environment_variable_refuses_other_words(monkeypatch):
    monkeypatch.setenv("OUTLIER_MMAP_EXPERTS", "maybe")
    with pytest.raises(ParameterError, match="OUTLIER_MMAP_EXPERTS=.maybe.: expected 1/0"):
        resolve_tier("plus", get_registry())


def test_a_paging_table_on_a_dense_tier_is_an_error_naming_the_file(isolated_home):
    path = write_tier(isolated_home, "nano", "[paging]\ncache_gb = 4\n")
    with pytest.raises(ManifestError) as caught:
        resolve_tier("nano", get_registry())
    message = str(caught.value)
    assert str(path) in message and "`paging`" in message
    assert "loader 'dense' reads no [paging] table" in message and "'paged_moe'" in message


def test_a_paging_override_on_a_dense_tier_names_the_loaders_options():
    with pytest.raises(ManifestError, match="Unknown override 'cache_gb'.*loader 'dense': none"):
        outlier_runtime.load("nano", cache_gb=4)


def test_options_reach_the_plugins_the_manifest_names(isolated_home):
    write_tier(isolated_home, "plus", "[paging]\nreader = 'fanout'\nreader_options = { workers = 3 }\n"
                                      "prefetcher = 'next-layer-router'\nprefetcher_options = { extra = 2 }\n")
    options = resolve_tier("plus", get_registry()).loader_options
    reader = get_registry().create("reader", options.reader, options.reader_options)
    prefetcher = get_registry().create("prefetcher", options.prefetcher, options.prefetcher_options)
    assert reader.workers == 3 and prefetcher.extra == 2
    reader.close()


def test_the_example_policy_takes_its_option_from_a_manifest(isolated_home):
    write_tier(isolated_home, "plus", "[paging]\ncache_policy = 'pinned-lru'\ncache_policy_options = { pinned = 7 }\n")
    options = resolve_tier("plus", get_registry()).loader_options
    policy = get_registry().create("cache_policy", options.cache_policy, options.cache_policy_options)
    assert policy.pinned == 7
    write_tier(isolated_home, "plus", "[paging]\ncache_policy = 'pinned-lru'\ncache_policy_options = { pinned = -1 }\n")
    with pytest.raises(ManifestError, match=r"`paging.cache_policy_options.pinned`.*expected a number >= 0"):
        resolve_tier("plus", get_registry())


def test_plugins_options_lists_types_defaults_and_descriptions():
    result = outlier("plugins", "--options")
    assert result.exit_code == 0
    assert "reader fanout:" in result.output
    assert "workers (int, default 8): Threads reading at once" in result.output
    assert "k_override (int, default 20)" in result.output
    rows = {row["name"]: row for row in json.loads(outlier("plugins", "--options", "--json").output)}
    fields = {f["name"]: f for f in rows["fanout"]["options"]["reader"]["fanout"]}
    assert fields["direct"] == {"name": "direct", "type": "bool", "required": False, "default": True,
                                "description": "Uncached reads of aligned requests (O_DIRECT, F_NOCACHE); false: page cache only."}
    assert rows["cache_lru"]["options"] == {"cache_policy": {"lru": []}}
    assert "options" not in json.loads(outlier("plugins", "--json").output)[0]


def test_a_plugin_option_model_must_be_pydantic():
    class Bad:
        @hookimpl
        def register_readers(self, register):
            register("bad-options", object, options=dict)

    register_plugin(Bad(), "bad-options-plugin")
    with pytest.raises(PluginError, match="plugin 'bad-options-plugin'.*expected a pydantic model class"):
        get_registry()


def test_an_inner_options_class_is_the_plugins_options():
    class Policy:
        class Options(PluginOptions):
            weight: float = Field(default=1.0, gt=0)

        def __init__(self, weight: float = 1.0):
            self.weight = weight

        def accessed(self, key): ...
        def evicted(self, key): ...
        def choose_victim(self, candidates):
            return next(iter(candidates))

    class Plugin:
        @hookimpl
        def register_cache_policies(self, register):
            register("weighted", Policy)

    register_plugin(Plugin(), "weighted-plugin")
    assert get_registry().create("cache_policy", "weighted", {"weight": 2.5}).weight == 2.5
    with pytest.raises(PluginError, match=r"key `options.weight`: cache policy 'weighted'"):
        get_registry().create("cache_policy", "weighted", {"weight": 0})


# ------------------------------------------------------------------ built-ins without entry points


def test_built_ins_load_from_a_source_checkout_without_entry_points():
    """`PYTHONPATH=.:plugins` and no installed entry points: the built-in loaders are still there."""
    code = (
        "import importlib.metadata as m; m.entry_points = lambda **kw: []\n"
        "import outlier_runtime, outlier_dense, json\n"
        "from outlier_runtime.core.plugin_manager import get_registry\n"
        "r = get_registry()\n"
        "print(json.dumps({'loaders': r.names('loader'), 'readers': r.names('reader'),"
        " 'core': outlier_runtime.__file__, 'dense': outlier_dense.__file__}))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'plugins'}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert {"dense", "paged_moe"} <= set(found["loaders"]) and {"pread", "mmap", "fanout"} <= set(found["readers"])
    assert found["dense"].startswith(str(REPO / "plugins"))


def test_built_ins_are_not_entry_points_any_more():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    entry_points = project.get("entry-points", {}).get("outlier_runtime", {})
    assert not set(entry_points.values()) & set(DEFAULT_PLUGINS.values())


def test_an_unknown_name_in_outlier_load_plugins_is_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("OUTLIER_LOAD_PLUGINS", "no-such-plugin")
    with caplog.at_level("WARNING"):
        names = get_registry().names("loader")
    assert "dense" in names  # built-ins always load
    assert any("'no-such-plugin'" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)
