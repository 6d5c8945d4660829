"""Decode tok/s with every expert resident: this checkout's paged engine, another's, and stock mlx-lm.

Used to measure the all-resident fast path (issue #13): small qwen3_5_moe / qwen3_moe / mixtral
models built with tiny_models, ``k_override`` = every expert, greedy decode. Each process (one per
checkout in turn, each run ``--processes`` times) loads stock mlx-lm and the paged tier side by
side and times them in back-to-back pairs, so each ratio compares runs seconds apart on this
shared machine. Writes a JSON with provenance; compare ratios from the same run only.
Run from the repository root:

    .venv/bin/python tools/compare_resident_decode.py OTHER_CHECKOUT [--rounds 8] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = ["qwen3_5_moe", "qwen3_moe", "mixtral"]
PROMPT = "def fibonacci(n):"

PROBE = r"""
import json, os, statistics, subprocess, sys
root, model, rounds, tokens, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
os.environ["OUTLIER_LOAD_PLUGINS"] = ""  # built-ins only
sys.path[:0] = [root, root + "/plugins"]
import mlx_lm
import outlier_runtime
stock = mlx_lm.load(model)
rt = outlier_runtime.load("plus", model=model, k_override=10**6, cache_gb=1.0, force=True)
paged = (rt.model, rt.tokenizer)

def decode(pair):
    out = [r for r in mlx_lm.stream_generate(*pair, prompt, max_tokens=tokens)]
    return out[-1].generation_tps, [r.token for r in out]

# Warm-up: the same generation once, so first-call costs are paid and every expert it uses is in a slot.
decode(stock); decode(paged)
before = rt.engine_stats()["total"]
rows = []
for number in range(rounds):
    # Stock and paged back to back, alternating which goes first: the ratio of a pair is what counts.
    order = [("stock", stock), ("paged", paged)][::1 if number % 2 == 0 else -1]
    row = {name: decode(pair) for name, pair in order}
    rows.append({"stock_tps": row["stock"][0], "paged_tps": row["paged"][0],
                 "same_tokens": row["stock"][1] == row["paged"][1]})
total = rt.engine_stats()["total"]
calls, syncs = total["calls"] - before["calls"], total["host_syncs"] - before["host_syncs"]
print(json.dumps({
    "commit": subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "slots_per_layer": rt.engine_stats()["config"]["slots_per_layer"], "calls": calls,
    "host_syncs_per_call": syncs / calls, "misses": total["misses"] - before["misses"], "rounds": rows,
    "paged_vs_stock": [r["paged_tps"] / r["stock_tps"] for r in rows]}))
"""


def probe(root: Path, model: Path, rounds: int, tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(root), str(model), str(rounds), str(tokens), PROMPT],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the probe failed in {root}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", type=Path)
    parser.add_argument("--rounds", type=int, default=8, help="stock/paged pairs per process")
    parser.add_argument("--processes", type=int, default=2, help="processes per checkout and model")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench-results/resident-decode.json"))
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(here))
    from outlier_runtime.core.system import provenance
    from outlier_runtime.testing.tiny_models import tiny_model

    roots = {"this": here, "other": args.other.resolve()}
    summary = []
    with tempfile.TemporaryDirectory() as cache:
        for arch in ARCHS:
            model = tiny_model(arch, cache_dir=cache)
            runs: dict[str, list[dict]] = {name: [] for name in roots}
            for _ in range(args.processes):  # this and other in turn, each process with its own stock pairs
                for name, root in roots.items():
                    runs[name].append(probe(root, model, args.rounds, args.tokens))
            row = {"arch": arch, "runs": runs}
            for name in roots:
                ratios = [r for run in runs[name] for r in run["paged_vs_stock"]]
                row[name] = {"vs_stock_median": statistics.median(ratios),
                             "vs_stock_quartiles": statistics.quantiles(ratios, n=4)[::2],
                             "pairs": len(ratios),
                             "tokens_identical_to_stock": all(p["same_tokens"] for run in runs[name] for p in run["rounds"]),
                             "slots_per_layer": runs[name][0]["slots_per_layer"],
                             "host_syncs_per_call": runs[name][0]["host_syncs_per_call"],
                             "decode_misses": sum(run["misses"] for run in runs[name])}
            summary.append(row)
            print(f"{arch}: " + "; ".join(
                f"{name} {row[name]['vs_stock_median']:.3f}x stock (quartiles {row[name]['vs_stock_quartiles'][0]:.2f}-"
                f"{row[name]['vs_stock_quartiles'][1]:.2f}, {row[name]['pairs']} pairs), syncs/call "
                f"{row[name]['host_syncs_per_call']:.1f}, tokens identical {row[name]['tokens_identical_to_stock']}"
                for name in roots))
    report = {**provenance(" ".join(["python", *sys.argv])), "other_checkout": str(args.other),
              "rounds": args.rounds, "processes": args.processes, "decode_tokens": args.tokens, "prompt": PROMPT, "models": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
