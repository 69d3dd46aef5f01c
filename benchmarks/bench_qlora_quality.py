"""QLoRA against float LoRA on the main job's built-in task: same settings, only the base differs.

Runs ``deltatune train`` (the default run) once per base storage (float, NF4, optionally FP4 and int8),
each in its own process, and prints the held-out exact match before and after training side by
side with the wall time. The bar (issue 4): NF4 within 2 points of float. Run by hand:

    python benchmarks/bench_qlora_quality.py [--variants float,nf4,fp4,int8] [--json out.json] [-- extra train flags]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

QUANTIZE_FLAGS = {"float": [], "nf4": ["--quantize", "nf4"], "fp4": ["--quantize", "fp4"],
                  "int8": ["--quantize", "int8"]}


def run_variant(name: str, root: str, extra: list[str]) -> dict[str, object]:
    output = os.path.join(root, name)
    command = [sys.executable, "-m", "deltatune", "train", "--output", output, "--overwrite",
               *QUANTIZE_FLAGS[name], *extra]
    start = time.perf_counter()
    with open(os.path.join(root, f"{name}.log"), "w", encoding="utf-8") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - start
    summary: dict[str, object] = {}
    summary_path = os.path.join(output, "run_summary.json")
    if code == 0 and os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as fh:
            summary = json.load(fh)
    return {"variant": name, "exit_code": code, "wall_seconds": round(seconds, 1),
            "exact_match_before": summary.get("exact_match_before"),
            "exact_match_after": summary.get("exact_match_after")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="float,nf4", help="comma list from float, nf4, fp4, int8")
    parser.add_argument("--root", default=os.path.join("runs", "quality"))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("extra", nargs="*", help="extra flags for deltatune train (after --)")
    args = parser.parse_args()
    os.makedirs(args.root, exist_ok=True)
    results = [run_variant(v.strip(), args.root, args.extra) for v in args.variants.split(",")]
    print(f"{'base':8s} {'exit':>4s} {'before':>8s} {'after':>8s} {'wall s':>8s}")
    for r in results:
        before, after = r["exact_match_before"], r["exact_match_after"]
        print(f"{r['variant']:8s} {r['exit_code']:>4d} "
              f"{'-' if before is None else f'{100 * before:.1f}%':>8s} "
              f"{'-' if after is None else f'{100 * after:.1f}%':>8s} {r['wall_seconds']:>8.1f}")
    scores = {r["variant"]: r["exact_match_after"] for r in results}
    if scores.get("float") is not None and scores.get("nf4") is not None:
        gap = 100 * (scores["float"] - scores["nf4"])
        print(f"nf4 is {gap:.1f} points below float (bar: within 2 points): {'met' if gap <= 2 else 'NOT met'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
