"""Ratios and markdown tables of ``outlier bench`` and ``outlier sweep-k`` results.

Every ratio is computed from numbers of the same run (same machine, same minute), never
against a number measured elsewhere.
"""

from __future__ import annotations

from typing import Any

GB = 1e9

#: The issue's targets: (key, comparison, threshold, what it means).
TARGETS = (
    ("fanout_pack_vs_pread_decode", ">=", 2.0, "fanout+pack vs pread decode tok/s (when I/O-bound)"),
    ("fanout_pack_vs_pread_io_bound", ">=", 2.0,
     "the same with no compute: replay of each one's decode reads (pack+fanout vs shards+pread)"),
    ("fanout_pack_bandwidth_vs_disk_bound", ">=", 0.85, "fanout+pack read bandwidth / raw disk bound"),
    ("overlap_vs_min_bound", ">=", 0.80, "best paged tok/s / min(compute bound, I/O bound) tok/s"),
    ("resident_vs_stock_decode", ">=", 0.90, "paged, all experts resident / stock mlx-lm decode tok/s"),
    ("peak_rss_above_baseline_vs_budget_max", "<=", 1.10,
     "max over non-mmap paged configs of (peak RSS - pre-load RSS) / (non-expert + cache_gb)"),
    ("mlx_peak_vs_budget_max", "<=", 1.10,
     "max over non-mmap paged configs of mlx's peak memory / (non-expert + cache_gb)"),
    ("page_cache_after_vs_cache_max", "<=", 0.05,
     "max over non-mmap paged configs of page cache left on the checkpoint / cache_gb"),
)


def _first_run(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    result = results.get(name) or {}
    runs = result.get("runs")
    return runs[0] if runs else None


def _tps(results: dict[str, Any], name: str, key: str = "decode_tps") -> float | None:
    run = _first_run(results, name)
    return run[key] if run and run.get(key) else None


def _per_token(results: dict[str, Any], name: str, key: str) -> float | None:
    run = _first_run(results, name)
    if not run or "engine_decode" not in run or not run["token_seconds"]:
        return None
    return run["engine_decode"].get(key, 0) / len(run["token_seconds"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def bench_ratios(report: dict[str, Any]) -> dict[str, Any]:
    """The run's ratios, and each target with its measured value and whether it was met."""
    results = report["results"]
    fp, fpp = "paged-fanout-pack", "paged-fanout-pack-prefetch"
    ratios: dict[str, Any] = {
        "fanout_pack_vs_pread_decode": _ratio(_tps(results, fp), _tps(results, "paged-pread")),
        "fanout_vs_pread_decode": _ratio(_tps(results, "paged-fanout"), _tps(results, "paged-pread")),
        "mmap_vs_pread_decode": _ratio(_tps(results, "paged-mmap"), _tps(results, "paged-pread")),
        "prefetch_vs_fanout_pack_decode": _ratio(_tps(results, fpp), _tps(results, fp)),
        # What the decode ratio tends to when reads are all that is left (compute -> 0).
        "fanout_pack_vs_pread_read_time": _ratio(_per_token(results, "paged-pread", "read_seconds"),
                                                 _per_token(results, fp, "read_seconds")),
        "resident_vs_stock_decode": _ratio(_tps(results, "compute-bound"), _tps(results, "stock")),
        # The same two ratios on median token times (less sensitive to other jobs on the machine).
        "fanout_pack_vs_pread_decode_median": _ratio(_tps(results, fp, "decode_tps_median"),
                                                     _tps(results, "paged-pread", "decode_tps_median")),
        "resident_vs_stock_decode_median": _ratio(_tps(results, "compute-bound", "decode_tps_median"),
                                                  _tps(results, "stock", "decode_tps_median")),
    }
    for name in ("paged-pread", fp):
        run = _first_run(results, name)
        if run and run.get("token_seconds") and "engine_decode" in run:
            ratios[f"io_fraction_{name}"] = run["engine_decode"]["read_seconds"] / sum(run["token_seconds"])
    for name in (fp, fpp):
        # Each stalls a GPU pipeline; the goal is one per MoE layer per token, prefetcher on or off.
        ratios[f"host_syncs_per_token_{name}"] = _per_token(results, name, "host_syncs")
    disk = results.get("disk-bound") or {}
    fp_run = _first_run(results, fp)
    if "best" in disk and fp_run and "engine_decode" in fp_run:
        ratios["disk_bound_gbps"] = disk["best"]["gbps"]
        ratios["fanout_pack_read_gbps"] = fp_run["engine_decode"]["read_bandwidth_gbps"]
        ratios["fanout_pack_bandwidth_vs_disk_bound"] = _ratio(ratios["fanout_pack_read_gbps"], disk["best"]["gbps"])
    if disk.get("product_reads") and disk.get("seconds_per_token"):
        ratios["fanout_pack_vs_pread_io_bound"] = disk["product_reads"]["seconds_per_token"] / disk["seconds_per_token"]
    compute_tps = _tps(results, "compute-bound")
    io_tps = 1 / disk["seconds_per_token"] if disk.get("seconds_per_token") else None
    ratios["compute_bound_tps"], ratios["io_bound_tps"] = compute_tps, io_tps
    if compute_tps and io_tps:
        best_name = max((n for n in (fp, fpp) if _tps(results, n)), key=lambda n: _tps(results, n), default=None)
        ratios["min_bound_tps"] = min(compute_tps, io_tps)
        ratios["no_overlap_tps"] = 1 / (1 / compute_tps + 1 / io_tps)  # reads and compute one after another
        ratios["overlap_best_config"] = best_name
        ratios["overlap_vs_min_bound"] = (_ratio(_tps(results, best_name), ratios["min_bound_tps"])
                                          if best_name else None)
    rss = {}
    cache_gb = report["config"]["cache_gb"]
    for name, result in results.items():
        runs = result.get("runs") or []
        if result.get("kind") != "paged" or not runs or "engine_config" not in runs[0]:
            continue
        budget = runs[0]["engine_config"]["non_expert_bytes"] + cache_gb * GB
        page_cache = result.get("page_cache_after_bytes")
        rss[name] = {
            "mmap": runs[0]["engine_config"].get("reader") == "mmap",
            "peak_rss_bytes": result["peak_rss_bytes"],
            "baseline_rss_bytes": result["baseline_rss_bytes"],
            "mlx_peak_memory_bytes": result.get("mlx_peak_memory_bytes"),
            "engine_bytes_peak": (runs[0].get("engine_memory") or {}).get("engine_bytes_peak"),
            "budget_bytes": budget,
            "ratio": result["peak_rss_bytes"] / budget,
            "ratio_above_baseline": (result["peak_rss_bytes"] - result["baseline_rss_bytes"]) / budget,
            "mlx_ratio": (result["mlx_peak_memory_bytes"] / budget) if result.get("mlx_peak_memory_bytes") else None,
            "page_cache_after_bytes": page_cache,
            "page_cache_vs_cache": page_cache / (cache_gb * GB) if page_cache is not None else None,
        }
    ratios["peak_rss"] = rss
    bounded = [r for r in rss.values() if not r["mmap"]]  # mmap pages through the page cache by design

    def worst(key: str) -> float | None:
        return max((r[key] for r in bounded if r[key] is not None), default=None)

    ratios["peak_rss_vs_budget_max"] = worst("ratio")
    ratios["peak_rss_above_baseline_vs_budget_max"] = worst("ratio_above_baseline")
    ratios["mlx_peak_vs_budget_max"] = worst("mlx_ratio")
    ratios["page_cache_after_vs_cache_max"] = worst("page_cache_vs_cache")
    stock = _first_run(results, "stock")
    ratios["tokens_match_stock"] = {
        name: (run["tokens"] == stock["tokens"]) for name in results
        if stock and (run := _first_run(results, name)) is not None
    }
    targets = []
    for key, op, threshold, meaning in TARGETS:
        value = ratios.get(key)
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        targets.append({"key": key, "meaning": meaning, "target": f"{op} {threshold}", "value": value, "met": met})
    ratios["targets"] = targets
    return ratios


def _gb(value: float | None) -> float | None:
    return None if value is None else value / GB


def _f(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def bench_markdown(report: dict[str, Any], json_name: str) -> str:
    """A markdown summary of a bench report: configurations, ratios against targets, disk sweep."""
    cfg, machine, results, ratios = report["config"], report["machine"], report["results"], report["ratios"]
    geometry = cfg["geometry"]
    lines = [
        f"# outlier bench, {report['timestamp']}",
        "",
        f"Provenance: `{json_name}` (same directory). Command: `{report['command']}`; "
        f"commit `{report.get('git_commit') or 'unknown'}`.",
        f"Machine: {machine['cpu']}, {machine['cpu_count']} CPUs, {machine['ram_bytes'] / GB:.1f} GB RAM, "
        f"{machine['platform']}; disk {report['disk'].get('device', '?')} ({report['disk'].get('fs_type', '?')}), "
        f"O_DIRECT {'yes' if report['disk'].get('o_direct') else 'no'}.",
        f"Model: {geometry['arch']}, {geometry['num_layers']} MoE layers x {geometry['num_experts']} experts "
        f"(hidden {geometry['hidden_size']}, expert {geometry['moe_intermediate_size']}, top-{geometry['top_k']}, "
        f"4-bit, {cfg['expert_bytes'] / 2**20:.2f} MiB/expert, {cfg['total_expert_bytes'] / GB:.2f} GB of experts). "
        f"K={cfg['k_override']}, cache_gb={cfg['cache_gb']:.3f}; {cfg['decode_tokens']} tokens, greedy, "
        f"cold page cache before each configuration.",
        "",
        "| config | decode tok/s | median tok/s | TTFT s | decode hit rate | MB read/token | read ms/token | read GB/s "
        "| peak RSS GB | mlx peak GB | reader I/O | tokens = stock |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, result in results.items():
        if "error" in result:
            lines.append(f"| {name} | failed: {result['error']} | | | | | | | | | | |")
            continue
        if result.get("kind") == "disk":
            best = result["best"]
            lines.append(f"| {name} (no compute) | {_f(1 / result['seconds_per_token'])} | | | | "
                         f"{result['bytes'] / result['decode_intervals'] / 1e6:.1f} | "
                         f"{result['seconds_per_token'] * 1e3:.1f} | {best['gbps']:.2f} | "
                         f"{result['peak_rss_bytes'] / GB:.2f} | - | {best['label']} | |")
            continue
        run = result["runs"][0]
        decode = run.get("engine_decode") or {}
        n = max(len(run["token_seconds"]), 1)
        io = (run.get("engine_config") or {}).get("reader_io") or {}
        match = ratios["tokens_match_stock"].get(name)
        lines.append(
            f"| {name} | {run['decode_tps']:.3f} | {_f(run.get('decode_tps_median'), '.3f')} | "
            f"{_f(run['ttft_seconds'])} | "
            f"{_f(decode.get('hit_rate'), '.1%') if decode else '-'} | "
            f"{decode.get('bytes_read', 0) / n / 1e6:.1f} | {decode.get('read_seconds', 0) / n * 1e3:.1f} | "
            f"{_f(decode.get('read_bandwidth_gbps')) if decode.get('read_seconds') else '-'} | "
            f"{result['peak_rss_bytes'] / GB:.2f} | {_f(_gb(result.get('mlx_peak_memory_bytes')))} | "
            f"{io.get('io_mode', '-') if decode else '-'} | "
            f"{'-' if match is None else ('yes' if match else 'NO')} |"
        )
    for name, why in cfg.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} | | | | | | | | | | |")
    lines += ["", "| target | measured | goal | met |", "|---|---:|---|---|"]
    for target in ratios["targets"]:
        met = {True: "yes", False: "no", None: "n/a"}[target["met"]]
        lines.append(f"| {target['meaning']} | {_f(target['value'], '.3f')} | {target['target']} | {met} |")
    lines += ["", "Other ratios (same run):", ""]
    for key in ("fanout_pack_vs_pread_decode_median", "resident_vs_stock_decode_median", "fanout_vs_pread_decode",
                "mmap_vs_pread_decode", "prefetch_vs_fanout_pack_decode",
                "fanout_pack_vs_pread_read_time", "io_fraction_paged-pread", "io_fraction_paged-fanout-pack",
                "compute_bound_tps", "io_bound_tps", "no_overlap_tps", "disk_bound_gbps", "fanout_pack_read_gbps",
                "peak_rss_vs_budget_max"):
        if ratios.get(key) is not None:
            lines.append(f"- `{key}`: {ratios[key]:.3f}")
    disk = results.get("disk-bound") or {}
    if disk.get("sweep"):
        lines += ["", "Raw disk replay (no compute, cold each time) of the decode reads of paged-fanout-pack "
                  f"({disk['batches']} batches, {disk['bytes'] / 1e6:.0f} MB: one aligned read per expert) and of "
                  "paged-pread (the same experts as nine unaligned shard ranges each):", "",
                  "| trace | reader | requests | GB/s | s | I/O mode |", "|---|---|---:|---:|---:|---|"]
        for row in disk["sweep"]:
            lines.append(f"| {row.get('trace', '')} | {row['label']} | {row.get('requests', '')} | {row['gbps']:.2f} "
                         f"| {row['seconds']:.2f} | {row['io'].get('io_mode', '-')} |")
    return "\n".join(lines) + "\n"


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    """K_SWEEP_RESULTS.md: one row per K, with where the numbers came from."""
    if not rows:
        return "# K sweep\n\nNo K was run.\n"
    first = rows[0]
    g = first["geometry"]
    lines = [
        "# K sweep (outlier sweep-k)",
        "",
        f"{first['timestamp']}; command `{first['command']}`; commit `{first.get('git_commit') or 'unknown'}`; "
        f"{first['machine']['cpu']}, {first['machine']['ram_bytes'] / GB:.1f} GB RAM.",
        f"Model: {g['arch']}, {g['num_layers']} layers x {g['num_experts']} experts, top-{g['top_k']}, hidden "
        f"{g['hidden_size']}, expert {g['moe_intermediate_size']}; reader {first['reader']}; "
        f"{first['decode_tokens']} greedy tokens per prompt, {len(first['prompts'])} prompt(s), one process per K, "
        "cold page cache before each prompt. Raw data: `k_sweep_K<n>.json`.",
        "",
        "| K | slots/layer | cache_gb | decode tok/s | peak RSS GB | decode hit rate | agreement with stock |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        result = row["result"]
        if "error" in result:
            lines.append(f"| {row['k']} | failed: {result['error']} | | | | | |")
            continue
        runs = result["runs"]
        tps = sum(r["decode_tps"] for r in runs) / len(runs)
        hits = [r["engine_decode"]["hit_rate"] for r in runs if "engine_decode" in r]
        slots = runs[0].get("engine_config", {}).get("slots_per_layer")
        agreement = row["token_agreement_vs_stock"]
        lines.append(f"| {row['k']} | {slots} | {row['cache_gb']:.3f} | {tps:.3f} | "
                     f"{result['peak_rss_bytes'] / GB:.2f} | {_f(sum(hits) / len(hits) if hits else None, '.1%')} | "
                     f"{_f(agreement, '.1%') if agreement is not None else 'no reference'} |")
    stock = first.get("stock_reference") or {}
    if stock.get("runs"):
        tps = sum(r["decode_tps"] for r in stock["runs"]) / len(stock["runs"])
        lines += ["", f"Stock mlx-lm (all resident): {tps:.3f} tok/s decode, "
                  f"peak RSS {stock['peak_rss_bytes'] / GB:.2f} GB."]
    return "\n".join(lines) + "\n"
