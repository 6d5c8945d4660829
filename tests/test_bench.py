"""`outlier bench`, `outlier sweep-k` and `outlier pack` run end to end and leave provenance behind."""

from __future__ import annotations

import json
import shutil
import time
from collections import namedtuple

import pytest
from click.testing import CliRunner

from outlier_runtime.bench import model as bench_model
from outlier_runtime.bench.runner import CONFIGS, choose_geometry
from outlier_runtime.core.system import git_commit
from outlier_runtime.bench.model import FULL, Geometry
from outlier_runtime.cli import main


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-models")


def _invoke(*args):
    result = CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_bench_quick_end_to_end(bench_cache, tmp_path):
    out = tmp_path / "results"
    started = time.perf_counter()
    result = _invoke("bench", "--quick", "--tokens", 4, "--cache-dir", bench_cache, "--out", out)
    elapsed = time.perf_counter() - started
    assert elapsed < 100, f"--quick took {elapsed:.0f} s"

    (json_path,) = out.glob("*.json")
    (md_path,) = out.glob("*.md")
    assert json_path.stem == md_path.stem
    report = json.loads(json_path.read_text())
    for key in ("timestamp", "command", "git_commit", "machine", "os", "disk", "config", "results", "ratios"):
        assert key in report, key
    assert report["command"].startswith("outlier bench --quick")
    assert report["machine"]["versions"]["mlx"] and report["machine"]["cpu_count"]
    assert report["config"]["geometry"]["num_experts"] == choose_geometry(quick=True).num_experts

    results = report["results"]
    assert set(results) | set(report["config"]["skipped"]) == set(CONFIGS)
    for name, config in results.items():
        assert "error" not in config, (name, config.get("traceback"))
        if config["kind"] == "disk":
            assert config["best"]["gbps"] > 0 and config["sweep"]
            continue
        run = config["runs"][0]
        assert len(run["tokens"]) == 4 and len(run["token_seconds"]) == 3
        assert config["peak_rss_bytes"] > 0
    # Every paged configuration is exact: the same greedy tokens as stock mlx-lm.
    assert all(report["ratios"]["tokens_match_stock"].values())
    decode = results["paged-fanout-pack"]["runs"][0]["engine_decode"]
    assert results["compute-bound"]["runs"][0]["engine_decode"]["misses"] == 0
    assert decode["lookups"] > 0
    targets = {t["key"] for t in report["ratios"]["targets"]}
    assert targets >= {"fanout_pack_vs_pread_decode", "resident_vs_stock_decode"}

    table = md_path.read_text()
    assert "| paged-fanout-pack |" in table and json_path.name in table
    assert "| paged-pread |" in result.output  # the table is printed too


def test_sweep_k_writes_its_files(bench_cache, tmp_path):
    out = tmp_path / "sweep"
    _invoke("sweep-k", "--quick", "--k", 2, "--k", 8, "--tokens", 3, "--cache-dir", bench_cache, "--out", out)
    table = (out / "K_SWEEP_RESULTS.md").read_text()
    for k in (2, 8):
        record = json.loads((out / f"k_sweep_K{k}.json").read_text())
        assert record["k"] == k and "error" not in record["result"]
        assert record["token_agreement_vs_stock"] == 1.0  # exact at any K
        assert "git_commit" in record and record["machine"]["versions"]
        assert f"| {k} |" in table


def test_bench_refuses_without_disk_space(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(bench_model.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 10**9, 10**9))
    result = CliRunner().invoke(main, ["bench", "--cache-dir", str(tmp_path / "models"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "needs" in result.output and "GB free" in result.output and "--layers" in result.output
    assert not list((tmp_path / "models").iterdir())


def test_full_geometry_is_the_plus_tiers_experts():
    assert (FULL.hidden_size, FULL.moe_intermediate_size, FULL.num_experts, FULL.top_k) == (4096, 1024, 512, 10)
    # 3 projections of 4096x1024 at 4 bits, plus float32 scales and biases per group of 64.
    assert FULL.expert_bytes == 3 * (4096 * 1024 // 2 + 2 * 4 * 4096 * 1024 // 64)
    assert choose_geometry(layers=3).num_layers == 3
    with pytest.raises(bench_model.BenchError):
        Geometry(top_k=20, base_experts=16).check()


def test_pack_command_prints_a_summary(tiny, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny("qwen3_moe"), model)
    result = _invoke("pack", model, "--json")
    summary = json.loads(result.output)
    assert (model / "experts-pack" / "index.json").exists()
    assert summary["file_count"] == len(summary["files"]) >= 2
    assert summary["bytes"] == sum((model / "experts-pack" / p.split("/")[-1]).stat().st_size for p in summary["files"])
    assert summary["seconds"] >= 0


def test_git_commit_is_read_without_git():
    commit = git_commit()
    assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)


def test_every_configuration_repeats_so_ratios_compare_fastest_rounds():
    from outlier_runtime.bench.runner import round_plan

    names = ["stock", "paged-fanout-pack", "disk-bound", "compute-bound"]
    plan = round_plan(names, 2)
    # Stock and the compute bound too: a bound measured once moves with the load it met.
    assert plan == [(0, n) for n in names] + [(1, n) for n in names]
    assert round_plan(names, 1) == [(0, n) for n in names]
