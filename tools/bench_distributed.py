"""Decode tok/s of the paged tier in one process against a two-rank pipeline, on this machine.

Both run a tiny-but-paging qwen3_moe built with tiny_models (tens of MB of experts, cache_gb
below that on every rank) greedily on the same prompt: one process, and two ranks started by
mlx.launch over 127.0.0.1 (ring backend). Stock mlx-lm (every weight resident) runs the same
way, one process and two ranks through its own ``pipeline(group)``, so the pipeline's own cost on
this machine is told apart from paging's. Rounds alternate the order, so each ratio compares runs
seconds apart on this shared machine. Every run must give the same tokens, or the script fails. On one machine the two ranks share its cores and disk: this is a correctness-and-
overhead figure, not a speed-up. Writes bench-results/distributed-<stamp>.json with provenance.
Run from the repository root:

    .venv/bin/python tools/bench_distributed.py [--rounds 3] [--tokens 48] [--cache-gb 0.02]

The script is also each run's worker: ``--worker OUT_DIR ...`` loads the tier (as a pipeline rank
when mlx.launch started it), generates and writes ``OUT_DIR/rank<R>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "the quick brown fox jumps over the lazy dog, and then"
#: Big enough that paging matters: 4 layers x 32 experts of hidden 512 (about 14 MB of 4-bit
#: experts per layer), 4 routed per token.
MODEL = dict(num_layers=4, num_experts=32, top_k=4, hidden_size=512)
#: Seconds one run (load, warm-up, measured generation) may take before its processes are killed.
RUN_TIMEOUT = 120


def worker(out_dir: Path, model: str, tokens: int, cache_gb: float, pipeline: bool) -> None:
    import outlier_runtime

    options = dict(distributed="pipeline") if pipeline else {}
    with outlier_runtime.load("plus", model=model, cache_gb=cache_gb, force=True, **options) as runtime:
        # A short warm-up pays first-call costs; its paging statistics are reset by the next generation.
        runtime.generate(PROMPT, max_tokens=4, temperature=0.0, chat=False)
        result = runtime.generate(PROMPT, max_tokens=tokens, temperature=0.0, chat=False)
    engine = result.engine
    rank = (engine["config"].get("distributed") or {}).get("rank", 0)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "tokens": result.tokens, "decode_tps": result.generation_tps, "prompt_tps": result.prompt_tps,
        "peak_rss_bytes": round(result.peak_rss_gb * 1e9), "total": engine["total"],
        "config": {k: engine["config"].get(k) for k in ("slots_per_layer", "ram_cache_budget_bytes",
                                                        "total_expert_bytes", "moe_layers", "distributed")},
        "ranks": engine.get("ranks")}))


def stock_worker(out_dir: Path, model: str, tokens: int, pipeline: bool) -> None:
    """The same generation with stock mlx-lm, every weight resident: the pipeline's own overhead."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generation_stream

    from outlier_runtime.core.system import peak_rss_bytes

    loaded, tokenizer = mlx_lm.load(model, lazy=True)
    group = mx.distributed.init() if pipeline else None
    if group is not None:
        loaded.model.pipeline(group)
    mx.eval(loaded.parameters())
    prompt = tokenizer.encode(PROMPT)
    list(mlx_lm.stream_generate(loaded, tokenizer, prompt, max_tokens=4))
    responses = list(mlx_lm.stream_generate(loaded, tokenizer, prompt, max_tokens=tokens))
    rank = group.rank() if group is not None else 0
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "tokens": [r.token for r in responses], "decode_tps": responses[-1].generation_tps,
        "prompt_tps": responses[-1].prompt_tps, "peak_rss_bytes": peak_rss_bytes()}))
    if group is not None:  # as the paged loader's close does: the last step done everywhere, then exit
        mx.synchronize(generation_stream)
        mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu, group=group))


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (mlx.launch gives rank r port p + r)."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    sys.exit("no two consecutive free ports on 127.0.0.1")


def _run(command: list[str], out_dir: Path, ranks: int) -> list[dict]:
    """Run ``command`` in its own process group (killed after RUN_TIMEOUT); the ranks' results."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        out, _ = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        sys.exit(f"{' '.join(command[:4])} ... still running after {RUN_TIMEOUT} s:\n{out[-3000:]}")
    files = [out_dir / f"rank{rank}.json" for rank in range(ranks)]
    if process.returncode or not all(f.exists() for f in files):  # mlx.launch exits 0 when a rank failed
        sys.exit(f"{' '.join(command[:4])} ... failed (exit {process.returncode}):\n{out[-3000:]}")
    results = [json.loads(f.read_text()) for f in files]
    for f in files:
        f.unlink()
    results[0]["wall_seconds"] = time.perf_counter() - started
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="one-process / two-rank pairs (at least 3)")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per measured generation")
    parser.add_argument("--cache-gb", type=float, default=0.02, help="paging.cache_gb of each process / rank")
    parser.add_argument("--out", type=Path, help="default: bench-results/distributed-<stamp>.json")
    parser.add_argument("--worker", nargs=4, metavar=("OUT_DIR", "MODEL", "TOKENS", "CACHE_GB"), help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stock", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        out_dir, model, tokens, cache_gb = args.worker
        if args.stock:
            stock_worker(Path(out_dir), model, int(tokens), args.pipeline)
        else:
            worker(Path(out_dir), model, int(tokens), float(cache_gb), args.pipeline)
        return
    if args.rounds < 3:
        parser.error("--rounds: at least 3, so the ratio has a spread")
    here = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(here))
    from outlier_runtime.core.system import provenance
    from outlier_runtime.testing.tiny_models import tiny_model

    launcher = Path(sys.executable).with_name("mlx.launch")
    script = str(Path(__file__).resolve())
    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        model = str(tiny_model("qwen3_moe", cache_dir=scratch_dir / "models", **MODEL))
        os.environ["OUTLIER_HOME"] = str(scratch_dir / "home")  # no user overrides of the tier
        worker_args = ["--worker", scratch, model, str(args.tokens), str(args.cache_gb)]
        single = [sys.executable, script, *worker_args]
        pipeline = [str(launcher), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--python", sys.executable,
                    script, *worker_args, "--pipeline"]
        runs = {"one": (single, 1), "two": (pipeline, 2),
                "stock_one": (single + ["--stock"], 1), "stock_two": (pipeline + ["--stock"], 2)}
        for number in range(args.rounds):
            order = list(runs) if number % 2 == 0 else list(runs)[::-1]
            row = {}
            for name in order:
                command, ranks = runs[name]
                if ranks > 1:
                    command = command[:7] + ["--starting-port", str(_free_port_pair())] + command[7:]
                row[name] = _run(command, scratch_dir, ranks)
            tokens = [result["tokens"] for name in runs for result in row[name]]
            if any(t != tokens[0] for t in tokens):
                sys.exit(f"round {number}: the tokens differ between runs (one process, ranks, stock): {tokens}")
            rate = {name: row[name][0]["decode_tps"] for name in runs}
            rounds.append({"order": order, "one_process": row["one"][0], "two_ranks": row["two"],
                           "stock_one_process": row["stock_one"][0], "stock_two_ranks": row["stock_two"],
                           "two_vs_one": rate["two"] / rate["one"],
                           "stock_two_vs_one": rate["stock_two"] / rate["stock_one"]})
            print(f"round {number}: paged one process {rate['one']:.2f} tok/s, two ranks {rate['two']:.2f} "
                  f"({rounds[-1]['two_vs_one']:.3f}x); stock {rate['stock_one']:.2f}, two ranks "
                  f"{rate['stock_two']:.2f} ({rounds[-1]['stock_two_vs_one']:.3f}x); tokens identical", flush=True)

    ratios = [r["two_vs_one"] for r in rounds]
    stock_ratios = [r["stock_two_vs_one"] for r in rounds]
    first_one, first_two = rounds[0]["one_process"], rounds[0]["two_ranks"][0]
    summary = {
        "tokens_identical": True,  # checked every round above
        "decode_tps_one_process_median": statistics.median(r["one_process"]["decode_tps"] for r in rounds),
        "decode_tps_two_ranks_median": statistics.median(r["two_ranks"][0]["decode_tps"] for r in rounds),
        "two_vs_one_median": statistics.median(ratios),
        "two_vs_one_min_max": [min(ratios), max(ratios)],
        "stock_decode_tps_one_process_median": statistics.median(r["stock_one_process"]["decode_tps"] for r in rounds),
        "stock_decode_tps_two_ranks_median": statistics.median(r["stock_two_ranks"][0]["decode_tps"] for r in rounds),
        "stock_two_vs_one_median": statistics.median(stock_ratios),
        "stock_two_vs_one_min_max": [min(stock_ratios), max(stock_ratios)],
        "one_process": {"peak_rss_bytes": first_one["peak_rss_bytes"], "bytes_read": first_one["total"]["bytes_read"],
                        "hit_rate": first_one["total"]["hit_rate"]},
        # Each rank's figures as rank 0 gathered them (round 0).
        "two_ranks": first_two["ranks"],
        "stock_peak_rss_bytes": {"one_process": rounds[0]["stock_one_process"]["peak_rss_bytes"],
                                 "two_ranks": [r["peak_rss_bytes"] for r in rounds[0]["stock_two_ranks"]]},
    }
    report = {**provenance(" ".join(["python", *sys.argv])), "model": {"arch": "qwen3_moe", **MODEL},
              "total_expert_bytes": first_one["config"]["total_expert_bytes"], "cache_gb_per_process": args.cache_gb,
              "decode_tokens": args.tokens, "prompt": PROMPT, "summary": summary, "rounds": rounds}
    out = args.out or Path("bench-results") / f"distributed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"two ranks / one process: median {summary['two_vs_one_median']:.3f}x "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} rounds)")
    print(f"stock mlx-lm, two ranks / one process: median {summary['stock_two_vs_one_median']:.3f}x "
          f"(min {min(stock_ratios):.3f}, max {max(stock_ratios):.3f})")
    print(f"one process: peak RSS {first_one['peak_rss_bytes'] / 1e6:.0f} MB, read {first_one['total']['bytes_read'] / 1e6:.1f} MB")
    for rank in first_two["ranks"]:
        print(f"rank {rank['rank']} (layers {rank['layers'][0]}-{rank['layers'][1] - 1}): peak RSS "
              f"{rank['peak_rss_bytes'] / 1e6:.0f} MB, read {rank['bytes_read'] / 1e6:.1f} MB")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
