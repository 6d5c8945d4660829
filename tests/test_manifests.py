"""Tier manifests: the built-in lineup, every kind of mistake, user overrides and admission."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import outlier_runtime
from outlier_runtime import AdmissionError, ManifestError
from outlier_runtime.core.plugin_manager import get_registry
from outlier_runtime.core.catalog import resolve_tier

from outlier_runtime.core import catalog as tiers_module

BUILTIN = {
    # name: (display_name, kind, min_ram_gb, disk_gb, repo, loader)
    "nano": ("Nano", "dense", 6, 2.37, "mlx-community/Qwen3.5-4B-4bit", "dense"),
    "lite": ("Lite", "dense", 12, 5.04, "mlx-community/Qwen3.5-9B-4bit", "dense"),
    "quick": ("Quick", "small-moe", 16, 15.6, "mlx-community/gemma-4-26b-a4b-it-4bit", "dense"),
    "compact": ("Core", "dense", 24, 15.1, "mlx-community/Qwen3.6-27B-4bit", "dense"),
    "code": ("Code", "dense", 24, 15.1, "mlx-community/Qwen3.6-27B-4bit", "dense"),
    "vision": ("Vision", "small-moe", 24, 19, "mlx-community/Qwen3.6-35B-A3B-4bit", "vlm"),
    "plus": ("Plus", "large-moe", 32, 209, "mlx-community/Qwen3.5-397B-A17B-4bit", "paged_moe"),
}

# A complete, valid manifest for a new user tier; cases below break one thing in it.
NEW_TIER = """\
[tier]
id = "mine"
display_name = "Mine"
kind = "dense"
min_ram_gb = 1
disk_gb = 0.1

[model]
path = "/models/mine"

[loader]
name = "dense"
"""


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def resolve(name: str, overrides: dict | None = None):
    return resolve_tier(name, get_registry(), overrides)


# ------------------------------------------------------------------ the built-in lineup


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_tier_validates_with_its_figures(name):
    display_name, kind, min_ram_gb, disk_gb, repo, loader = BUILTIN[name]
    manifest = resolve(name)
    assert manifest.name == name
    assert manifest.tier.display_name == display_name
    assert manifest.tier.kind == kind
    assert manifest.tier.min_ram_gb == min_ram_gb
    assert manifest.tier.disk_gb == disk_gb
    assert manifest.model.repo == repo and manifest.model.path is None
    assert manifest.loader.name == loader
    assert ("paging" in manifest.plugin_tables) == (name == "plus")


def test_exactly_the_seven_builtin_tiers_are_listed():
    assert sorted(row["name"] for row in outlier_runtime.tiers()) == sorted(BUILTIN)
    assert all(row["error"] is None for row in outlier_runtime.tiers())


def test_plus_pages_experts_with_the_products_knobs():
    paging = resolve("plus").loader_options
    assert paging.k_override == 20
    assert paging.cache_gb == "auto"  # sized from available memory at load (an explicit number wins)
    assert paging.mmap_experts is False
    assert paging.lazy_load is True
    assert (paging.reader, paging.cache_policy) == ("pread", "lfru")
    assert paging.cache_policy_options == {}  # lfru with its default weight


def test_code_is_core_with_a_64k_context_and_a_system_prompt():
    code, core = resolve("code"), resolve("compact")
    assert code.generation.context_window == 65536
    assert core.generation.context_window == 32768
    assert code.generation.system_prompt and "engineer" in code.generation.system_prompt
    assert core.generation.system_prompt is None
    assert code.model.repo == core.model.repo


def test_only_vision_takes_images():
    assert [name for name in BUILTIN if resolve(name).model.image_input] == ["vision"]


# ------------------------------------------------------------------ every kind of mistake

# (case, file name, manifest text, tier to resolve, what the message must name)
INVALID = [
    ("unknown top-level key", "mine.toml", 'colour = "red"\n' + NEW_TIER, "mine",
     ["`colour`", "unknown key"]),
    ("unknown key in a section", "plus.toml", "[paging]\ncache_size = 2\n", "plus",
     ["`paging.cache_size`", "unknown key"]),
    ("wrong type", "plus.toml", '[paging]\ncache_gb = "lots"\n', "plus",
     ["`paging.cache_gb`", "'lots'", "a number >= 0 (GB) or \"auto\""]),
    ("wrong type for a table", "plus.toml", "paging = 3\n", "plus",
     ["`paging`", "3"]),
    ("negative cache_gb", "plus.toml", "[paging]\ncache_gb = -1\n", "plus",
     ["`paging.cache_gb`", "got -1", "expected a number >= 0"]),
    ("zero k_override", "plus.toml", "[paging]\nk_override = 0\n", "plus",
     ["`paging.k_override`", "got 0", "expected a number >= 1"]),
    ("top_p above one", "nano.toml", "[generation]\ntop_p = 1.5\n", "nano",
     ["`generation.top_p`", "got 1.5", "expected a number <= 1"]),
    ("unknown loader", "nano.toml", '[loader]\nname = "turbo"\n', "nano",
     ["`loader.name`", "'turbo'", "'dense'", "'paged_moe'"]),
    ("unknown reader", "plus.toml", '[paging]\nreader = "telepathy"\n', "plus",
     ["`paging.reader`", "'telepathy'", "'mmap'", "'pread'"]),
    ("unknown cache policy", "plus.toml", '[paging]\ncache_policy = "fifo"\n', "plus",
     ["`paging.cache_policy`", "'fifo'", "'lfu'", "'lru'"]),
    ("no model source", "mine.toml", NEW_TIER.replace('path = "/models/mine"', 'revision = "main"'), "mine",
     ["`model`", "`repo`", "`path`"]),
    ("missing required key", "mine.toml", NEW_TIER.replace("disk_gb = 0.1\n", ""), "mine",
     ["`tier.disk_gb`", "required key is missing"]),
    ("invalid TOML", "plus.toml", "[paging]\ncache_gb = = 2\n", "plus",
     ["not valid TOML", "line 2"]),
]


@pytest.mark.parametrize("case,file_name,text,tier,expected", INVALID, ids=[case[0] for case in INVALID])
def test_invalid_manifest_names_file_key_and_expectation(isolated_home, case, file_name, text, tier, expected):
    path = write(isolated_home / "tiers", file_name, text)
    with pytest.raises(ManifestError) as caught:
        resolve(tier)
    message = str(caught.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"


def test_a_tier_defined_in_two_user_directories_names_both_files(isolated_home, tmp_path, monkeypatch):
    first = write(isolated_home / "tiers", "mine.toml", NEW_TIER)
    second = write(tmp_path / "team-tiers", "also-mine.toml", NEW_TIER)
    monkeypatch.setenv("OUTLIER_TIERS_PATH", str(second.parent))
    with pytest.raises(ManifestError, match="'mine' is defined twice") as caught:
        resolve("nano")
    assert str(first) in str(caught.value) and str(second) in str(caught.value)


def test_a_broken_user_manifest_is_listed_as_invalid_not_hidden(isolated_home):
    write(isolated_home / "tiers", "plus.toml", "[paging]\nk_override = 0\n")
    rows = {row["name"]: row for row in outlier_runtime.tiers()}
    assert rows["plus"]["runnable"] is False
    assert "paging.k_override" in rows["plus"]["error"]
    assert rows["nano"]["error"] is None


# ------------------------------------------------------------------ user overrides


def test_user_file_overrides_one_knob_of_plus_and_nothing_else(isolated_home):
    builtin = resolve("plus").model_dump()
    path = write(isolated_home / "tiers", "plus.toml", "[paging]\ncache_gb = 2\n")
    merged = resolve("plus").model_dump()
    assert merged["paging"]["cache_gb"] == 2.0
    merged["paging"]["cache_gb"] = builtin["paging"]["cache_gb"]
    assert merged == builtin
    row = next(row for row in outlier_runtime.tiers() if row["name"] == "plus")
    assert row["files"][-1] == str(path) and len(row["files"]) == 2


def test_a_directory_in_outlier_tiers_path_adds_a_tier(tmp_path, monkeypatch):
    team = tmp_path / "team-tiers"
    write(team, "mine.toml", NEW_TIER)
    monkeypatch.setenv("OUTLIER_TIERS_PATH", str(team))
    manifest = resolve("mine")
    assert manifest.tier.display_name == "Mine"
    assert manifest.model.path == "/models/mine"
    assert "mine" in [row["name"] for row in outlier_runtime.tiers()]


def test_a_user_tier_without_an_id_takes_its_file_name(isolated_home):
    write(isolated_home / "tiers", "scratch.toml", NEW_TIER.replace('id = "mine"\n', ""))
    assert resolve("scratch").name == "scratch"


def test_python_overrides_set_knobs_by_short_name():
    manifest = resolve("plus", {"cache_gb": 4, "model": "/some/dir", "k_override": 3, "seed": 7})
    assert manifest.loader_options.cache_gb == 4.0
    assert manifest.loader_options.k_override == 3
    assert manifest.generation.seed == 7
    assert manifest.model.path == "/some/dir"
    assert manifest.model.repo is None  # a local path replaces the built-in repo
    assert manifest.loader_options.reader == "pread"  # untouched knobs keep their values


def test_a_model_override_shaped_like_org_name_is_a_repo_id():
    manifest = resolve("nano", {"model": "someone/some-model"})
    assert manifest.model.repo == "someone/some-model"
    assert manifest.model.path is None


def test_python_overrides_reach_any_key_with_dotted_names():
    manifest = resolve("plus", {"paging.k_override": 5, "generation.max_tokens": 9, "tier.min_ram_gb": 1})
    assert manifest.loader_options.k_override == 5
    assert manifest.generation.max_tokens == 9
    assert manifest.tier.min_ram_gb == 1


def test_python_overrides_are_validated_like_files():
    with pytest.raises(ManifestError, match=r"(?s)Python overrides.*`paging.cache_gb`.*>= 0"):
        resolve("plus", {"cache_gb": -2})
    with pytest.raises(ManifestError, match=r"(?s)`paging.reader`.*'telepathy'"):
        resolve("plus", {"reader": "telepathy"})


def test_an_unknown_override_name_is_an_error_listing_the_known_ones():
    with pytest.raises(ManifestError, match=r"Unknown override 'cache_size'.*loader 'paged_moe': k_override, cache_gb.*dotted manifest key"):
        resolve("plus", {"cache_size": 4})


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("0", False)])
def test_outlier_mmap_experts_switches_mmap(monkeypatch, isolated_home, value, expected):
    # The environment wins over a user file too.
    write(isolated_home / "tiers", "plus.toml", f"[paging]\nmmap_experts = {str(not expected).lower()}\n")
    monkeypatch.setenv("OUTLIER_MMAP_EXPERTS", value)
    assert resolve("plus").loader_options.mmap_experts is expected
    assert resolve("nano").plugin_tables == {}  # dense tiers have no paging to switch


# ------------------------------------------------------------------ admission


@pytest.fixture
def ram(monkeypatch):
    """``ram(gb)`` makes this machine report ``gb`` of RAM."""

    def set_ram(gb: float) -> None:
        monkeypatch.setattr(tiers_module, "total_ram_gb", lambda: gb)

    return set_ram


def test_tiers_are_runnable_when_ram_clears_min_ram_with_15_percent_slack(ram):
    ram(24 * 1.15)  # exactly what the 24 GB tiers need
    rows = {row["name"]: row for row in outlier_runtime.tiers()}
    assert {name for name, row in rows.items() if row["runnable"]} == {
        "nano", "lite", "quick", "compact", "code", "vision"}
    assert "needs 36.8 GB RAM (min_ram_gb 32 x 1.15), this machine has 27.6 GB" in rows["plus"]["reason"]

    ram(24 * 1.15 - 0.01)
    rows = {row["name"]: row for row in outlier_runtime.tiers()}
    assert {name for name, row in rows.items() if row["runnable"]} == {"nano", "lite", "quick"}

    ram(6.0)  # below 6 x 1.15 even for nano
    assert not any(row["runnable"] for row in outlier_runtime.tiers())


def test_listing_reports_the_figures_people_choose_by():
    row = next(row for row in outlier_runtime.tiers() if row["name"] == "compact")
    assert row["display_name"] == "Core"
    assert (row["min_ram_gb"], row["disk_gb"], row["context_window"]) == (24, 15.1, 32768)
    assert row["model"] == "mlx-community/Qwen3.6-27B-4bit" and row["loader"] == "dense"


def test_admission_refuses_a_tier_too_big_for_this_machine(ram, tiny):
    ram(4.0)
    with pytest.raises(AdmissionError) as caught:
        outlier_runtime.load("nano", model=str(tiny("llama")))
    message = str(caught.value)
    assert "'nano'" in message
    assert "needs 6.9 GB RAM" in message and "this machine has 4.0 GB" in message
    assert "force=True" in message and "--force" in message


def test_force_loads_a_tier_too_big_for_this_machine(ram, tiny):
    ram(4.0)
    with outlier_runtime.load("nano", model=str(tiny("llama")), force=True) as runtime:
        result = runtime.generate("def f(", max_tokens=3, temperature=0.0, chat=False)
    assert result.tier == "nano"
    assert result.generation_tokens == len(result.tokens) > 0


def test_one_unreadable_user_manifest_is_listed_invalid_and_hides_no_other_tier(isolated_home):
    path = write(isolated_home / "tiers", "mine.toml", "[tier\nid = 'mine'\n")
    rows = {row["name"]: row for row in outlier_runtime.tiers()}
    assert rows["mine"]["error"].startswith(f"{path}: not valid TOML")
    assert rows["mine"]["runnable"] is False and rows["mine"]["files"] == [str(path)]
    assert rows["plus"]["error"] is None and len(rows) == 8  # the seven tiers are still listed
    with pytest.raises(ManifestError, match="not valid TOML"):  # loading any tier still says why
        resolve("plus")
