"""The memory plan: its arithmetic, its agreement with mlx-lm and the engine, admission by it,
and a bound on peak memory that holds over a long paged generation."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import pytest
from click.testing import CliRunner
from mlx_lm.models.cache import make_prompt_cache

import outlier_runtime
from outlier_runtime import AdmissionError
from outlier_runtime.cli import main
from outlier_runtime.core import memory
from outlier_runtime.core.memory import GB, kv_cache_bytes, wired_limit_bytes
from outlier_runtime.engine.checkpoint import read_checkpoint
from outlier_runtime.engine.experts import build_expert_index, find_switch_modules
from outlier_runtime.engine.geometry import checkpoint_geometry
from outlier_paged_moe.memory import ExpertLayout, plan_paged
from outlier_paged_moe.options import PagedMoEOptions

MIB = 1 << 20
#: 4 MoE layers x 64 experts of 1 MiB each.
LAYOUT = ExpertLayout([64] * 4, [MIB] * 4, [MIB] * 4)


def plan(cache_gb, k_override=8, available=10 * GB, headroom=1 * GB, non_expert=1 * GB, kv=GB // 2):
    options = PagedMoEOptions(k_override=k_override, cache_gb=cache_gb)
    return plan_paged(options, LAYOUT, int(non_expert), int(kv), 4096, int(available), int(headroom))


# ------------------------------------------------------------------ arithmetic


def test_slots_come_first_then_the_ram_cache_gets_the_rest():
    budget = plan(0.05)  # 50 MB: 8 slots x (4 layers + 1 read buffer) x 1 MiB = 40 MiB fits
    assert budget.slots_per_layer == 8
    assert budget.cache_bytes == 50_000_000
    assert budget.ram_budget == 50_000_000 - 8 * 4 * MIB
    lines = {line.name: line.bytes for line in budget.plan.lines}
    assert lines == {"non-expert weights": GB, "KV cache": GB // 2, "expert slots": 8 * 4 * MIB,
                     "RAM cache + read buffers": 50_000_000 - 8 * 4 * MIB}
    assert budget.plan.total_bytes == GB + GB // 2 + 50_000_000
    assert budget.plan.fits and budget.plan.warnings == []


def test_a_budget_below_k_override_slots_gets_fewer_and_says_so():
    budget = plan(0.02)  # 20 MB holds 3 x 5 MiB
    assert budget.slots_per_layer == 3
    assert budget.plan.warnings == ["cache_gb = 0.02 GB holds 3 slots per layer, fewer than k_override = 8; "
                                    "raise cache_gb for more"]


def test_a_budget_below_one_slot_per_layer_is_a_problem_naming_the_knob():
    budget = plan(0.001)
    assert not budget.plan.fits
    assert budget.plan.problem == ("cache_gb = 0.001 GB is below one expert slot per layer with its read buffer "
                                   "(0.0052 GB for 4 MoE layers); raise paging.cache_gb or set it to \"auto\"")
    assert budget.slots_per_layer == 1  # what a forced load runs with


def test_auto_takes_what_memory_allows_after_headroom_weights_and_kv():
    tight = plan("auto", available=2.6 * GB)  # 2.6 - 1 headroom - 1 weights - 0.5 KV = 0.1 GB
    assert tight.cache_bytes == int(2.6 * GB) - GB - GB - GB // 2
    assert tight.plan.notes[0].startswith("cache_gb auto = 0.100 GB: 2.6 GB available - 1.0 GB headroom")
    assert tight.plan.fits
    roomy = plan("auto")  # everything cached is less than what is free: capped there
    everything = LAYOUT.everything_bytes(8)
    assert roomy.cache_bytes == everything == 8 * 4 * MIB + 4 * 56 * MIB + 8 * MIB
    assert roomy.plan.notes[0].endswith("capped at every expert cached")


def test_auto_with_no_room_left_is_a_problem():
    budget = plan("auto", available=2.5 * GB)
    assert not budget.plan.fits
    assert "below one expert slot per layer" in budget.plan.problem and "or free memory" in budget.plan.problem


def test_a_context_window_whose_kv_cache_alone_exceeds_memory_is_a_problem():
    budget = plan(0.05, kv=20 * GB)
    assert not budget.plan.fits
    assert budget.plan.problem.startswith("the KV cache of a 4096-token context window alone needs 20.00 GB")
    assert budget.plan.problem.endswith("lower generation.context_window")


def test_a_plan_that_does_not_fit_says_by_how_much():
    budget = plan(8.0, available=9 * GB)  # 1 + 0.5 + 8 + 1 headroom = 10.5 > 9
    assert not budget.plan.fits
    assert budget.plan.reason() == "plan 9.50 GB + 1.0 GB headroom = 10.50 GB does not fit in 9.0 GB available"


def test_the_wired_limit_covers_what_stays_resident_within_the_gpus_working_set():
    assert wired_limit_bytes(8 * GB, 48 * GB) == 8 * GB
    assert wired_limit_bytes(60 * GB, 48 * GB) == 48 * GB  # never above the recommended working set
    assert wired_limit_bytes(8 * GB, 48 * GB, current_limit=16 * GB) == 16 * GB  # never lowers a limit


def test_apply_wired_limit_asks_metal_and_does_nothing_elsewhere(monkeypatch):
    assert memory.apply_wired_limit(GB) is None  # this machine: CPU backend
    asked = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 3 * GB}, raising=False)
    monkeypatch.setattr(mx, "set_wired_limit", asked.append)
    assert memory.apply_wired_limit(5 * GB) == 3 * GB
    assert asked == [3 * GB]


# ------------------------------------------------------------------ the plan matches reality


def _cache_bytes(cache) -> int:
    total = 0
    for entry in cache:
        if hasattr(entry, "keys") and not callable(entry.keys):  # KVCache: its allocated buffers
            total += entry.keys.nbytes + entry.values.nbytes
        else:  # ArraysCache: the state arrays
            total += sum(a.nbytes for a in entry.cache if a is not None)
    return total


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe"])
@pytest.mark.parametrize("tokens", [5, 300])
def test_kv_estimate_equals_what_mlx_lm_allocates(tiny, arch, tokens):
    path = tiny(arch)
    model, _ = mlx_lm.load(str(path))
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1] * tokens]), cache=cache))
    geometry = checkpoint_geometry(path)
    assert kv_cache_bytes(geometry.config, tokens, geometry.activation_bytes) == _cache_bytes(cache)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe", "mixtral", "gpt_oss"])
def test_header_geometry_agrees_with_the_engines_expert_index(tiny, arch):
    path = tiny(arch)
    entries = read_checkpoint(path)
    model, _ = mlx_lm.load(str(path), lazy=True)
    index = build_expert_index(find_switch_modules(model), entries)
    geometry = checkpoint_geometry(path, entries)
    assert geometry.expert_nbytes == [layer.expert_nbytes for layer in index.layers]
    assert geometry.num_experts == index.layers[0].num_experts
    expert_bytes = sum(entries[name].nbytes for name in index.expert_tensor_names)
    assert geometry.non_expert_bytes == sum(e.nbytes for e in entries.values()) - expert_bytes


# ------------------------------------------------------------------ admission


def test_the_readme_python_example_is_admitted_without_force():
    # The README's example, on the embedded model: a paged tier needs what its plan says, not
    # the tier's headline min_ram_gb (32 GB x 1.15), so this 24 GB machine runs it.
    with outlier_runtime.load("plus", cache_gb=4, k_override=20, model="embedded:demo-moe") as rt:
        assert rt.memory_plan is not None and rt.memory_plan.fits
        result = rt.generate("def fibonacci(n):", chat=False, max_tokens=4, temperature=0)
        assert result.generation_tokens == 4
        config = result.engine["config"]
        assert config["memory_plan"]["fits"] and config["slots_per_layer"] == 20


def test_tiers_and_info_show_the_plan_when_the_model_is_on_disk(isolated_home):
    (isolated_home / "tiers").mkdir(parents=True)
    (isolated_home / "tiers" / "plus.toml").write_text('[model]\npath = "embedded:demo-moe"\n')
    rows = {row["name"]: row for row in json.loads(CliRunner().invoke(main, ["tiers", "--json"]).stdout)}
    plus = rows["plus"]["memory_plan"]
    assert rows["plus"]["runnable"] is True and plus["fits"] is True
    assert [line["name"] for line in plus["lines"]] == ["non-expert weights", "KV cache", "expert slots",
                                                        "RAM cache + read buffers"]
    assert rows["nano"]["memory_plan"] is None  # dense: min_ram_gb, as before
    info = CliRunner().invoke(main, ["info", "plus"]).stdout
    assert "# memory plan:" in info and "# - expert slots:" in info


@pytest.mark.parametrize("args, overrides, message", [
    (["--cache-gb", "0.0001"], {"cache_gb": 0.0001}, "is below one expert slot per layer"),
    (["--set", "generation.context_window=100000000000"], {"context_window": 100_000_000_000},
     "lower generation.context_window"),
])
def test_a_plan_that_cannot_work_is_one_line_and_nothing_loads(args, overrides, message):
    result = CliRunner().invoke(main, ["run", "plus", "hi", "--model", "embedded:demo-moe", *args])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert "--force" in result.stderr and "Traceback" not in result.output
    with pytest.raises(AdmissionError, match=message):
        outlier_runtime.load("plus", model="embedded:demo-moe", **overrides)


def test_force_still_lets_an_expert_try_a_cache_below_the_floor():
    with outlier_runtime.load("plus", model="embedded:demo-moe", cache_gb=0.0001, force=True) as rt:
        result = rt.generate("def f(", chat=False, max_tokens=2, temperature=0)
    assert result.engine["config"]["slots_per_layer"] == 1 and result.generation_tokens == 2


# ------------------------------------------------------------------ the bound at peak

SOAK = r"""
import gc, json, sys
import mlx.core as mx
import mlx_lm, outlier_runtime
from outlier_runtime.core.system import current_rss_bytes, peak_rss_bytes
path, warm, cache_gb, tokens = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
# The stated baseline: the process after one stock generation (mlx's and the tokenizer's first-use
# costs are paid), before the paged tier loads.
model, tokenizer = mlx_lm.load(warm)
mlx_lm.generate(model, tokenizer, "def f(x):", max_tokens=3)
del model, tokenizer
gc.collect(); mx.clear_cache()
baseline = current_rss_bytes()
runtime = outlier_runtime.load("plus", model=path, k_override=4, cache_gb=cache_gb, context_window=1024)
result = runtime.generate("import os\n\ndef walk(path):\n    for name in os.listdir(path):\n",
                          max_tokens=tokens, temperature=0.0, chat=False)
print(json.dumps({"baseline": baseline, "peak": peak_rss_bytes(), "plan": runtime.memory_plan.to_dict(),
                  "engine": result.engine, "tokens": result.generation_tokens}))
"""


def test_peak_rss_over_300_paged_tokens_stays_within_the_plan(tiny):
    # ~250 MB of experts against a 100 MB cache: a bound that only held at rest would fail here.
    path = tiny("qwen3_moe", hidden_size=512, num_experts=128, top_k=4, num_layers=4,
                moe_intermediate_size=512, seed=7)
    out = subprocess.run([sys.executable, "-c", SOAK, str(path), str(tiny("qwen3_moe")), "0.1", "300"],
                         capture_output=True, text=True, check=True, timeout=600)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["tokens"] == 300
    memory_use = report["engine"]["memory"]
    config = report["engine"]["config"]
    # The engine's own count of every expert byte it held, at its peak, is within cache_gb.
    assert memory_use["engine_bytes_peak"] <= config["cache_bytes"] == 100_000_000
    assert memory_use["over_budget_records"] == 0
    assert config["total_expert_bytes"] > 2 * config["cache_bytes"]
    # The process: non-expert weights + KV cache + cache_gb, plus 10%.
    planned = sum(line["gb"] for line in report["plan"]["lines"]) * GB
    assert report["peak"] - report["baseline"] <= 1.10 * planned, (report["peak"] - report["baseline"]) / 1e6


def test_the_server_serves_a_paged_tier_admitted_by_its_plan_not_its_headline_figure():
    # `outlier serve --tier plus --model embedded:demo-moe` without --force: Plus's headline
    # min_ram_gb (36.8 GB with slack) exceeds this machine, but its loader plans memory at load.
    from outlier_runtime.serve.model_host import ModelHost

    rows = {row["name"]: row for row in outlier_runtime.tiers()}
    assert rows["plus"]["admitted_by_plan"] is True and rows["nano"]["admitted_by_plan"] is False
    host = ModelHost(force=False)
    try:
        assert "plus" in [row["name"] for row in host.served_tiers()]
        assert host.tier_for("outlier-plus") == "plus"
    finally:
        host.close()
