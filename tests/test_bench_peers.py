"""`outlier bench --peers`: the boyle adapter is exact, and the bench runs (and says so) without boyle."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from outlier_runtime.bench import peer_bench, peers
from outlier_runtime.bench.model import pack_is_stale
from outlier_runtime.cli import main
from outlier_runtime.engine.pack import PACK_DIR, pack_model

PROMPT = "def fibonacci(n):"


def _greedy(model, tokenizer, tokens: int = 24) -> list[int]:
    import mlx_lm

    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=tokens)]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_boyle_adapter_matches_stock_at_a_quarter_of_the_experts(tiny, arch):
    import mlx_lm  # boyle itself comes with the `test` extra (its `peers` extra)

    path = tiny(arch, num_experts=32)
    stock = _greedy(*mlx_lm.load(str(path)))
    model, tokenizer, info = peers.load_boyle(path, 8)
    assert info["wrapped_layers"] == info["moe_layers"] == 2
    assert info["slots_per_layer"] == [8]  # the slots asked for, not boyle's own choice
    assert _greedy(model, tokenizer) == stock
    counters = peers.boyle_stats(model)
    assert counters["misses"] > 0 and counters["layers"] == 2  # it really paged


def test_ours_cache_gb_gives_exactly_the_slots_asked_for(tiny):
    import outlier_runtime

    path = tiny("qwen3_moe", num_experts=32)
    pack_model(path)
    layout = peer_bench.expert_layout(path)
    assert layout["num_experts"] == [32, 32]
    for slots in (8, 16, 32):
        runtime = outlier_runtime.load("plus", model=str(path), force=True, k_override=slots,
                                       cache_gb=peer_bench.ours_cache_gb(layout, slots))
        try:
            config = runtime.engine_stats()["config"]
            assert config["slots_per_layer"] == slots
            # No RAM cache beyond one read in flight per slot: the same footing as boyle's slots.
            assert config["ram_cache_budget_bytes"] < slots * 2 * max(layout["expert_nbytes"]) + 2**16
        finally:
            runtime.close()


def test_peers_without_boyle_prints_one_line_and_skips_its_columns(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "peer_version", lambda: None)
    monkeypatch.setattr(peer_bench, "peer_version", lambda: None)
    out = tmp_path / "results"
    result = CliRunner().invoke(main, ["bench", "--peers", "--peer-model", "qwen3_moe", "--tokens", "4", "--repeat",
                                       "1", "--cache-dir", str(tiny_cache / "bench"), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("boyle is not installed") == 2  # the one line, and the note in the table
    (json_path,) = out.glob("peers-*.json")
    report = json.loads(json_path.read_text())
    assert report["config"]["peer_version"] is None and report["config"]["peer_skipped"]
    assert [row["fraction"] for row in report["summary"]] == [0.25, 0.5, 1.0]
    for row in report["summary"]:
        assert "boyle" not in row and "ours_vs_peer" not in row
        assert row["ours"]["tokens_identical_to_stock"] is True
        assert row["ours"]["slots_per_layer_seen"] == [str(row["slots_per_layer"])]
        assert row["ours"]["vs_stock"]["n"] == 1 and row["ours"]["vs_stock"]["median"] > 0
    by_fraction = {row["fraction"]: row["ours"] for row in report["summary"]}
    assert by_fraction[0.25]["hit_rate"]["median"] < 1.0  # it paged
    assert by_fraction[1.0]["hit_rate"] is None  # every expert resident: no lookups at all
    table = (out / f"{json_path.stem}.md").read_text()
    assert "| qwen3_moe | 25% | 8/32 | yes |" in table and "boyle / stock" not in table
    # The page-cache A/B: the same slots read buffered, dropping what was read or keeping it cached.
    assert set(report["config"]["ours_variants"]) == {"ours", "ours-buffered", "ours-pagecache"}
    for row in report["summary"]:
        for variant in ("ours-buffered", "ours-pagecache"):
            assert row[variant]["tokens_identical_to_stock"] is True
            assert row[variant]["slots_per_layer_seen"] == [str(row["slots_per_layer"])]
    quarter = next(row for row in report["summary"] if row["fraction"] == 0.25)
    assert quarter["ours"]["page_cache_after_bytes"] == 0 == quarter["ours-buffered"]["page_cache_after_bytes"]
    assert quarter["ours-pagecache"]["page_cache_after_bytes"] > 0  # its misses stayed cached
    assert "ours-pagecache tokens = stock" in table


def test_a_pack_in_an_old_format_is_stale(tiny, tmp_path):
    import shutil

    path = tmp_path / "model"
    shutil.copytree(tiny("qwen3_moe"), path)
    assert pack_is_stale(path)  # no pack at all
    pack_model(path)
    assert not pack_is_stale(path)
    index = path / PACK_DIR / "index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "format": 1}))
    assert pack_is_stale(path)
