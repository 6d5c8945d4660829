"""The ``outlier`` command line, driven as a user would through click's test runner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import outlier_runtime
from outlier_runtime.cli import main
from outlier_runtime.core.plugin_manager import get_registry
from outlier_runtime.core.catalog import resolve_tier

TIERS = {"nano", "lite", "quick", "compact", "code", "vision", "plus"}


def outlier(*args: str):
    """Run ``outlier ARGS``; the result has .exit_code, .stdout and .stderr."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_tiers_json_lists_the_seven_tiers():
    result = outlier("tiers", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert {row["name"] for row in rows} == TIERS
    core = next(row for row in rows if row["name"] == "compact")
    assert core["display_name"] == "Core" and isinstance(core["runnable"], bool)


def test_tiers_prints_one_line_per_tier():
    result = outlier("tiers")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 7
    assert any(line.startswith("plus") and "Plus" in line and "runnable:" in line for line in lines)


def test_info_json_shows_the_merged_manifest_and_its_files():
    result = outlier("info", "plus", "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["manifest"]["paging"]["k_override"] == 20
    assert info["manifest"]["model"]["repo"] == "mlx-community/Qwen3.5-397B-A17B-4bit"
    assert info["files"][0].endswith("plus.toml")
    assert isinstance(info["runnable"], bool) and "GB" in info["reason"]


def test_info_shows_a_user_override_and_where_it_came_from(isolated_home):
    (isolated_home / "tiers").mkdir(parents=True)
    (isolated_home / "tiers" / "plus.toml").write_text("[paging]\ncache_gb = 2\n")
    result = outlier("info", "plus")
    assert result.exit_code == 0
    assert "cache_gb = 2.0" in result.stdout
    assert str(isolated_home / "tiers" / "plus.toml") in result.stdout


def test_plugins_json_lists_the_builtins_and_their_distribution():
    result = outlier("plugins", "--json")
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["paged_moe"]["distribution"] == "outlier-runtime"
    assert rows["paged_moe"]["provides"] == {"loader": ["paged_moe"]}
    assert "lfu" in rows["cache_lfu"]["provides"]["cache_policy"]


def test_schema_prints_the_manifest_json_schema():
    result = outlier("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert {"tier", "model", "loader", "generation", "paging"} <= set(schema["properties"])
    # [paging] is the paged_moe loader's options table, described by that plugin's own model.
    paging = schema["$defs"][schema["properties"]["paging"]["$ref"].rsplit("/", 1)[-1]]
    assert {"type": "number", "minimum": 0} in paging["properties"]["cache_gb"]["anyOf"]
    assert {"const": "auto"} in paging["properties"]["cache_gb"]["anyOf"]
    assert paging["additionalProperties"] is False
    # Every registered plugin's options are in the schema, by kind and name.
    plugins = schema["x-plugin-options"]
    assert plugins["reader"]["fanout"]["properties"]["workers"]["minimum"] == 1
    assert plugins["prefetcher"]["next-layer-router"]["properties"]["extra"]["default"] == 0


def test_new_tier_writes_a_user_manifest_that_validates_and_is_listed(isolated_home):
    result = outlier("new-tier", "mine", "--from", "plus")
    assert result.exit_code == 0
    path = isolated_home / "tiers" / "mine.toml"
    assert f"wrote {path}" in result.stdout
    assert path.is_file()
    # The schema hint names this user's directory, not a hard-coded default.
    assert f"outlier schema > {isolated_home / 'tier.schema.json'}" in path.read_text()

    manifest = resolve_tier("mine", get_registry())
    assert manifest.tier.display_name == "Mine"
    assert manifest.loader_options.k_override == 20
    listed = {row["name"]: row for row in json.loads(outlier("tiers", "--json").stdout)}
    assert listed["mine"]["error"] is None and listed["mine"]["files"] == [str(path)]

    again = outlier("new-tier", "mine", "--from", "plus")
    assert again.exit_code == 2
    assert "already exists" in again.stderr


def test_run_streams_text_and_reports_tok_s(tiny):
    result = outlier("run", "nano", "def f(", "--model", str(tiny("llama")), "--force",
                     "--max-tokens", "5", "--raw", "--temp", "0")
    assert result.exit_code == 0, result.output
    with outlier_runtime.load("nano", model=str(tiny("llama")), force=True) as runtime:
        expected = runtime.generate("def f(", max_tokens=5, temperature=0.0, chat=False).text
    assert result.stdout == f"def f({expected}\n"
    assert "-- 5 tokens," in result.stderr and "tok/s" in result.stderr


@pytest.fixture
def moe(tiny):
    return str(tiny("qwen3_moe"))


def test_run_plus_with_stats_prints_paging_lines(moe):
    result = outlier("run", "plus", "def f(", "--model", moe, "--k-override", "2", "--cache-gb", "1",
                     "--force", "--max-tokens", "4", "--raw", "--temp", "0", "--stats")
    assert result.exit_code == 0, result.output
    assert "-- paging: 2 slots/layer x 2 layers, reader pread, policy lfru" in result.stderr
    assert "-- lookups" in result.stderr and "hit rate" in result.stderr
    assert result.stderr.count("   layer ") == 2


def test_run_json_prints_one_parsable_result_with_engine_stats(moe):
    result = outlier("run", "plus", "def f(", "--model", moe, "--k-override", "1", "--cache-gb", "0",
                     "--cache-policy", "lfu", "--force", "--max-tokens", "4", "--raw", "--temp", "0", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tier"] == "plus"
    assert len(data["tokens"]) == data["generation_tokens"] == 4
    total = data["engine"]["total"]
    assert total["lookups"] == total["slot_hits"] + total["ram_hits"] + total["misses"] > 0
    assert data["engine"]["config"]["cache_policy"] == "lfu"
    assert data["engine"]["config"]["slots_per_layer"] == 1


def test_an_unknown_tier_exits_2_with_one_line_of_error():
    result = outlier("run", "gigantic", "hello")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: No tier named 'gigantic'.") and "nano" in lines[0]


def test_a_tier_too_big_without_force_exits_2_and_suggests_force(monkeypatch, tiny):
    monkeypatch.setattr("outlier_runtime.core.catalog.total_ram_gb", lambda: 2.0)
    result = outlier("run", "nano", "hi", "--model", str(tiny("llama")))
    assert result.exit_code == 2
    assert "--force" in result.stderr and len(result.stderr.splitlines()) == 1


def test_version_prints_the_installed_version():
    result = outlier("--version")
    assert result.exit_code == 0
    assert result.stdout == f"outlier, version {outlier_runtime.__version__}\n"


def test_a_prompt_of_dash_is_read_from_standard_input(tiny):
    model = str(tiny("llama"))
    piped = CliRunner().invoke(main, ["run", "nano", "-", "--model", model, "--force", "--max-tokens", "3",
                                      "--raw", "--temp", "0"], input="def f(", catch_exceptions=False)
    assert piped.exit_code == 0, piped.output
    direct = outlier("run", "nano", "def f(", "--model", model, "--force", "--max-tokens", "3", "--raw", "--temp", "0")
    assert piped.stdout == direct.stdout and piped.stdout.startswith("def f(")


def test_chat_mode_prints_only_the_reply_unless_echo_is_asked_for(tiny):
    args = ["run", "nano", "Say hi.", "--model", str(tiny("llama")), "--force", "--max-tokens", "3", "--temp", "0"]
    with outlier_runtime.load("nano", model=str(tiny("llama")), force=True) as runtime:
        reply = runtime.generate("Say hi.", max_tokens=3, temperature=0.0).text
    assert outlier(*args).stdout == f"{reply}\n"
    assert outlier(*args, "--echo").stdout == f"Say hi.{reply}\n"


def test_info_toml_is_a_manifest_that_validates(isolated_home):
    from outlier_runtime.core.catalog import resolve_plugin_options
    from outlier_runtime.core.manifest import tomllib, validate_manifest

    result = outlier("info", "plus", "--toml")
    assert result.exit_code == 0
    manifest = validate_manifest(tomllib.loads(result.stdout), "info --toml")
    manifest = resolve_plugin_options(manifest, "info --toml", get_registry())
    assert manifest.loader_options.k_override == 20 and manifest.model.revision is None
    # Every option of the loader is written out, defaults included: a complete manifest to edit.
    assert set(tomllib.loads(result.stdout)["paging"]) >= {"k_override", "cache_gb", "reader", "use_pack"}
    # The readable form is TOML too (its header lines are comments): no Python reprs.
    readable = outlier("info", "plus").stdout
    assert tomllib.loads(readable) == tomllib.loads(result.stdout)
    assert "None" not in readable and "False" not in readable


@pytest.mark.parametrize("name", ["Bad Name!", "_lead", "UPPER", "a/b"])
def test_new_tier_refuses_a_name_the_manifest_would_refuse(isolated_home, name):
    result = outlier("new-tier", name)
    assert result.exit_code == 2
    assert f"Tier name {name!r} is not a valid `tier.id`" in result.stderr
    assert not (isolated_home / "tiers").exists() or not list((isolated_home / "tiers").iterdir())


def test_serve_refuses_a_tier_override_that_is_not_a_model_directory(tmp_path):
    result = outlier("serve", "--tier-override", f"nano={tmp_path / 'nowhere'}")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --tier-override nano=PATH: {tmp_path / 'nowhere'} does not exist.")


def test_serve_refuses_a_port_in_use_before_loading_anything():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = outlier("serve", "--port", str(port))
    assert result.exit_code == 2
    assert result.stderr == (f"error: --port {port}: 127.0.0.1:{port} is not available (Address already in use); "
                             f"pick another port or stop what listens there.\n")


def test_pack_takes_the_model_references_that_model_takes(monkeypatch):
    from outlier_runtime.embedded import demo_moe_path

    packed = []

    def fake_pack_model(model_dir, **kwargs):
        packed.append(model_dir)
        raise outlier_runtime.CheckpointError("stop here: the reference resolved")

    monkeypatch.setattr("outlier_runtime.engine.pack.pack_model", fake_pack_model)
    result = outlier("pack", "embedded:demo-moe")
    assert result.exit_code == 2 and packed == [demo_moe_path()]
    offline = outlier("pack", "outlier-tests/not-downloaded")
    assert offline.exit_code == 2 and "`outlier pull outlier-tests/not-downloaded`" in offline.stderr


def test_listing_commands_import_no_model_library():
    import subprocess
    import sys

    code = ("import sys\nfrom click.testing import CliRunner\nfrom outlier_runtime.cli import main\n"
            "for args in (['tiers', '--json'], ['info', 'plus'], ['plugins'], ['schema']):\n"
            "    assert CliRunner().invoke(main, args).exit_code == 0, args\n"
            "print(sorted(m for m in ('mlx_lm', 'transformers', 'torch') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_shell_completion_is_what_the_readme_says():
    from outlier_runtime.cli import main as command

    result = CliRunner().invoke(command, [], prog_name="outlier", env={"_OUTLIER_COMPLETE": "bash_source"})
    assert result.exit_code == 0
    assert "_outlier_completion()" in result.stdout and "complete " in result.stdout


def test_sampling_flags_reach_the_sampler(tiny):
    model = str(tiny("llama"))
    base = ["run", "nano", "def f(", "--model", model, "--force", "--raw", "--max-tokens", "6"]
    greedy = outlier(*base, "--temp", "0").stdout
    # At temperature 1 with a seed, top-k 1 is greedy again; a strong repetition penalty changes the text.
    assert outlier(*base, "--temp", "1", "--seed", "5", "--top-k", "1").stdout == greedy
    penalised = outlier(*base, "--temp", "0", "--repetition-penalty", "5").stdout
    assert penalised == outlier(*base, "--temp", "0", "--repetition-penalty", "5").stdout
    assert penalised != greedy
