"""Where a paged MoE layer call spends its time at 25% of experts in slots: this checkout and another.

Issue #13 asks for the time per MoE layer call outside compute and I/O, before and after a
change. Each probe (a fresh process per checkout, model and round) loads a small tiny_models
MoE (32 experts per layer) with a quarter of them in slots and the smallest cache_gb for that
(`outlier bench --peers`' setting), decodes greedily, and times, per MoE layer call:

- ``switch``: the whole paged switch call;
- ``host_sync``: its wait for the routed ids (mlx computing everything the ids depend on:
  this is where the model's compute is paid);
- ``read``: the store's disk reads;
- ``install`` / ``copy_out``: slot updates and victim copies;

and ``engine_overhead`` = switch - host_sync - read: what the engine adds beyond compute and I/O.
Rounds alternate checkouts; the report keeps each figure's minimum over rounds (other jobs on
a shared machine only ever add time) and every round's raw numbers. Run from the repository root:

    .venv/bin/python tools/profile_moe_layer.py OTHER_CHECKOUT [--rounds 3] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = ["qwen3_moe", "mixtral"]
PROMPT = "def fibonacci(n):"

PROBE = r"""
import collections, json, os, sys, time
root, model, tokens, fraction, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
os.environ["OUTLIER_LOAD_PLUGINS"] = ""  # built-ins only
sys.path[:0] = [root, root + "/plugins"]
import mlx.core as mx
import mlx_lm
import outlier_runtime
from outlier_paged_moe import store as st, switch as sw
from outlier_runtime.engine.checkpoint import read_checkpoint
from outlier_runtime.engine.experts import build_expert_index, find_switch_modules
from outlier_runtime.engine.lazy_load import load_lazily

entries = read_checkpoint(model)
layers = build_expert_index(find_switch_modules(load_lazily(model, entries)[0]), entries).layers
experts = max(layer.num_experts for layer in layers)
slots = max(1, round(experts * fraction))
record = -(-max(layer.expert_nbytes for layer in layers) // 16384) * 16384
cache_gb = slots * (sum(layer.expert_nbytes for layer in layers) + record) * 1.001 / 1e9
seconds = collections.Counter()

def timed(cls, name, label):
    if name not in vars(cls):
        return
    inner = getattr(cls, name)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - started
    setattr(cls, name, wrapper)

timed(sw.PagedSwitch, "__call__", "switch")
timed(st.ExpertStore, "_read", "read")
for name, label in [("install", "install"), ("install_many", "install"), ("copy_out", "copy_out"),
                    ("copy_out_many", "copy_out")]:
    timed(st.LayerSlots, name, label)

class TimedEval:  # the switch module's mx.eval is its host sync
    def __getattr__(self, name):
        return getattr(mx, name)
    def eval(self, *arrays):
        started = time.perf_counter()
        mx.eval(*arrays)
        seconds["host_sync"] += time.perf_counter() - started
sw.mx = TimedEval()

stock = mlx_lm.load(model)
rt = outlier_runtime.load("plus", model=model, k_override=slots, cache_gb=cache_gb, force=True)
def decode(pair):
    started = time.perf_counter()
    out = [r.token for r in mlx_lm.stream_generate(*pair, prompt, max_tokens=tokens)]
    return time.perf_counter() - started, out
decode(stock); decode((rt.model, rt.tokenizer))  # warm-up
stock_seconds, stock_tokens = decode(stock)
seconds.clear()
before = rt.engine_stats()["total"]
paged_seconds, paged_tokens = decode((rt.model, rt.tokenizer))
total = rt.engine_stats()["total"]
calls = total["calls"] - before["calls"]
per_call = {k: v / calls * 1e3 for k, v in seconds.items()}
per_call["engine_overhead"] = per_call["switch"] - per_call.get("host_sync", 0) - per_call.get("read", 0)
print(json.dumps({
    "commit": __import__("subprocess").run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                                            text=True).stdout.strip(),
    "slots_per_layer": rt.engine_stats()["config"]["slots_per_layer"], "experts_per_layer": experts,
    "moe_calls": calls, "misses_per_call": (total["misses"] - before["misses"]) / calls,
    "ms_per_call": per_call, "paged_ms_per_token": paged_seconds / tokens * 1e3,
    "stock_ms_per_token": stock_seconds / tokens * 1e3, "tokens_identical_to_stock": paged_tokens == stock_tokens}))
"""


def probe(root: Path, model: Path, tokens: int, fraction: float) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(root), str(model), str(tokens), str(fraction), PROMPT],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the probe failed in {root}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=Path("bench-results/moe-layer-profile.json"))
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(here))
    from outlier_runtime.core.system import provenance
    from outlier_runtime.testing.tiny_models import tiny_model

    roots = {"this": here, "other": args.other.resolve()}
    summary = []
    with tempfile.TemporaryDirectory() as cache:
        for arch in ARCHS:
            model = tiny_model(arch, num_experts=32, cache_dir=cache)
            runs: dict[str, list[dict]] = {name: [] for name in roots}
            for number in range(args.rounds):
                for name in (list(roots) if number % 2 == 0 else list(roots)[::-1]):
                    runs[name].append(probe(roots[name], model, args.tokens, args.fraction))
            row = {"arch": arch, "runs": runs}
            for name in roots:
                keys = sorted({k for run in runs[name] for k in run["ms_per_call"]})
                row[name] = {"min_ms_per_call": {k: min(run["ms_per_call"].get(k, 0.0) for run in runs[name])
                                                 for k in keys},
                             "min_paged_ms_per_token": min(run["paged_ms_per_token"] for run in runs[name]),
                             "min_stock_ms_per_token": min(run["stock_ms_per_token"] for run in runs[name]),
                             "tokens_identical_to_stock": all(run["tokens_identical_to_stock"] for run in runs[name])}
            summary.append(row)
            print(f"{arch}: " + "; ".join(
                f"{name} engine overhead {row[name]['min_ms_per_call']['engine_overhead']:.3f} ms/call "
                f"(switch {row[name]['min_ms_per_call']['switch']:.3f}, host sync "
                f"{row[name]['min_ms_per_call'].get('host_sync', 0):.3f}, read {row[name]['min_ms_per_call'].get('read', 0):.3f})"
                for name in roots))
    report = {**provenance(" ".join(["python", *sys.argv])), "other_checkout": str(args.other),
              "rounds": args.rounds, "decode_tokens": args.tokens, "fraction": args.fraction, "prompt": PROMPT,
              "models": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
