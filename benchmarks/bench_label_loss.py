"""The main job with the loss at labelled positions only (``deltatune.loss``) against the model's own loss.

Runs ``deltatune train`` (the default run: SmolLM2-135M-Instruct, the built-in task, LoRA r=8 on all linear
layers) as a child process, alternately with ``AdapterTrainer.label_positions_loss`` on (the default) and off
(transformers computes the logits of every position and their loss), ``--rounds`` times each, the order
flipping every round. Reported per setting: the median of training seconds (from run_summary.json), the peak
resident memory of the process tree (sampled every 0.2 s), the exact match after training and the last loss;
and the median of the per-round ratios on / off.

Usage::

    python benchmarks/bench_label_loss.py [--rounds 2] [--steps 40] [--output runs/label-loss] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_main_job import measure  # noqa: E402

CHILD = ("import sys; from deltatune.train import trainer; trainer.AdapterTrainer.label_positions_loss = {on}; "
         "from deltatune import cli; sys.exit(cli.main(sys.argv[1:]))")


def run(on: bool, output: str, steps: int) -> dict:
    command = [sys.executable, "-c", CHILD.format(on=on), "train", "--output", output, "--overwrite",
               "--max-steps", str(steps)]
    os.makedirs(output, exist_ok=True)
    seconds, peak, code = measure(command, os.path.join(output, "bench_stdout.log"))
    if code != 0:
        raise SystemExit(f"run failed (exit {code}); see {output}/bench_stdout.log")
    with open(os.path.join(output, "run_summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    return {"label_positions_loss": on, "wall_seconds": round(seconds, 1), "peak_rss_gib": round(peak / 2**30, 3),
            "train_seconds": round(summary["train_seconds"], 1), "exact_match_after": summary["exact_match_after"],
            "final_loss": summary["final_loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--output", default=os.path.join("runs", "label-loss"))
    parser.add_argument("--json")
    args = parser.parse_args()
    runs = []
    for round_ in range(args.rounds):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        for on in order:
            runs.append({"round": round_, **run(on, os.path.join(args.output, "on" if on else "off"), args.steps)})
            print(json.dumps(runs[-1]), flush=True)
    report = {"runs": runs, "load_average": [round(x, 2) for x in os.getloadavg()]}
    for key in ("train_seconds", "peak_rss_gib"):
        on = [r[key] for r in runs if r["label_positions_loss"]]
        off = [r[key] for r in runs if not r["label_positions_loss"]]
        report[key] = {"on_median": statistics.median(on), "off_median": statistics.median(off),
                       "ratio_median": round(statistics.median(a / b for a, b in zip(on, off, strict=True)), 3)}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
