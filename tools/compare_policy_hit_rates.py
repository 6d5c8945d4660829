"""Hit rates of the paged engine on the embedded demo MoE under each cache policy, with provenance.

The routing report simulates one per-layer cache; this runs the engine itself (slots plus the
RAM victim cache, prefill included), same prompts and settings for every policy, greedy. Run
from the repository root:

    OUTLIER_LOAD_PLUGINS= .venv/bin/python tools/compare_policy_hit_rates.py [--policies lru,lfu,lfru] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

PROMPTS = ["def read_file(path):\n    with open(path) as f:\n", "class Stack:\n    def push(self, item):\n",
           "import os\n\ndef walk(path):\n    for name in os.listdir(path):\n"]
#: (slots per layer, cache_gb): 8 slots (12.5%) with a small RAM cache, 16 slots (25%) with a larger one.
SETTINGS = [(8, 0.006), (16, 0.008)]
TIER = ('[tier]\nid = "demo-paged"\ndisplay_name = "Demo"\nkind = "large-moe"\nmin_ram_gb = 1\ndisk_gb = 0.03\n'
        '[model]\npath = "embedded:demo-moe"\n[loader]\nname = "paged_moe"\n[paging]\nk_override = 8\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policies", default="lru,lfu,lfru")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("bench-results/policy-hit-rates.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import outlier_runtime
    from outlier_runtime.core.system import provenance

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tiers:
        Path(tiers, "demo-paged.toml").write_text(TIER)
        os.environ["OUTLIER_TIERS_PATH"] = tiers
        for slots, cache_gb in SETTINGS:
            for policy in policies:
                runtime = outlier_runtime.load("demo-paged", k_override=slots, cache_gb=cache_gb,
                                               cache_policy=policy, force=True)
                hits = lookups = 0
                tokens = []
                for prompt in PROMPTS:
                    result = runtime.generate(prompt, max_tokens=args.tokens, temperature=0.0, chat=False)
                    total = result.engine["total"]
                    hits += total["slot_hits"] + total["ram_hits"]
                    lookups += total["lookups"]
                    tokens.append(result.tokens)
                runtime.close()
                rows.append({"slots": slots, "cache_gb": cache_gb, "policy": policy, "hit_rate": hits / lookups,
                             "lookups": lookups, "tokens": tokens})
                print(f"slots {slots}, cache_gb {cache_gb}: {policy:<6} hit rate {hits / lookups:.3f}")
    same = all(r["tokens"] == rows[0]["tokens"] for r in rows)
    report = {**provenance(" ".join(["python", *sys.argv])), "prompts": PROMPTS, "decode_tokens": args.tokens,
              "tokens_identical_across_policies": same, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"tokens identical across policies: {same}; wrote {args.out}")


if __name__ == "__main__":
    main()
