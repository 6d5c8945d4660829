"""What the `vision` extra adds to the install CI runs: fresh venvs, `.[test]` against `.[test,vision]`.

Each round creates a new virtual environment and times `pip install -q -e ".[EXTRAS]"` (the
README's test command installs `.[test,vision]`), alternating the two so machine load falls on
both. Writes a JSON with provenance and every timing. Run from the repository root, with the
project's venv (the provenance reads the installed versions):

    .venv/bin/python tools/measure_install_time.py [--rounds 3] [--out docs/bench/vision-install-times.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("test", "test,vision")


def time_install(extras: str, work: Path) -> tuple[float, list[str]]:
    """Seconds to create a venv and install ``.[extras]``, and what ended up installed."""
    venv = work / f"venv-{extras.replace(',', '-')}"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-e", f".[{extras}]"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    freeze = subprocess.run([str(venv / "bin" / "pip"), "freeze", "--exclude-editable"], capture_output=True,
                            text=True, check=True).stdout.split()
    return seconds, freeze


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "vision-install-times.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from outlier_runtime.core.system import provenance

    timings: dict[str, list[float]] = {extras: [] for extras in EXTRAS}
    installed: dict[str, list[str]] = {}
    for round_number in range(args.rounds):
        order = EXTRAS if round_number % 2 == 0 else EXTRAS[::-1]
        for extras in order:
            with tempfile.TemporaryDirectory(prefix="install-time-") as work:
                seconds, installed[extras] = time_install(extras, Path(work))
            timings[extras].append(seconds)
            print(f"round {round_number + 1}: .[{extras}] {seconds:.1f} s", flush=True)
    medians = {extras: statistics.median(values) for extras, values in timings.items()}
    added = sorted(set(installed["test,vision"]) - set(installed["test"]))
    changed = sorted(p for p in installed["test"] if p not in installed["test,vision"])
    summary = {
        "median_seconds": medians,
        "added_by_vision_seconds": medians["test,vision"] - medians["test"],
        "ratio": medians["test,vision"] / medians["test"],
        "packages_added_by_vision": added,
        # A pin of .[test] that .[test,vision] resolves differently (expected: none).
        "test_pins_changed_by_vision": changed,
    }
    command = " ".join([os.path.relpath(sys.executable, ROOT), "tools/measure_install_time.py", *sys.argv[1:]])
    report = {"provenance": provenance(command),
              "config": {"rounds": args.rounds, "extras": list(EXTRAS),
                         "pip_command": "pip install -q -e .[EXTRAS] in a fresh venv"},
              "timings_seconds": timings, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
