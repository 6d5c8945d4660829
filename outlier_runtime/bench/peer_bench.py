"""``outlier bench --peers``: our paged engine beside the exact peer boyle, both against stock mlx-lm.

Models: the bench's Plus-geometry model (``--quick``: its small geometry) and small
qwen3_5_moe / qwen3_moe / mixtral models from tiny_models, 32 experts each (boyle never keeps
fewer than 8 slots, so 25% of 32 is the smallest fraction both engines can run at equal slots).
Fractions: 25%, 50% and 100% of each layer's experts in slots, the same count for both engines;
ours gets only the memory its slots and their reads need (no RAM cache beyond that).

Protocol, the bench's: every run is a fresh process forked from the bench's fork server,
the page cache of every shard and pack file is dropped before the process starts and again
before its timed generation, and the run decodes the same greedy tokens (end-of-sequence
banned). Rounds interleave: each round runs stock and then every (engine, fraction) of a model,
the order reversed on odd rounds, and a ratio is an engine's decode tok/s over stock's in the
same round. The table reports each ratio's median and its spread (min-max) over the rounds.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from outlier_runtime.bench.model import GB, Geometry, benchmark_model, model_files, pack_is_stale
from outlier_runtime.bench.peers import PEER, absent_note, peer_version
from outlier_runtime.bench.runner import WARMUP_PROMPT, _build_progress, _configurations, default_cache_dir, warm_model
from outlier_runtime.bench.worker import evict
from outlier_runtime.core.system import provenance
from outlier_runtime.engine.buffers import DEFAULT_ALIGNMENT, DIRECT_IO_ALIGNMENT

FRACTIONS = (0.25, 0.5, 1.0)
TINY_ARCHS = ("qwen3_5_moe", "qwen3_moe", "mixtral")
TINY_EXPERTS = 32
#: Ours: the Plus tier as shipped (its reader, cache policy and the expert pack), only the
#: slots and cache_gb set. Options added here override the tier's.
OURS_LOAD: dict[str, Any] = {}
#: Our engine as it runs in the comparison, and two variants that isolate the page cache's part in
#: it: the same buffered reads through the fanout reader, once dropping what they read (as the
#: product does) and once leaving it cached as boyle's mmap reads do on Linux
#: (``keep_page_cache``: memory outside the memory plan, so never the product's setting).
OURS_VARIANTS: dict[str, dict[str, Any]] = {
    "ours": OURS_LOAD,
    "ours-buffered": {"reader": "fanout", "reader_options": {"direct": False}},
    "ours-pagecache": {"reader": "fanout", "reader_options": {"direct": False, "keep_page_cache": True}},
}
MODELS = ("plus-geometry", *TINY_ARCHS)

Echo = Callable[[str], None]


@dataclass
class PeerBenchOptions:
    geometry: Geometry
    tokens: int = 64
    rounds: int = 5
    prompt: str = "def fibonacci(n):"
    fractions: tuple[float, ...] = FRACTIONS
    models: tuple[str, ...] | None = None  # None: the Plus-geometry model and every tiny one
    cache_dir: Path | None = None
    out_dir: Path = Path("bench-results")
    timeout_s: float = 900.0
    command: str = ""
    peers: bool = field(default=True)
    variants: tuple[str, ...] = tuple(OURS_VARIANTS)  # which of OURS_VARIANTS run ("ours" always does)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def expert_layout(model_dir: Path) -> dict[str, Any]:
    """Per MoE layer: experts and bytes of one expert, from the checkpoint headers (no weights read)."""
    from outlier_runtime.engine.checkpoint import read_checkpoint
    from outlier_runtime.engine.experts import build_expert_index, find_switch_modules
    from outlier_runtime.engine.lazy_load import load_lazily

    entries = read_checkpoint(model_dir)
    model, _ = load_lazily(model_dir, entries)
    index = build_expert_index(find_switch_modules(model), entries)
    return {"num_experts": [layer.num_experts for layer in index.layers],
            "expert_nbytes": [layer.expert_nbytes for layer in index.layers]}


def ours_cache_gb(layout: dict[str, Any], slots: int) -> float:
    """The smallest cache_gb that gives ``slots`` per layer: the slots plus one read in flight each."""
    row = sum(layout["expert_nbytes"])
    # A pack record is read whole, its length rounded up to the pack alignment (and the pool's stride).
    record = _round_up(_round_up(max(layout["expert_nbytes"]), DEFAULT_ALIGNMENT), DIRECT_IO_ALIGNMENT)
    return slots * (row + record) * 1.001 / GB


def peer_models(options: PeerBenchOptions, echo: Echo) -> dict[str, Path]:
    """name -> model directory (checkpoint and our pack), built and cached on first use."""
    from outlier_runtime.engine.pack import pack_model
    from outlier_runtime.testing.tiny_models import tiny_model

    cache_dir = options.cache_dir or default_cache_dir()
    wanted = options.models or MODELS
    models: dict[str, Path] = {}
    for name in wanted:
        if name == "plus-geometry":
            models[name] = benchmark_model(options.geometry, cache_dir, _build_progress(echo))
            continue
        path = tiny_model(name, num_experts=TINY_EXPERTS, cache_dir=cache_dir / "peer-models")
        if pack_is_stale(path):
            pack_model(path)
        models[name] = path
    return models


def _spec(kind: str, model: Path, files: list[Path], options: PeerBenchOptions, slots: int | None,
          layout: dict[str, Any], warm: Path, name: str, engine: str = "ours") -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": kind, "name": name, "model": str(model), "files": [str(f) for f in files],
                            "prompt": options.prompt, "warmup_prompt": WARMUP_PROMPT, "tokens": options.tokens,
                            "warm_model": str(warm)}
    if kind == "paged":
        spec["load"] = {**OURS_VARIANTS[engine], "k_override": slots, "cache_gb": ours_cache_gb(layout, slots)}
    elif kind == "peer":
        spec["peer"] = PEER
        spec["slots_per_layer"] = slots
    return spec


def _slots(layout: dict[str, Any], fraction: float) -> int:
    return max(1, round(max(layout["num_experts"]) * fraction))


def _row_of(result: dict[str, Any]) -> dict[str, Any]:
    """What one run contributes to the summary."""
    if "error" in result:
        return {"error": result["error"]}
    run = result["runs"][0]
    row = {"decode_tps": run["decode_tps"], "decode_tps_median": run["decode_tps_median"],
           "tokens": run["tokens"], "peak_rss_bytes": result["peak_rss_bytes"],
           "baseline_rss_bytes": result["baseline_rss_bytes"], "load_seconds": result["load_seconds"],
           # Checkpoint bytes the run left in the OS page cache (fincore): memory outside its RSS.
           "page_cache_after_bytes": result.get("page_cache_after_bytes")}
    if "engine_decode" in run:
        decode = run["engine_decode"]
        row["slots_per_layer"] = run.get("engine_config", {}).get("slots_per_layer")
        row["ram_cache_budget_bytes"] = run.get("engine_config", {}).get("ram_cache_budget_bytes")
        # No lookups (every expert resident: the original module ran) is no hit rate, not 0.
        row["hit_rate"] = decode.get("hit_rate") if decode.get("lookups") else None
        row["read_seconds"] = decode.get("read_seconds")
    if "peer" in result:
        row["peer"] = result["peer"]
        row["slots_per_layer"] = result["peer"]["slots_per_layer"]
        row["hit_rate"] = result.get("peer_decode", {}).get("hit_rate")
    return row


def run_peer_bench(options: PeerBenchOptions, echo: Echo = lambda s: None) -> tuple[Path, Path, dict[str, Any]]:
    """Run the comparison and write ``<out>/peers-<timestamp>.json`` and ``.md``."""
    started = time.perf_counter()
    version = peer_version() if options.peers else None
    if options.peers and version is None:
        echo(absent_note())
    ours = ["ours"] + [v for v in options.variants if v != "ours" and v in OURS_VARIANTS]
    engines = ours + ([PEER] if version else [])
    cache_dir = options.cache_dir or default_cache_dir()
    models = peer_models(options, echo)
    warm = warm_model(cache_dir)
    layouts = {name: expert_layout(path) for name, path in models.items()}
    raw: dict[str, list[dict[str, Any]]] = {}
    with _configurations(options.timeout_s) as (run_config, scratch):
        for number in range(options.rounds):
            for model_name, path in models.items():
                files = model_files(path)
                layout = layouts[model_name]
                plan: list[tuple[str, str, float | None]] = [("stock", "stock", None)]
                plan += [(engine, "peer" if engine == PEER else "paged", f)
                         for f in options.fractions for engine in engines]
                if number % 2:
                    plan.reverse()
                for engine, kind, fraction in plan:
                    key = f"{model_name}/{engine}" + (f"/{fraction:g}" if fraction is not None else "")
                    slots = _slots(layout, fraction) if fraction is not None else None
                    spec = _spec(kind, path, files, options, slots, layout, warm,
                                 f"r{number}-{key.replace('/', '-')}", engine)
                    evict(files)
                    result = run_config(spec)
                    raw.setdefault(key, []).append({"round": number, **_row_of(result)})
                    last = raw[key][-1]
                    echo(f"[round {number + 1}/{options.rounds}] {key}: "
                         + (f"FAILED ({last['error']})" if "error" in last else f"{last['decode_tps']:.1f} tok/s"))
    summary = summarize(raw, models, layouts, engines, options)
    report = {
        "schema": 1,
        **provenance(options.command),
        "config": {
            "geometry": asdict(options.geometry), "tokens": options.tokens, "rounds": options.rounds,
            "prompt": options.prompt, "fractions": list(options.fractions), "tiny_experts": TINY_EXPERTS,
            "ours_load": OURS_LOAD, "ours_variants": {name: OURS_VARIANTS[name] for name in ours},
            "peer": PEER, "peer_version": version,
            "peer_skipped": None if version else absent_note(),
            "models": {name: str(path) for name, path in models.items()}, "layouts": layouts,
            "protocol": __doc__.split("\n\n", 2)[2].strip(),
        },
        "summary": summary,
        "raw": raw,
        "elapsed_seconds": time.perf_counter() - started,
    }
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path, md_path = out_dir / f"peers-{stamp}.json", out_dir / f"peers-{stamp}.md"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    md_path.write_text(peer_markdown(report, json_path.name))
    return json_path, md_path, report


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(raw: dict[str, list[dict[str, Any]]], models: dict[str, Path], layouts: dict[str, Any],
              engines: list[str], options: PeerBenchOptions) -> list[dict[str, Any]]:
    """Per model and fraction: tokens identical to stock, ratios to stock (per round), peak RSS."""
    rows = []
    for model_name in models:
        stock = {r["round"]: r for r in raw.get(f"{model_name}/stock", []) if "error" not in r}
        for fraction in options.fractions:
            row: dict[str, Any] = {"model": model_name, "fraction": fraction,
                                   "slots_per_layer": _slots(layouts[model_name], fraction),
                                   "experts_per_layer": max(layouts[model_name]["num_experts"])}
            per_round: dict[str, dict[int, float]] = {}
            for engine in engines:
                runs = raw.get(f"{model_name}/{engine}/{fraction:g}", [])
                good = [r for r in runs if "error" not in r and r["round"] in stock]
                ratios = {r["round"]: r["decode_tps"] / stock[r["round"]]["decode_tps"] for r in good}
                per_round[engine] = ratios
                row[engine] = {
                    "tokens_identical_to_stock": bool(good) and all(
                        r["tokens"] == stock[r["round"]]["tokens"] for r in good),
                    "vs_stock": _spread(list(ratios.values())),
                    "decode_tps": _spread([r["decode_tps"] for r in good]),
                    "peak_rss_bytes": max((r["peak_rss_bytes"] for r in good), default=None),
                    "peak_rss_above_baseline_bytes": max(
                        (r["peak_rss_bytes"] - r["baseline_rss_bytes"] for r in good), default=None),
                    "page_cache_after_bytes": max((r["page_cache_after_bytes"] or 0 for r in good), default=None),
                    "slots_per_layer_seen": sorted({str(r.get("slots_per_layer")) for r in good}),
                    "hit_rate": _spread([r["hit_rate"] for r in good if r.get("hit_rate") is not None]),
                    "errors": [r["error"] for r in runs if "error" in r],
                }
            if PEER in engines:
                for engine in engines[:-1]:
                    both = [per_round[engine][n] / per_round[PEER][n] for n in per_round[engine] if n in per_round[PEER]]
                    row[engine]["vs_peer"] = _spread(both)
                row["ours_vs_peer"] = row["ours"]["vs_peer"]
            row["stock_decode_tps"] = _spread([r["decode_tps"] for r in stock.values()])
            row["stock_peak_rss_bytes"] = max((r["peak_rss_bytes"] for r in stock.values()), default=None)
            rows.append(row)
    return rows


def _ratio(cell: dict[str, float] | None) -> str:
    if not cell:
        return "-"
    return f"{cell['median']:.2f} ({cell['min']:.2f}-{cell['max']:.2f})"


def peer_markdown(report: dict[str, Any], json_name: str) -> str:
    """The comparison table: one row per model and fraction, a column group per engine."""
    config = report["config"]
    peer = config["peer"] if config["peer_version"] else None
    ours = list(config.get("ours_variants") or {"ours": {}})
    engines = ours + ([peer] if peer else [])
    head = ["model", "cached", "slots"]
    for engine in engines:
        head += [f"{engine} tokens = stock", f"{engine} / stock"]
    if peer:
        head += [f"{engine} / {peer}" for engine in ours]
    head += ["peak RSS GB stock / " + " / ".join(engines), "page cache left MB " + " / ".join(engines)]
    lines = [f"# outlier bench --peers ({json_name})", "",
             f"{config['tokens']} greedy tokens, {config['rounds']} interleaved rounds; ratios of decode tok/s "
             "to stock in the same round: median (min-max).", ""]
    if not peer:
        lines += [f"{config['peer_skipped']}.", ""]
    if len(ours) > 1:
        lines += ["Our variants' load options (over the Plus tier's): "
                  + "; ".join(f"{name} {json.dumps(config['ours_variants'][name])}" for name in ours) + ".", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["summary"]:
        cells = [row["model"], f"{row['fraction']:.0%}", f"{row['slots_per_layer']}/{row['experts_per_layer']}"]
        for engine in engines:
            cells += ["yes" if row[engine]["tokens_identical_to_stock"] else "NO", _ratio(row[engine]["vs_stock"])]
        if peer:
            cells += [_ratio(row[engine].get("vs_peer")) for engine in ours]
        rss = [row.get("stock_peak_rss_bytes")] + [row[engine]["peak_rss_bytes"] for engine in engines]
        cells.append(" / ".join(f"{v / GB:.2f}" if v else "-" for v in rss))
        cached = [row[engine]["page_cache_after_bytes"] for engine in engines]
        cells.append(" / ".join("-" if v is None else f"{v / 1e6:.1f}" for v in cached))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
