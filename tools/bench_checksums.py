"""What verifying pack records costs: CRC32 (zlib) throughput beside reading the same record.

For each record size, times ``zlib.crc32`` over an aligned buffer and a positional read of
that many bytes from a scratch file (page cache warm: the cheapest a read gets, so the ratio
is the worst case for checksums). Writes one JSON with the figures and the run's provenance.

    python tools/bench_checksums.py --out docs/bench/checksums.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path

from outlier_runtime.core.system import provenance
from outlier_runtime.engine.buffers import aligned_empty

#: Expert record sizes: the demo MoE, a 4-bit Qwen3-30B-A3B expert, an 8-bit one, a big dense FFN.
SIZES = [24_576, 1_769_472, 3_538_944, 16 * 2**20]


def _best(seconds: list[float]) -> float:
    return min(seconds)


def measure(size: int, repeats: int, directory: Path) -> dict[str, float]:
    record = aligned_empty(size)
    memoryview(record)[:] = (os.urandom(4096) * (size // 4096 + 1))[:size]
    crc = []
    for _ in range(repeats):
        started = time.perf_counter()
        zlib.crc32(record)
        crc.append(time.perf_counter() - started)
    with tempfile.NamedTemporaryFile(dir=directory) as scratch:
        scratch.write(record.tobytes())
        scratch.flush()
        fd = os.open(scratch.name, os.O_RDONLY)
        try:
            out = aligned_empty(size)
            reads = []
            for _ in range(repeats):
                started = time.perf_counter()
                os.preadv(fd, [memoryview(out)], 0)
                reads.append(time.perf_counter() - started)
        finally:
            os.close(fd)
    crc_s, read_s = _best(crc), _best(reads)
    return {
        "record_bytes": size,
        "crc32_seconds": crc_s,
        "crc32_gb_per_s": size / crc_s / 1e9,
        "crc32_median_seconds": statistics.median(crc),
        "warm_read_seconds": read_s,
        "warm_read_gb_per_s": size / read_s / 1e9,
        "crc32_over_warm_read": crc_s / read_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("checksums.json"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the scratch file goes")
    args = parser.parse_args()
    rows = [measure(size, args.repeats, args.dir) for size in SIZES]
    result = {"benchmark": "crc32 of pack records vs a warm positional read", "results": rows,
              "provenance": provenance()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for row in rows:
        print(f"{row['record_bytes']:>10} B  crc32 {row['crc32_gb_per_s']:6.2f} GB/s  "
              f"warm read {row['warm_read_gb_per_s']:6.2f} GB/s  crc/read {row['crc32_over_warm_read']:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
