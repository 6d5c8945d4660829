"""One rank of a two-rank pipeline test, started by mlx.launch (or by hand with its environment).

Usage: distributed_rank.py MODEL OUT_DIR [--kill RANK AFTER] [--temp T]

Loads the tiny model as the paged tier ``plus`` with ``distributed="pipeline"``, generates
greedily and writes ``OUT_DIR/rank<R>.json`` (tokens and this rank's engine statistics).
``--kill RANK AFTER``: rank RANK kills itself (SIGKILL) after AFTER tokens, to test how the other
rank ends. ``--temp T``: sample at temperature T, with no seed given.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import outlier_runtime
from outlier_runtime import OutlierError

PROMPT = "the quick brown fox jumps over the lazy dog"
MAX_TOKENS = 12


def main() -> int:
    model, out_dir = sys.argv[1], Path(sys.argv[2])
    temperature = float(sys.argv[sys.argv.index("--temp") + 1]) if "--temp" in sys.argv else 0.0
    victim, after = map(int, sys.argv[sys.argv.index("--kill") + 1:][:2]) if "--kill" in sys.argv else (None, 0)
    try:
        # Closing the runtime on every rank lets the last step finish everywhere before a rank exits.
        with outlier_runtime.load("plus", model=model, distributed="pipeline", k_override=2, cache_gb=0,
                                  force=True) as runtime:
            rank = runtime.engine_stats()["config"]["distributed"]["rank"]
            tokens = []
            for chunk in runtime.stream(PROMPT, max_tokens=MAX_TOKENS, temperature=temperature, chat=False):
                tokens.append(chunk.token)
                if rank == victim and len(tokens) >= after:
                    os.kill(os.getpid(), signal.SIGKILL)
            result = runtime.last_result
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"tokens": result.tokens, "engine": result.engine}))
    except OutlierError as exc:
        print(f"outlier: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
