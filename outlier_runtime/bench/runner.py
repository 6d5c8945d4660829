"""``outlier bench`` and ``outlier sweep-k``: measured, reproducible, with provenance.

Every configuration runs in a fresh subprocess (so its peak RSS is its own) on the same
prompt and token count, after the page cache of every checkpoint and pack file was dropped
(``posix_fadvise(DONTNEED)``), so each one starts cold. Results, raw per-token timings and
the machine they came from go to ``<out>/<timestamp>.json``; a markdown table goes next to it.

    outlier bench --quick          # small geometry, well under two minutes
    outlier bench --layers 2       # the Plus tier's expert geometry, two layers deep

This module plans configurations and writes reports; ``bench_worker`` runs a configuration,
``bench_model`` builds the benchmark checkpoint, ``bench_report`` computes ratios and tables.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from outlier_runtime.bench.model import FULL, GB, QUICK, BenchError, Geometry, benchmark_model, model_files
from outlier_runtime.bench.worker import ForkServer, evict
from outlier_runtime.core.system import provenance
from outlier_runtime.engine.buffers import DIRECT_IO_ALIGNMENT
from outlier_runtime.engine.platform_io import current_platform_io

PROMPT = "def fibonacci(n):"
WARMUP_PROMPT = "import os"
PREFETCHER = "next-layer-router"
#: Extra RAM cache beyond the slots, as a fraction of the slots' bytes (default cache_gb).
RAM_CACHE_FRACTION = 0.5

Echo = Callable[[str], None]


@dataclass
class BenchOptions:
    """What ``outlier bench`` runs."""

    geometry: Geometry = FULL
    tokens: int = 24
    prompt: str = PROMPT
    k_override: int = 20
    cache_gb: float | None = None  # default: slots of k_override experts per layer, plus RAM_CACHE_FRACTION
    cache_dir: Path | None = None
    out_dir: Path = Path("bench-results")
    configs: tuple[str, ...] | None = None  # None: all
    reader_options: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 900.0
    command: str = ""
    #: Rounds of every configuration (see round_plan); each reports its fastest round.
    repeat: int = 1

    def slot_cache_gb(self, k: int) -> float:
        g = self.geometry
        return min(k, g.num_experts) * g.num_layers * g.expert_bytes * (1 + RAM_CACHE_FRACTION) / GB

    @property
    def effective_cache_gb(self) -> float:
        return self.cache_gb if self.cache_gb is not None else self.slot_cache_gb(self.k_override)


def choose_geometry(quick: bool = False, layers: int | None = None) -> Geometry:
    """The Plus tier's expert geometry (or the --quick one), ``layers`` MoE layers deep."""
    base = QUICK if quick else FULL
    if layers is not None and layers < 1:
        raise BenchError(f"--layers {layers}: need at least one MoE layer")
    return replace(base, num_layers=layers) if layers else base


#: What "pre-load RSS" means in every result: memory targets are measured above it.
BASELINE = ("RSS of the configuration's process after one 3-token stock generation on a tiny model "
            "(mlx's, mlx-lm's and the tokenizer's first-use costs paid, that model freed), before loading")


def warm_model(cache_dir: Path) -> Path:
    """The tiny model each configuration's process warms up on before its baseline is taken."""
    from outlier_runtime.testing.tiny_models import build_tiny_model

    path = cache_dir / "warmup-qwen3_moe"
    return path if (path / "config.json").is_file() else build_tiny_model(path, "qwen3_moe", seed=1)


def default_cache_dir() -> Path:
    """``$OUTLIER_HOME/bench-models``, else ``~/.cache/outlier-runtime/bench-models``."""
    home = os.environ.get("OUTLIER_HOME")
    return Path(home) / "bench-models" if home else Path.home() / ".cache" / "outlier-runtime" / "bench-models"


# ---------------------------------------------------------------------------- provenance


def disk_info(path: Path) -> dict[str, Any]:
    """The filesystem holding ``path``: type, device, size, free space, and O_DIRECT support."""
    path = path.resolve()
    usage = shutil.disk_usage(path)
    info: dict[str, Any] = {"path": str(path), "total_bytes": usage.total, "free_bytes": usage.free}
    best = ""
    try:
        with open("/proc/mounts") as handle:
            for line in handle:
                device, mount, fstype = line.split()[:3]
                if str(path).startswith(mount) and len(mount) > len(best):
                    best, info["device"], info["fs_type"], info["mount"] = mount, device, fstype, mount
        name = Path(info.get("device", "")).name
        rotational = Path(f"/sys/block/{name}/queue/rotational")
        if rotational.exists():
            info["rotational"] = rotational.read_text().strip() == "1"
    except OSError:
        pass
    probe = None
    if hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(next(iter(path.glob("*.safetensors")), path), os.O_RDONLY | os.O_DIRECT)
            os.close(fd)
            probe = True
        except (OSError, StopIteration):
            probe = False
    info["o_direct"] = probe
    return info


# ---------------------------------------------------------------------------- configurations


def _paged(reader: str, pack: bool, prefetcher: str | None = None) -> dict[str, Any]:
    return {"kind": "paged", "load": {"reader": reader, "use_pack": pack, "prefetcher": prefetcher}}


#: name -> worker spec; the order they run in.
CONFIGS: dict[str, dict[str, Any]] = {
    "stock": {"kind": "stock"},
    "paged-mmap": _paged("mmap", False),
    "paged-pread": {**_paged("pread", False), "trace": True},
    "paged-fanout": _paged("fanout", False),
    "paged-fanout-pack": {**_paged("fanout", True), "trace": True},
    "paged-fanout-pack-prefetch": _paged("fanout", True, PREFETCHER),
    "disk-bound": {"kind": "disk", "traces_of": ["paged-fanout-pack", "paged-pread"]},
    "compute-bound": {"kind": "resident", "load": {"reader": "fanout", "use_pack": True}},
}


def _prefetcher_available() -> bool:
    from outlier_runtime.core.plugin_manager import get_registry

    return PREFETCHER in get_registry().names("prefetcher")


def _run_worker(spec: dict[str, Any], timeout: float, scratch: Path, server: ForkServer) -> dict[str, Any]:
    """Run one configuration in a fresh process; returns its result, or an error record."""
    spec_path = scratch / f"{spec['name']}.spec.json"
    out_path = scratch / f"{spec['name']}.result.json"
    # The fork server outlives environment changes of this process: send the environment along.
    spec_path.write_text(json.dumps({**spec, "out": str(out_path), "env": dict(os.environ)}))
    started = time.perf_counter()
    code = server.run(spec_path, timeout)
    if code is None:
        return {"error": f"timed out after {timeout:.0f} s"}
    if not out_path.exists():
        return {"error": f"exit status {code} (killed for memory?)"}
    result = json.loads(out_path.read_text())
    if "error" not in result:
        result["wall_seconds"] = time.perf_counter() - started
    return result


@contextlib.contextmanager
def _configurations(timeout: float) -> Iterator[tuple[Callable[[dict[str, Any]], dict[str, Any]], Path]]:
    """``run(spec)`` for one configuration in a fresh process, and a scratch directory."""
    server = ForkServer()
    with tempfile.TemporaryDirectory(prefix="outlier-bench-") as scratch:
        try:
            yield (lambda spec: _run_worker(spec, timeout, Path(scratch), server)), Path(scratch)
        finally:
            server.close()


def _summary_line(name: str, result: dict[str, Any]) -> str:
    if "error" in result:
        return f"{name}: FAILED ({result['error']})"
    if result.get("kind") == "disk":
        best = result["best"]
        return f"{name}: {best['gbps']:.2f} GB/s ({best['label']})"
    run = result["runs"][0]
    return (f"{name}: {run['decode_tps']:.2f} tok/s decode, peak RSS {result['peak_rss_bytes'] / GB:.2f} GB, "
            f"{result['wall_seconds']:.0f} s")


def run_bench(options: BenchOptions, echo: Echo = lambda s: None) -> tuple[Path, Path, dict[str, Any]]:
    """Run every configuration and write ``<out>/<timestamp>.json`` and ``.md``; returns both paths."""
    from outlier_runtime.bench.report import bench_markdown, bench_ratios

    started = time.perf_counter()
    cache_dir = options.cache_dir or default_cache_dir()
    model_dir = benchmark_model(options.geometry, cache_dir, _build_progress(echo))
    files = model_files(model_dir)
    names = list(options.configs or CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise BenchError(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    skipped: dict[str, str] = {}
    if "paged-fanout-pack-prefetch" in names and not _prefetcher_available():
        skipped["paged-fanout-pack-prefetch"] = f"no prefetcher named {PREFETCHER!r} is registered"
    checkpoint_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    import psutil

    available = psutil.virtual_memory().available
    if "stock" in names and checkpoint_bytes > 0.6 * available:
        skipped["stock"] = f"the checkpoint ({checkpoint_bytes / GB:.1f} GB) does not fit in 60% of free RAM"
    if "compute-bound" in names and options.geometry.total_expert_bytes > 0.6 * available:
        skipped["compute-bound"] = "all experts do not fit in 60% of free RAM"
    cache_gb = options.effective_cache_gb
    common = {
        "model": str(model_dir), "files": [str(f) for f in files], "prompt": options.prompt,
        "warmup_prompt": WARMUP_PROMPT, "tokens": options.tokens,
        "warm_model": str(warm_model(cache_dir)),
    }
    run_names = [n for n in names if n not in skipped]
    plan = round_plan(run_names, options.repeat)
    rounds: dict[str, list[dict[str, Any]]] = {}
    out_dir = Path(options.out_dir)
    with _configurations(options.timeout_s) as (run_config, scratch):
        for number, (round_number, name) in enumerate(plan, start=1):
            latest = {n: runs[-1] for n, runs in rounds.items()}
            spec = _spec(name, options, common, cache_gb, scratch / f"round{round_number}", latest)
            if spec is None:
                skipped[name] = "needs the read trace of paged-fanout-pack, which did not run"
                continue
            echo(f"[{number}/{len(plan)}] {name}{f' (round {round_number + 1})' if options.repeat > 1 else ''} ...")
            evict(files)
            result = run_config(spec)
            if spec.get("trace_out") and Path(spec["trace_out"]).exists():
                result["trace_path"] = spec["trace_out"]
            rounds.setdefault(name, []).append(result)
            echo(f"      {_summary_line(name, result)}")
    results = {name: _best_round(runs) for name, runs in rounds.items()}
    report = {
        "schema": 1,
        **provenance(options.command),
        "disk": disk_info(model_dir),
        "config": {
            "geometry": asdict(options.geometry),
            "expert_bytes": options.geometry.expert_bytes,
            "total_expert_bytes": options.geometry.total_expert_bytes,
            "checkpoint_bytes": checkpoint_bytes,
            "model_dir": str(model_dir),
            "prompt": options.prompt,
            "decode_tokens": options.tokens,
            "k_override": options.k_override,
            "cache_gb": cache_gb,
            "reader_options": options.reader_options,
            "configs": run_names,
            "repeat": options.repeat,
            "repeat_rule": "every configuration (stock and the bounds too) ran `repeat` times, interleaved; "
                           "each reports its fastest round (interference only slows a run), all rounds kept",
            "skipped": skipped,
            "cold_cache": "the page-cache method on every shard and pack file before each "
                          "configuration and again before its timed generation",
            "page_cache_method": current_platform_io().page_cache_method,
            "baseline": BASELINE,
        },
        "results": results,
        "elapsed_seconds": time.perf_counter() - started,
    }
    report["ratios"] = bench_ratios(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path, md_path = out_dir / f"{stamp}.json", out_dir / f"{stamp}.md"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    md_path.write_text(bench_markdown(report, json_path.name))
    return json_path, md_path, report


def _spec(name: str, options: BenchOptions, common: dict[str, Any], cache_gb: float, scratch: Path,
          latest: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The worker spec of configuration ``name`` (None: a disk replay without its trace)."""
    scratch.mkdir(parents=True, exist_ok=True)
    spec = {**CONFIGS[name], **common, "name": f"{scratch.name}-{name}"}
    if spec["kind"] in ("paged", "resident"):
        load = {**spec["load"], "k_override": options.k_override, "cache_gb": cache_gb}
        if load["reader"] == "fanout" and options.reader_options:
            load["reader_options"] = dict(options.reader_options)
        if spec["kind"] == "resident":  # every expert in a slot: the compute-only bound
            g = options.geometry
            # The memory plan gives each slot room for one read in flight (its record, rounded
            # up to the 4 KiB O_DIRECT alignment): without it fewer than every expert get a slot.
            read_room = g.num_experts * (g.expert_bytes + 2 * DIRECT_IO_ALIGNMENT)
            load.update(k_override=g.num_experts, cache_gb=(g.total_expert_bytes + read_room) / GB * 1.001)
        spec["load"] = {k: v for k, v in load.items() if v is not None}
    if spec.get("trace"):
        spec["trace_out"] = str(scratch / f"{name}.trace.json")
    if spec["kind"] == "disk":
        spec["traces"] = {source: latest[source]["trace_path"] for source in spec["traces_of"]
                          if "trace_path" in latest.get(source, {})}
        if "paged-fanout-pack" not in spec["traces"]:
            return None
        spec["reader_options"] = dict(options.reader_options)
    return spec


def _speed(result: dict[str, Any]) -> float:
    if "error" in result:
        return -1.0
    if result.get("kind") == "disk":
        return result["best"]["gbps"]
    return result["runs"][0]["decode_tps"]


def round_plan(names: list[str], repeat: int) -> list[tuple[int, str]]:
    """``(round, configuration)`` in run order: every configuration in every round.

    Stock and the compute bound repeat too: a ratio such as ``overlap_vs_min_bound`` compares the
    fastest round of one configuration with another's, and a bound run once is only as fast as the
    load it happened to meet (a single compute-bound run under load once gave a ratio of 1.18,
    docs/performance.md).
    """
    return [(r, name) for r in range(repeat) for name in names]


def _best_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest round, with every round's headline numbers kept beside it."""
    best = dict(max(runs, key=_speed))
    best.pop("trace_path", None)
    if len(runs) > 1:
        best["rounds"] = [{"speed": _speed(r), "unit": "GB/s" if r.get("kind") == "disk" else "decode tok/s",
                           "error": r.get("error")} for r in runs]
    return best


def _build_progress(echo: Echo) -> Callable[[str, int, int], None]:
    bar: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "build":
            echo(["building the benchmark checkpoint (base model)...", "widening experts...",
                  "packing experts...", "benchmark checkpoint ready"][min(done, 3)])
            return
        from tqdm import tqdm

        if "pack" not in bar:
            bar["pack"] = tqdm(total=total, desc="pack", unit="expert", file=sys.stderr, leave=False)
        bar["pack"].update(done - bar["pack"].n)
        if done >= total:
            bar.pop("pack").close()

    return progress


# ---------------------------------------------------------------------------- K sweep


def run_sweep_k(geometry: Geometry, ks: Sequence[int], out_dir: Path, *, tokens: int = 16,
                prompts: Sequence[str] = (PROMPT,), reader: str = "fanout", cache_gb: float | None = None,
                cache_dir: Path | None = None, timeout_s: float = 900.0, command: str = "",
                echo: Echo = lambda s: None) -> Path:
    """The product's K sweep: one process per K; tok/s, peak RSS, agreement with stock greedy tokens."""
    from outlier_runtime.bench.report import sweep_markdown

    model_dir = benchmark_model(geometry, (cache_dir or default_cache_dir()), _build_progress(echo))
    files = model_files(model_dir)
    common = {"model": str(model_dir), "files": [str(f) for f in files], "prompts": list(prompts),
              "warmup_prompt": WARMUP_PROMPT, "tokens": tokens}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = provenance(command)
    options = BenchOptions(geometry=geometry)
    rows = []
    with _configurations(timeout_s) as (run_config, _):
        echo("stock mlx-lm reference (greedy tokens) ...")
        evict(files)
        stock = run_config({**common, "kind": "stock", "name": "stock"})
        echo(f"      {_summary_line('stock', stock)}")
        reference = [run["tokens"] for run in stock.get("runs", [])] or None
        for k in ks:
            budget = cache_gb if cache_gb is not None else options.slot_cache_gb(k)
            spec = {**common, "kind": "paged", "name": f"K{k}",
                    "load": {"reader": reader, "k_override": k, "cache_gb": budget}}
            echo(f"K={k} (cache_gb {budget:.3f}) ...")
            evict(files)
            result = run_config(spec)
            echo(f"      {_summary_line(f'K={k}', result)}")
            agreement = None
            if reference and "runs" in result:
                same = sum(a == b for ref, run in zip(reference, result["runs"]) for a, b in zip(ref, run["tokens"]))
                agreement = same / sum(len(ref) for ref in reference)
            record = {"schema": 1, **base, "disk": disk_info(model_dir), "k": k, "cache_gb": budget,
                      "reader": reader, "geometry": asdict(geometry), "decode_tokens": tokens, "prompts": list(prompts),
                      "token_agreement_vs_stock": agreement, "stock_reference": stock, "result": result}
            (out_dir / f"k_sweep_K{k}.json").write_text(json.dumps(record, indent=1, default=str))
            rows.append(record)
    md = out_dir / "K_SWEEP_RESULTS.md"
    md.write_text(sweep_markdown(rows))
    return md
