"""Multi-turn prefill with and without the prompt cache: prefilled tokens and prefill time per turn.

A four-turn chat on the Plus tier's paged engine (embedded demo MoE, the demo's own paging knobs:
8 slots per layer, 6 MB), each turn rendered whole with the chat template and generated greedily
through a ``PrefixCache`` as ``outlier serve`` does: with the server's default budget (1 GB),
and with none (every turn prefills the whole conversation). Each conversation starts from a
freshly loaded runtime; the rounds alternate which goes first. The replies must be identical
with and without the cache, or the script fails. Writes a JSON with provenance. Run from the
repository root:

    .venv/bin/python tools/bench_prompt_cache.py [--rounds 3] [--tokens 24] [--out docs/bench/prompt-cache-<stamp>.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

SYSTEM = ("You review Python code. The module under review:\n\n"
          "import os\nimport sys\n\n\ndef read_config(path):\n    with open(path) as f:\n"
          "        lines = f.read().splitlines()\n    return dict(line.split('=', 1) for line in lines if line)\n\n\n"
          "class Settings:\n    def __init__(self, values):\n        self.values = values\n\n"
          "    def get(self, key, default=None):\n        return self.values.get(key, default)\n")
TURNS = [
    "What does read_config return for an empty file?",
    "Add a docstring to Settings.get.",
    "Write a test for read_config with a temporary file.",
    "Now make read_config skip lines that start with #.",
]
PAGING = {"k_override": 8, "cache_gb": 0.006}
#: `outlier serve --prompt-cache-gb` default.
CACHE_BYTES = 10**9


def conversation(cache_bytes: int, tokens: int) -> list[dict]:
    """Load the tier fresh and hold the whole chat; one row per turn."""
    import outlier_runtime
    from outlier_runtime.core.prompt_cache import PrefixCache

    runtime = outlier_runtime.load("plus", model="embedded:demo-moe", force=True, **PAGING)
    cache = PrefixCache(cache_bytes)
    messages = [{"role": "system", "content": SYSTEM}]
    rows = []
    try:
        for number, text in enumerate(TURNS):
            messages.append({"role": "user", "content": text})
            prompt = runtime.encode(messages)
            started = time.perf_counter()
            chunks = cache.stream(runtime, prompt, max_tokens=tokens, temperature=0.0)
            while True:
                try:
                    next(chunks)
                except StopIteration as done:
                    result = done.value
                    break
            seconds = time.perf_counter() - started
            total = result.engine["total"]
            rows.append({"turn": number + 1, "prompt_tokens": result.prompt_tokens,
                         "cached_tokens": result.cached_tokens, "prefill_tokens": result.prefill_tokens,
                         # mlx-lm's own prompt timing: prefilled tokens over the prompt tokens per second.
                         "prefill_seconds": result.prefill_tokens / result.prompt_tps,
                         "generation_tokens": result.generation_tokens, "turn_seconds": seconds,
                         "expert_bytes_read": total["bytes_read"], "expert_misses": total["misses"],
                         "reply_tokens": result.tokens})
            messages.append({"role": "assistant", "content": result.text})
    finally:
        runtime.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="pairs of conversations, with and without (at least 2)")
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens per reply at most")
    parser.add_argument("--out", type=Path, help="default: bench-results/prompt-cache-<stamp>.json")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds: at least 2, so each figure has a spread")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from outlier_runtime.core.system import provenance

    conversation(CACHE_BYTES, 2)  # warm-up: imports and first-call costs, not measured
    rounds = []
    for number in range(args.rounds):
        order = ["with_cache", "without_cache"][::1 if number % 2 == 0 else -1]
        row = {name: conversation(CACHE_BYTES if name == "with_cache" else 0, args.tokens) for name in order}
        if [t["reply_tokens"] for t in row["with_cache"]] != [t["reply_tokens"] for t in row["without_cache"]]:
            sys.exit(f"round {number}: the replies differ with and without the prompt cache")
        rounds.append({"order": order, **row})
        print(f"round {number}: " + "; ".join(
            f"turn {a['turn']}: prefilled {a['prefill_tokens']}/{a['prompt_tokens']} in {a['prefill_seconds']:.2f} s "
            f"vs {b['prefill_tokens']} in {b['prefill_seconds']:.2f} s"
            for a, b in zip(row["with_cache"], row["without_cache"])), flush=True)

    def per_turn(name: str, key: str) -> list[float]:
        return [statistics.median(r[name][turn][key] for r in rounds) for turn in range(len(TURNS))]

    summary = {name: {key: per_turn(name, key) for key in
                      ("prompt_tokens", "cached_tokens", "prefill_tokens", "prefill_seconds", "expert_bytes_read")}
               for name in ("with_cache", "without_cache")}
    ratios = [[r["with_cache"][t]["prefill_seconds"] / r["without_cache"][t]["prefill_seconds"] for r in rounds]
              for t in range(len(TURNS))]
    summary["prefill_seconds_with_over_without_min_median_max"] = [
        [min(v), statistics.median(v), max(v)] for v in ratios]
    report = {**provenance(" ".join(["python", *sys.argv])),
              "shared_machine": "two CPU cores shared with other engineers' jobs during the run",
              "model": "embedded:demo-moe", "tier": "plus", "paging": PAGING, "prompt_cache_bytes": CACHE_BYTES,
              "max_tokens_per_reply": args.tokens, "system": SYSTEM, "turns": TURNS,
              "replies_identical_with_and_without": True,  # checked every round above
              "summary": summary, "rounds": rounds}
    out = args.out or Path("bench-results") / f"prompt-cache-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
