"""What runs inside each benchmark configuration's process, and the fork server that starts them.

``outlier bench`` (``bench.py``) plans the configurations; each one runs here, in a process
of its own forked from a server that imported mlx-lm once: load the model (stock or paged),
warm up, drop the page cache, generate greedily while timing every token, and write the
result as JSON. The disk bound replays a traced run's reads with no model at all.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import Field

from outlier_runtime import PluginOptions, hookimpl, plugin_ref
from outlier_runtime.bench.model import GB, BenchError
from outlier_runtime.core.system import current_rss_bytes, peak_rss_bytes
from outlier_runtime.engine.platform_io import current_platform_io


# ---------------------------------------------------------------------------- the page cache


def evict(files: Sequence[Path]) -> bool:
    """Drop the files' pages from the OS page cache; False where the OS cannot (macOS)."""
    platform = current_platform_io()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            if not platform.drop_cache(fd):
                return False
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


#: Imported once by the fork server, so that each configuration's fresh process starts in
#: well under a second instead of importing mlx-lm (and transformers) again.
PRELOAD = ("mlx.core", "mlx_lm", "mlx_lm.generate", "outlier_runtime", "outlier_runtime.core.plugin_manager")


class ForkServer:
    """A helper process that imports mlx-lm once, then forks one fresh child per configuration.

    (multiprocessing's forkserver re-imports the parent's ``__main__`` in each child, which
    breaks under pytest and ``python -``; this one only runs :func:`_worker_entry`.)
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", "outlier_runtime.bench.worker", "serve"],
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
    """A reader that wraps another and records every batch it reads (for the disk bound).

    Registered in the worker process as the reader ``bench-trace``, through the same hook a
    third-party reader uses, so the bench needs nothing private from the engine.
    """

    class Options(PluginOptions):
        inner: str = plugin_ref("reader", "pread", options="inner_options", description="The reader to trace.")
        inner_options: dict[str, Any] = Field(default_factory=dict, description="Its options.")

    #: The instances made in this process (the worker loads one paged runtime at a time).
    instances: list["TraceReader"] = []

    def __init__(self, inner: str = "pread", inner_options: dict[str, Any] | None = None):
        from outlier_runtime.core.plugin_manager import get_registry

        self.inner = get_registry().create("reader", inner, inner_options or {})
        self.batches: list[list[tuple[str, int, int]]] = []
        TraceReader.instances.append(self)

    @property
    def stats(self) -> dict[str, Any]:
        return getattr(self.inner, "stats", {})

    def read(self, requests: Sequence[Any]) -> None:
        self.batches.append([(r.path, r.offset, r.length) for r in requests])
        self.inner.read(requests)

    def close(self) -> None:
        self.inner.close()


class TraceReaderPlugin:
    @hookimpl
    def register_readers(self, register: Any) -> None:
        register("bench-trace", TraceReader, "Records each batch of another reader (the bench's disk bound).")


def _traced(load: dict[str, Any]) -> dict[str, Any]:
    """Load options that read through ``bench-trace`` around the configured reader."""
    from outlier_runtime.core.plugin_manager import get_registry, register_plugin

    if "bench-trace" not in get_registry().names("reader"):
        register_plugin(TraceReaderPlugin(), "bench-trace")
    inner = {"inner": load.get("reader", "pread"), "inner_options": load.get("reader_options", {})}
    return {**load, "reader": "bench-trace", "reader_options": inner}


def _diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Engine totals between two snapshots, with rates recomputed."""
    gauges = {"slot_resident_bytes", "ram_cache_bytes"}
    out = {k: (v - before.get(k, 0) if k not in gauges else v) for k, v in after.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lookups = out.get("lookups", 0)
    out["hit_rate"] = (out.get("slot_hits", 0) + out.get("ram_hits", 0)) / lookups if lookups else 0.0
    out["slot_hit_rate"] = out.get("slot_hits", 0) / lookups if lookups else 0.0
    calls = out.get("calls", 0)
    out["host_syncs_per_call"] = out.get("host_syncs", 0) / calls if calls else 0.0
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
        run["engine_memory"] = end_stats.get("memory", {})
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
    from outlier_runtime.engine.buffers import aligned_empty
    from outlier_runtime.core.plugin_manager import get_registry
    from outlier_runtime.core.protocols import ReadRequest

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
        reader = registry.create("reader", name, reader_options)
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


def _warm_up(path: str, prompt: str) -> None:
    """Pay the process's first-use costs (allocator, kernels, tokenizer) on a tiny model, then free it."""
    import gc

    import mlx.core as mx
    import mlx_lm

    model, tokenizer = mlx_lm.load(path)
    mlx_lm.generate(model, tokenizer, prompt, max_tokens=3)
    del model, tokenizer
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def _peer_counters(model: Any) -> dict[str, Any]:
    from outlier_runtime.bench.peers import boyle_stats

    return boyle_stats(model)


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx
    import mlx_lm

    import outlier_runtime

    if spec.get("warm_model") and spec["kind"] != "disk":
        _warm_up(spec["warm_model"], spec["warmup_prompt"])
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
    elif spec["kind"] == "peer":  # the exact peer boyle (outlier_runtime/bench/peers.py)
        from outlier_runtime.bench.peers import load_boyle

        model, tokenizer, peer_info = load_boyle(spec["model"], spec["slots_per_layer"])
    else:
        load = _traced(spec["load"]) if spec.get("trace_out") else spec["load"]
        runtime = outlier_runtime.load("plus", model=spec["model"], force=True, **load)
        model, tokenizer, stats = runtime.model, runtime.tokenizer, runtime.engine_stats
    load_seconds = time.perf_counter() - started
    trace = TraceReader.instances[-1] if spec.get("trace_out") and runtime is not None else None
    # Warm-up: first-call costs (kernel setup, allocations) are not what we measure.
    _generate(model, tokenizer, spec["warmup_prompt"], 2, None, None)
    filled = None
    if spec["kind"] == "resident":
        # The same generation once before: afterwards every expert it touches sits in a slot.
        filled = _generate(model, tokenizer, prompts[0], spec["tokens"], stats, None)
    peer_before = _peer_counters(model) if spec["kind"] == "peer" else None
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
    if peer_before is not None:
        after = _peer_counters(model)
        hits, misses = after["hits"] - peer_before["hits"], after["misses"] - peer_before["misses"]
        result["peer"] = peer_info
        result["peer_decode"] = {"hits": hits, "misses": misses,
                                 "hit_rate": hits / (hits + misses) if hits + misses else 0.0}
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
    sys.exit("usage: python -m outlier_runtime.bench.worker serve (internal; run `outlier bench`)")
