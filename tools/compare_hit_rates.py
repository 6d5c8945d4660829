"""Hit rates of this checkout's paged engine against another checkout's, on the embedded demo MoE.

Used to measure the victim cache (issue #11): same prompts, same slots and cache_gb, greedy.
Writes a JSON with provenance. Run from the repository root:

    .venv/bin/python tools/compare_hit_rates.py OTHER_CHECKOUT [--out FILE]

Each engine runs in its own process (imports must not mix); the other checkout's built-in
plugins are registered in-process, so it needs no install.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROMPTS = ["def read_file(path):\n    with open(path) as f:\n", "class Stack:\n    def push(self, item):\n",
           "import os\n\ndef walk(path):\n    for name in os.listdir(path):\n"]
SETTINGS = [(8, 0.006), (8, 0.010), (4, 0.006)]  # (slots per layer, cache_gb): 25-40% of the experts

PROBE = r"""
import importlib, json, os, subprocess, sys
root, prompts, settings = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
import os; os.environ["OUTLIER_LOAD_PLUGINS"] = ""  # built-ins only: third-party ones may not import into the other checkout
sys.path[:0] = [root, root + "/plugins"]
import outlier_runtime
import os.path
if not os.path.isdir(root + "/outlier_runtime/core"):  # the v0.1 layout: plugins came only through entry points
    from outlier_runtime import plugin_manager
    for name, module in [("dense", "outlier_dense"), ("paged_moe", "outlier_paged_moe"), ("cache_lru", "outlier_cache_lru"),
                         ("cache_lfu", "outlier_cache_lfu"), ("readers", "outlier_readers")]:
        plugin_manager.register_plugin(importlib.import_module(module), name)
commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
rows = []
# The tier comes from this file in both checkouts (an installed package may supply the other's
# built-in manifests, in a format the other does not read).
os.makedirs(sys.argv[4], exist_ok=True)
open(os.path.join(sys.argv[4], "demo-paged.toml"), "w").write(
    '[tier]\nid = "demo-paged"\ndisplay_name = "Demo"\nkind = "large-moe"\nmin_ram_gb = 1\ndisk_gb = 0.03\n'
    '[model]\npath = "embedded:demo-moe"\n[loader]\nname = "paged_moe"\n[paging]\nk_override = 8\n')
os.environ["OUTLIER_TIERS_PATH"] = sys.argv[4]
for slots, cache_gb in settings:
    rt = outlier_runtime.load("demo-paged", k_override=slots, cache_gb=cache_gb, force=True)
    for prompt in prompts:
        result = rt.generate(prompt, max_tokens=48, temperature=0.0, chat=False)
        total = result.engine["total"]
        rows.append({"slots": slots, "cache_gb": cache_gb, "prompt": prompt, "tokens": result.tokens,
                     "hit_rate": total["hit_rate"], "misses": total["misses"], "lookups": total["lookups"]})
    rt.close()
print(json.dumps({"commit": commit, "rows": rows}))
"""


def run(root: Path) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tiers:
        out = subprocess.run([sys.executable, "-c", PROBE, str(root), json.dumps(PROMPTS), json.dumps(SETTINGS), tiers],
                             capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the probe failed in {root}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench-results/hit-rates.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from outlier_runtime.core.system import provenance

    this, other = run(Path(__file__).resolve().parents[1]), run(args.other.resolve())
    summary = []
    for setting in SETTINGS:
        mine = [r for r in this["rows"] if (r["slots"], r["cache_gb"]) == tuple(setting)]
        theirs = [r for r in other["rows"] if (r["slots"], r["cache_gb"]) == tuple(setting)]
        rate = lambda rows: sum(r["lookups"] - r["misses"] for r in rows) / sum(r["lookups"] for r in rows)
        summary.append({"slots": setting[0], "cache_gb": setting[1], "hit_rate_this": rate(mine),
                        "hit_rate_other": rate(theirs), "misses_this": sum(r["misses"] for r in mine),
                        "misses_other": sum(r["misses"] for r in theirs),
                        "same_tokens": [a["tokens"] for a in mine] == [b["tokens"] for b in theirs]})
    report = {**provenance(" ".join(["python", *sys.argv])), "this": this, "other": other, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for row in summary:
        print(f"slots {row['slots']}, cache_gb {row['cache_gb']}: hit rate {row['hit_rate_this']:.3f} (this) vs "
              f"{row['hit_rate_other']:.3f} (other); misses {row['misses_this']} vs {row['misses_other']}; "
              f"same tokens: {row['same_tokens']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
