"""Aggregate decode tok/s and expert bytes read per generated token, 1 to 8 requests decoded together.

The Plus tier's paged engine on the embedded demo MoE (trained routing: 6 MoE layers, 64 experts,
top-4, 61 KB per expert) at three expert-cache sizes (``CACHES``): none (``cache_gb`` 0 leaves the
floor of one slot per layer and no RAM cache: every lookup is a read), the demo's own (8 slots,
6 MB in all) and half the experts (32 slots). Every
configuration generates the same eight greedy requests (``--tokens`` each), B at a time through
``ContinuousBatch`` (what ``outlier serve --max-batch`` runs): B = 1 decodes them one after the
other, B = 8 all together. Each configuration starts from a freshly loaded runtime (cold expert
cache); the rounds alternate the order of the configurations, so each ratio compares runs
seconds apart on this shared machine. The tokens must be identical in every configuration, or
the script fails. Writes a JSON with provenance and every step's timing. Run from the
repository root:

    .venv/bin/python tools/bench_batching.py [--rounds 3] [--tokens 32] [--out docs/bench/batching-<stamp>.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

#: Eight completions of the kind the demo MoE was trained on (Python standard library source).
PROMPTS = [
    "def read_file(path):\n    with open(path) as f:\n",
    "class Stack:\n    def __init__(self):\n",
    "import os\n\ndef walk(top):\n    for name in os.listdir(top):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
    "    def __repr__(self):\n        return",
    "try:\n    import threading\nexcept ImportError:\n",
    "def _check_value(value):\n    if not isinstance(value, int):\n",
    "    for key, value in sorted(self.items()):\n",
]
BATCH_SIZES = [1, 2, 4, 8]
#: Paging knobs per cache size: slots per layer (of 64 experts) and the bound on all expert bytes.
CACHES = {
    "none": {"k_override": 4, "cache_gb": 0.0},  # the budget leaves one slot per layer: every lookup reads
    "demo": {"k_override": 8, "cache_gb": 0.006},  # `outlier demo`'s knobs: 8 slots and a RAM cache
    "half": {"k_override": 32, "cache_gb": 0.016},  # half the experts in slots, a RAM cache beside
}


def measure(cache: str, batch_size: int, tokens: int) -> dict:
    """Load the tier fresh, then generate every prompt, ``batch_size`` at a time; per-step timings."""
    import outlier_runtime
    from outlier_runtime.core.batch_generation import ContinuousBatch

    runtime = outlier_runtime.load("plus", model="embedded:demo-moe", force=True, **CACHES[cache])
    try:
        prompts = [runtime.encode(p, chat=False) for p in PROMPTS]
        steps, results = [], []
        for start in range(0, len(prompts), batch_size):
            batch = ContinuousBatch(runtime, batch_size)
            try:
                sequences = [batch.add(p, max_tokens=tokens, temperature=0.0) for p in prompts[start:start + batch_size]]
                done = {}
                while len(batch):
                    before, decoded = runtime.engine_stats()["total"], batch.decoded_tokens
                    started = time.perf_counter()
                    events = batch.step()
                    seconds = time.perf_counter() - started
                    after, decoded = runtime.engine_stats()["total"], batch.decoded_tokens - decoded
                    steps.append({"wave": start // batch_size, "seconds": seconds, "sequences": decoded,
                                  "bytes_read": after["bytes_read"] - before["bytes_read"],
                                  "misses": after["misses"] - before["misses"],
                                  "lookups": after["lookups"] - before["lookups"]})
                    for event in events:
                        if event.result is not None:
                            done[event.sequence] = event.result
                results += [done[s] for s in sequences]
            finally:
                batch.close()
        config = runtime.engine_stats()["config"]
    finally:
        runtime.close()
    return {"cache": cache, "batch_size": batch_size, "steps": steps, "tokens": [r.tokens for r in results],
            "generated": sum(r.generation_tokens for r in results),
            "finish_reasons": [r.finish_reason for r in results],
            "config": {k: config.get(k) for k in ("slots_per_layer", "ram_cache_budget_bytes", "expert_bytes",
                                                  "total_expert_bytes", "moe_layers")}}


def summarize(run: dict) -> dict:
    """Decode-only figures: the steps that produced tokens (the rest prefilled prompts)."""
    decode = [s for s in run["steps"] if s["sequences"]]
    prefill = [s for s in run["steps"] if not s["sequences"]]
    tokens = sum(s["sequences"] for s in decode)
    seconds = sum(s["seconds"] for s in decode)
    return {"decode_tps": tokens / seconds, "decode_tokens": tokens, "decode_seconds": seconds,
            "decode_steps": len(decode), "mean_sequences_per_step": tokens / len(decode),
            "bytes_read_per_token": sum(s["bytes_read"] for s in decode) / tokens,
            "misses_per_token": sum(s["misses"] for s in decode) / tokens,
            "lookups_per_token": sum(s["lookups"] for s in decode) / tokens,
            "prefill_seconds": sum(s["seconds"] for s in prefill),
            "prefill_bytes_read": sum(s["bytes_read"] for s in prefill)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every batch size (at least 2)")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per request at most")
    parser.add_argument("--out", type=Path, help="default: bench-results/batching-<stamp>.json")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds: at least 2, so each figure has a spread")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from outlier_runtime.core.system import provenance

    measure("demo", 2, 4)  # warm-up: imports and first-call costs, not measured
    configurations = [(cache, size) for cache in CACHES for size in BATCH_SIZES]
    rounds, reference = [], None
    for number in range(args.rounds):
        order = configurations if number % 2 == 0 else configurations[::-1]
        runs = {f"{cache}/{size}": measure(cache, size, args.tokens) for cache, size in order}
        for name, run in runs.items():
            reference = reference or run["tokens"]
            if run["tokens"] != reference:
                sys.exit(f"round {number}: {name} generated other tokens than {order[0]}")
            run["summary"] = summarize(run)
        rounds.append({"order": [f"{cache}/{size}" for cache, size in order], "runs": runs})
        for cache in CACHES:
            print(f"round {number}, cache {cache}: " + "; ".join(
                f"B={size} {runs[f'{cache}/{size}']['summary']['decode_tps']:.1f} tok/s, "
                f"{runs[f'{cache}/{size}']['summary']['bytes_read_per_token'] / 1e3:.1f} kB/token"
                for size in BATCH_SIZES), flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r["runs"][name]["summary"][key] for r in rounds)

    def versus_one(name: str, key: str) -> list[float]:
        """This configuration's figure over B = 1's at the same cache, in each round: [min, median, max]."""
        base = name.split("/")[0] + "/1"
        values = sorted(r["runs"][name]["summary"][key] / r["runs"][base]["summary"][key] for r in rounds)
        return [values[0], statistics.median(values), values[-1]]

    summary = {name: {
        "decode_tps_median": median(name, "decode_tps"),
        "decode_tps_vs_batch_1_min_median_max": versus_one(name, "decode_tps"),
        "bytes_read_per_token_median": median(name, "bytes_read_per_token"),
        "bytes_read_per_token_vs_batch_1_min_median_max": versus_one(name, "bytes_read_per_token"),
        "misses_per_token_median": median(name, "misses_per_token"),
        "lookups_per_token_median": median(name, "lookups_per_token"),
        "mean_sequences_per_step_median": median(name, "mean_sequences_per_step"),
    } for name in rounds[0]["runs"]}
    first = rounds[0]["runs"]
    report = {**provenance(" ".join(["python", *sys.argv])),
              "shared_machine": "two CPU cores shared with other engineers' jobs during the run",
              "model": "embedded:demo-moe", "tier": "plus", "caches": CACHES,
              "engine_config": {cache: first[f"{cache}/1"]["config"] for cache in CACHES},
              "prompts": PROMPTS, "max_tokens_per_request": args.tokens, "batch_sizes": BATCH_SIZES,
              "tokens_identical_across_configurations": True,  # checked every round above
              "generated_tokens_per_configuration": first["demo/1"]["generated"],
              "summary": summary, "rounds": rounds}
    out = args.out or Path("bench-results") / f"batching-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
