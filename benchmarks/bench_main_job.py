"""Measure the default run (``python -m deltatune train``): wall time, peak memory, before/after score.

Runs the command as a child process, samples the resident memory of it and all its children
every 0.2 s with psutil, and reads the before/after exact match from run_summary.json.
The budget is 10 minutes wall time and 4 GiB peak on a 2-core CPU. Run by hand, not as a test:

    python benchmarks/bench_main_job.py [--output runs/bench] [--json result.json] [-- extra train flags]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import psutil

from procmem import tree_rss  # the script's own folder is on sys.path

BUDGET_SECONDS = 600
BUDGET_BYTES = 4 * 2**30


def measure(command: list[str], log_path: str) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of ``command``; its output goes to ``log_path``."""
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        watched = psutil.Process(child.pid)
        peak = 0
        while child.poll() is None:
            try:
                peak = max(peak, tree_rss(watched))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)
    return time.perf_counter() - start, peak, child.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join("runs", "bench"))
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("extra", nargs="*", help="extra flags for deltatune train (after --)")
    args = parser.parse_args()
    command = [sys.executable, "-m", "deltatune", "train", "--output", args.output, "--overwrite", *args.extra]
    os.makedirs(args.output, exist_ok=True)
    load_before = os.getloadavg()
    seconds, peak, code = measure(command, os.path.join(args.output, "bench_stdout.log"))
    summary_path = os.path.join(args.output, "run_summary.json")
    summary = {}
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as fh:
            summary = json.load(fh)
    result = {
        "command": " ".join(command[1:]),
        "exit_code": code,
        "wall_seconds": round(seconds, 1),
        "peak_rss_gib": round(peak / 2**30, 3),
        "exact_match_before": summary.get("exact_match_before"),
        "exact_match_after": summary.get("exact_match_after"),
        "train_seconds": summary.get("train_seconds"),
        "steps": summary.get("steps"),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "within_budget": code == 0 and seconds <= BUDGET_SECONDS and peak < BUDGET_BYTES,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0 if result["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
