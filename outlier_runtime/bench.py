"""``outlier bench`` and ``outlier sweep-k``: measured, reproducible, with provenance.

Every configuration runs in a fresh subprocess (so its peak RSS is its own) on the same
prompt and token count, after the page cache of every checkpoint and pack file was dropped
(``posix_fadvise(DONTNEED)``), so each one starts cold. Results, raw per-token timings and
the machine they came from go to ``<out>/<timestamp>.json``; a markdown table goes next to it.

    outlier bench --quick          # small geometry, well under two minutes
    outlier bench --layers 2       # the Plus tier's expert geometry, two layers deep
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .bench_model import FULL, GB, QUICK, BenchError, Geometry, benchmark_model, model_files
from .system import current_rss_bytes, machine_info, peak_rss_bytes

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
    #: Rounds of the disk- and paging-sensitive configurations; each reports its fastest round.
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


def default_cache_dir() -> Path:
    """``$OUTLIER_HOME/bench-models``, else ``~/.cache/outlier-runtime/bench-models``."""
    home = os.environ.get("OUTLIER_HOME")
    return Path(home) / "bench-models" if home else Path.home() / ".cache" / "outlier-runtime" / "bench-models"


# ---------------------------------------------------------------------------- the page cache


def evict(files: Sequence[Path]) -> bool:
    """Drop the files' pages from the OS page cache; False where the OS cannot (macOS)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return False
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages cannot be dropped
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def cached_bytes(files: Sequence[Path]) -> int | None:
    """Bytes of the files in the page cache (util-linux ``fincore``), or None if unknown."""
    if not files or shutil.which("fincore") is None:
        return None
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", *map(str, files)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return sum(int(line) for line in out.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


# ---------------------------------------------------------------------------- provenance


def git_commit(start: Path | None = None) -> str | None:
    """The checked-out commit of the source tree, read from .git (no git process needed)."""
    here = (start or Path(__file__)).resolve()
    for directory in [here, *here.parents]:
        dot_git = directory / ".git"
        if dot_git.is_file():  # a worktree: "gitdir: <path>"
            text = dot_git.read_text().strip()
            dot_git = Path(text.split(":", 1)[1].strip()) if text.startswith("gitdir:") else dot_git
        if not dot_git.is_dir():
            continue
        try:
            head = (dot_git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head
            ref = head.split(":", 1)[1].strip()
            common = dot_git / "commondir"
            roots = [dot_git] + ([(dot_git / common.read_text().strip()).resolve()] if common.exists() else [])
            for root in roots:
                if (root / ref).exists():
                    return (root / ref).read_text().strip()
                packed = root / "packed-refs"
                if packed.exists():
                    for line in packed.read_text().splitlines():
                        if line.endswith(" " + ref):
                            return line.split()[0]
        except OSError:
            return None
    return None


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


def provenance(options_command: str) -> dict[str, Any]:
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": options_command or " ".join(sys.argv),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "os": {"system": platform.system(), "release": platform.release(), "version": platform.version()},
    }


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
    from .plugin_manager import get_registry

    return PREFETCHER in get_registry().names("prefetcher")


#: Imported once by the fork server, so that each configuration's fresh process starts in
#: well under a second instead of importing mlx-lm (and transformers) again.
PRELOAD = ("mlx.core", "mlx_lm", "mlx_lm.generate", "outlier_runtime", "outlier_runtime.plugin_manager")


class ForkServer:
    """A helper process that imports mlx-lm once, then forks one fresh child per configuration.

    (multiprocessing's forkserver re-imports the parent's ``__main__`` in each child, which
    breaks under pytest and ``python -``; this one only runs :func:`_worker_entry`.)
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", "outlier_runtime.bench", "serve"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        return self._proc

    def run(self, spec_path: Path, timeout: float) -> int | None:
        """Run one configuration; its exit status, or None if it was killed for running too long."""
        import select

        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"{spec_path}\n")
        proc.stdin.flush()
        pid = int(proc.stdout.readline().split()[1])  # "pid N"
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            os.kill(pid, 9)
            proc.stdout.readline()
            return None
        line = proc.stdout.readline().split()  # "exit N"
        return int(line[1]) if len(line) == 2 else -1

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait(timeout=30)
        self._proc = None


def _serve() -> int:
    """The fork server's loop: a spec path per line in, "pid N" and "exit N" lines out."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    out = sys.stdout
    for line in sys.stdin:
        spec_path = line.strip()
        pid = os.fork()
        if pid == 0:  # the child: one configuration, then leave without running atexit handlers
            os.dup2(2, 1)
            code = 1
            try:
                _worker_entry(spec_path)
                code = 0
            finally:
                os._exit(code)
        out.write(f"pid {pid}\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(f"exit {os.waitstatus_to_exitcode(status)}\n")
        out.flush()
    return 0


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
    from .bench_report import bench_markdown, bench_ratios

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
    }
    run_names = [n for n in names if n not in skipped]
    # Later rounds repeat what is sensitive to other jobs on the machine (disk and paging).
    plan = [(r, n) for r in range(options.repeat) for n in run_names
            if r == 0 or CONFIGS[n]["kind"] in ("paged", "disk")]
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
            "repeat_rule": "configurations sensitive to disk and other jobs ran `repeat` times, interleaved; "
                           "each reports its fastest round (interference only slows a run), all rounds kept",
            "skipped": skipped,
            "cold_cache": "posix_fadvise(DONTNEED) on every shard and pack file before each configuration",
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
            load.update(k_override=options.geometry.num_experts,
                        cache_gb=options.geometry.total_expert_bytes / GB * 1.001)
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
    from .bench_report import sweep_markdown

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


# ---------------------------------------------------------------------------- the worker


def _ban_eos(tokenizer: Any) -> Callable[[Any, Any], Any]:
    """A logits processor that forbids end-of-sequence, so every run decodes the same count."""
    import mlx.core as mx

    eos = sorted(int(t) for t in getattr(tokenizer, "eos_token_ids", ()) or ())
    cache: dict[int, Any] = {}

    def ban(tokens: Any, logits: Any) -> Any:
        if not eos:
            return logits
        size = logits.shape[-1]
        if size not in cache:
            mask = [False] * size
            for t in eos:
                if t < size:
                    mask[t] = True
            cache[size] = mx.array(mask)
        return mx.where(cache[size], -mx.inf, logits)

    return ban


class TraceReader:
    """Wraps the engine's reader and records every batch it reads (for the disk bound)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.batches: list[list[tuple[str, int, int]]] = []

    @property
    def stats(self) -> dict[str, Any]:
        return getattr(self.inner, "stats", {})

    def read(self, requests: Sequence[Any]) -> None:
        self.batches.append([(r.path, r.offset, r.length) for r in requests])
        self.inner.read(requests)

    def close(self) -> None:
        self.inner.close()


def _trace(model: Any) -> TraceReader | None:
    for _, module in model.named_modules():
        store = getattr(module, "_store", None)
        if store is not None and hasattr(store, "reader"):
            if not isinstance(store.reader, TraceReader):
                store.reader = TraceReader(store.reader)
            return store.reader
    return None


def _diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Engine totals between two snapshots, with rates recomputed."""
    gauges = {"slot_resident_bytes", "ram_cache_bytes"}
    out = {k: (v - before.get(k, 0) if k not in gauges else v) for k, v in after.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lookups = out.get("lookups", 0)
    out["hit_rate"] = (out.get("slot_hits", 0) + out.get("ram_hits", 0)) / lookups if lookups else 0.0
    out["slot_hit_rate"] = out.get("slot_hits", 0) / lookups if lookups else 0.0
    seconds = out.get("read_seconds", 0.0)
    out["read_bandwidth_gbps"] = out.get("bytes_read", 0) / seconds / GB if seconds else 0.0
    return out


def _generate(model: Any, tokenizer: Any, prompt: str, tokens: int, stats: Callable[[], dict] | None,
              trace: TraceReader | None) -> dict[str, Any]:
    """Greedy generation with per-token timings and engine statistics for prefill and decode."""
    import mlx_lm

    ids = tokenizer.encode(prompt)
    times, out_tokens, marks, snaps = [], [], [], []
    last = None
    start = time.perf_counter()
    before = stats()["total"] if stats else None
    for response in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=tokens,
                                           logits_processors=[_ban_eos(tokenizer)]):
        times.append(time.perf_counter())
        out_tokens.append(int(response.token))
        last = response
        if trace is not None:
            marks.append(len(trace.batches))
        if stats and len(times) == 1:
            snaps.append(stats()["total"])
    end_stats = stats() if stats else None
    intervals = [b - a for a, b in zip(times, times[1:])]
    run: dict[str, Any] = {
        "prompt_tokens": len(ids),
        "tokens": out_tokens,
        "ttft_seconds": times[0] - start if times else None,
        "token_seconds": intervals,
        "decode_tps": len(intervals) / sum(intervals) if intervals and sum(intervals) else 0.0,
        # Other developers' jobs share this machine's cores: the median resists their bursts.
        "decode_tps_median": 1 / statistics.median(intervals) if intervals else 0.0,
        "mlx_lm_prompt_tps": last.prompt_tps if last else None,
        "mlx_lm_generation_tps": last.generation_tps if last else None,
    }
    if stats and before is not None and snaps:
        run["engine_prefill"] = _diff(snaps[0], before)
        run["engine_decode"] = _diff(end_stats["total"], snaps[0])
        run["engine_config"] = end_stats.get("config", {})
    if trace is not None and marks:
        run["trace_marks"] = {"first_token": marks[0], "last_token": marks[-1]}
    return run


def _decode_batches(path: str) -> tuple[list[list[Any]], int]:
    """A trace's decode reads (between the first and the last token) and its decode intervals."""
    trace = json.loads(Path(path).read_text())
    marks = trace["marks"]
    return trace["batches"][marks["first_token"]:marks["last_token"]], trace["decode_intervals"]


def _replay_settings(options: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any], bool]]:
    """(trace, label, reader, reader options, new buffers per batch) of each disk replay."""
    pack = "paged-fanout-pack"
    rows = [(pack, "pread", "pread", {}, False)]
    for chunk_kib in (16, 64, 256, 1024, 4096):
        rows.append((pack, f"fanout chunk {chunk_kib} KiB", "fanout", {**options, "chunk_bytes": chunk_kib * 1024},
                     False))
    for workers in (1, 4, 16):
        rows.append((pack, f"fanout {workers} workers", "fanout", {**options, "workers": workers}, False))
    rows += [
        (pack, "fanout buffered", "fanout", {**options, "direct": False}, False),
        (pack, "fanout (engine settings)", "fanout", dict(options), False),
        (pack, "fanout (engine settings), new buffers per batch as the store allocates", "fanout", dict(options),
         True),
        # The product's reads: nine unaligned ranges per expert from the shards.
        ("paged-pread", "shards: pread (the product's reads)", "pread", {}, False),
        ("paged-pread", "shards: fanout", "fanout", dict(options), False),
    ]
    return rows


def _replay(spec: dict[str, Any]) -> dict[str, Any]:
    """The raw disk bound: the traced decode reads, replayed with no compute, by several readers."""
    from .buffers import aligned_empty
    from .plugin_manager import get_registry
    from .protocols import ReadRequest

    traces = {name: _decode_batches(path) for name, path in spec["traces"].items()}
    files = [Path(f) for f in spec["files"]]
    registry = get_registry()
    rows = []
    for trace_name, label, name, reader_options, fresh in _replay_settings(spec.get("reader_options") or {}):
        if trace_name not in traces:
            continue
        batches, intervals = traces[trace_name]
        if not batches:
            raise BenchError(f"{trace_name} read nothing while decoding: no disk bound to measure")
        total = sum(length for batch in batches for _, _, length in batch)
        longest = max(length for batch in batches for _, _, length in batch)
        buffers = [aligned_empty(longest) for _ in range(max(len(batch) for batch in batches))]
        evict(files)
        reader = registry.create("reader", name, **reader_options)
        started = time.perf_counter()
        for batch in batches:
            targets = [aligned_empty(length) for _, _, length in batch] if fresh else buffers
            reader.read([ReadRequest(path, offset, length, memoryview(buffer)[:length])
                         for (path, offset, length), buffer in zip(batch, targets)])
        seconds = time.perf_counter() - started
        rows.append({"trace": trace_name, "label": label, "reader": name, "options": reader_options,
                     "new_buffers": fresh, "batches": len(batches), "requests": sum(map(len, batches)),
                     "seconds": seconds, "bytes": total, "gbps": total / seconds / GB,
                     "seconds_per_token": seconds / intervals, "io": getattr(reader, "stats", {})})
        reader.close()
    pack_rows = [r for r in rows if r["trace"] == "paged-fanout-pack" and not r["new_buffers"]]
    if not pack_rows:
        raise BenchError("no trace of paged-fanout-pack: no disk bound to measure")
    best = max(pack_rows, key=lambda r: r["gbps"])
    shards = next((r for r in rows if r["trace"] == "paged-pread" and r["reader"] == "pread"), None)
    return {"kind": "disk", "batches": best["batches"], "bytes": best["bytes"], "sweep": rows, "best": best,
            "decode_intervals": traces["paged-fanout-pack"][1], "seconds_per_token": best["seconds_per_token"],
            "product_reads": shards}


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx
    import mlx_lm

    import outlier_runtime

    baseline = current_rss_bytes()
    files = [Path(f) for f in spec["files"]]
    if spec["kind"] == "disk":
        result = _replay(spec)
        result["peak_rss_bytes"] = peak_rss_bytes()
        return result
    prompts = spec.get("prompts") or [spec["prompt"]]
    started = time.perf_counter()
    runtime, stats = None, None
    if spec["kind"] == "stock":
        model, tokenizer = mlx_lm.load(spec["model"])
    else:
        runtime = outlier_runtime.load("plus", model=spec["model"], force=True, **spec["load"])
        model, tokenizer, stats = runtime.model, runtime.tokenizer, runtime.engine_stats
    load_seconds = time.perf_counter() - started
    trace = _trace(model) if spec.get("trace_out") else None
    # Warm-up: first-call costs (kernel setup, allocations) are not what we measure.
    _generate(model, tokenizer, spec["warmup_prompt"], 2, None, None)
    filled = None
    if spec["kind"] == "resident":
        # The same generation once before: afterwards every expert it touches sits in a slot.
        filled = _generate(model, tokenizer, prompts[0], spec["tokens"], stats, None)
    runs = []
    for prompt in prompts:
        evict(files)
        before = cached_bytes(files)  # proof that the run starts cold (None where fincore is missing)
        if trace is not None:
            trace.batches.clear()
        runs.append(_generate(model, tokenizer, prompt, spec["tokens"], stats, trace))
        runs[-1]["page_cache_before_bytes"] = before
    cold = cached_bytes(files)
    result: dict[str, Any] = {
        "kind": spec["kind"],
        "load": spec.get("load"),
        "load_seconds": load_seconds,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak_rss_bytes(),
        # mlx's own view: the most bytes its live arrays held, and what its allocator keeps cached.
        "mlx_peak_memory_bytes": mx.get_peak_memory(),
        "mlx_cache_memory_bytes": mx.get_cache_memory(),
        "page_cache_after_bytes": cold,
        "runs": runs,
    }
    if filled is not None:
        result["fill_run"] = {k: filled[k] for k in ("decode_tps", "tokens")}
    if trace is not None:
        marks = runs[-1].get("trace_marks", {"first_token": 0, "last_token": len(trace.batches)})
        Path(spec["trace_out"]).write_text(json.dumps({
            "batches": trace.batches, "marks": marks, "decode_intervals": len(runs[-1]["token_seconds"])}))
    if runtime is not None:
        runtime.close()
    return result


def _worker_entry(spec_path: str) -> None:
    """A configuration's process: run it and write its result (or its error) as JSON."""
    import traceback

    spec = json.loads(Path(spec_path).read_text())
    os.environ.clear()
    os.environ.update(spec["env"])
    try:
        result = _worker(spec)
    except BaseException as exc:  # noqa: BLE001 - reported in the results, the bench goes on
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    Path(spec["out"]).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        sys.exit(_serve())
    sys.exit("usage: python -m outlier_runtime.bench serve (internal; run `outlier bench`)")
