"""Rank study on the main job's task: how small can r be, and do r=8 and r=64 learn the same directions?

Hu et al. (2021, section 7) found that a very small r already does the job and that the top directions of an
r=8 and an r=64 adapter overlap far more than chance while the rest are noise. This script checks both on the
default model and task: it trains LoRA at each rank in ``--ranks`` for q,v and for all linear layers (same
steps, lr and alpha for all, as the paper kept alpha fixed across r), then compares the A matrices of the
r=8 and r=64 q,v adapters with ``deltatune.analysis`` (phi(i, j) of section 7, against the chance level
max(i, j) / d of random subspaces). Writes docs/rank.md, its heatmaps and a JSON of every number.
Run by hand, not as a test (about 20-30 minutes on 2 CPU cores):

    python benchmarks/bench_rank.py [--ranks 1,2,4,8,64] [--targets qv,all-linear] [--eval-size 30]
    python benchmarks/bench_rank.py --from-json docs/rank/results.json   # rewrite the page only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_main_job import measure  # noqa: E402 - the same child-process and peak-RSS measurement

TARGETS = {"qv": "q_proj,v_proj", "all-linear": "all-linear"}
DOC = os.path.join("docs", "rank.md")
FIGURES = os.path.join("docs", "rank")


def train_one(targets: str, r: int, args: argparse.Namespace) -> dict[str, object]:
    """Train one adapter in a child process; its run summary plus wall time and peak memory."""
    out = os.path.join(args.output, f"{targets}-r{r}")
    command = [sys.executable, "-m", "deltatune", "train", "--r", str(r), "--target-modules", TARGETS[targets],
               "--output", out, "--overwrite", "--eval-size", str(args.eval_size), "--seed", str(args.seed)]
    if args.steps:
        command += ["--max-steps", str(args.steps)]
    os.makedirs(out, exist_ok=True)
    seconds, peak, code = measure(command, os.path.join(out, "bench_stdout.log"))
    row: dict[str, object] = {"targets": targets, "r": r, "exit_code": code, "wall_seconds": round(seconds, 1),
                              "peak_rss_gib": round(peak / 2**30, 3), "adapter": out}
    summary_path = os.path.join(out, "run_summary.json")
    if code == 0 and os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as fh:
            summary = json.load(fh)
        row.update({key: summary.get(key) for key in ("trainable_params", "exact_match_before", "exact_match_after",
                                                       "final_loss", "train_seconds", "steps", "eval_rows")})
    print(json.dumps(row), flush=True)
    return row


def compare_ranks(low: dict[str, object], high: dict[str, object], figures: str) -> dict[str, object]:
    """phi(i, j) between the A matrices of two adapters, summarised over every module both adapt.

    For each module: phi(1, 1) (does the top direction agree?), the mean of phi(i, j) over i <= r_low, j <= 8
    and its chance level, and the same over j > r_low (the r=64 adapter's remaining directions). One module
    of the middle layer gets a heatmap per projection, like the paper's Figure 3.
    """
    from deltatune.analysis import load_lora, subspace_similarity
    from deltatune.analysis.report import layer_index, plot_similarity
    from deltatune.analysis.similarity import chance_grid

    a, b = str(low["adapter"]), str(high["adapter"])  # deltatune train saves the adapter in the run folder
    grids = subspace_similarity(a, b, matrix="A")
    factors = load_lora(a)
    per_module = []
    for name, grid in grids.items():
        d = int(factors[name].A.shape[1])
        chance = chance_grid(grid.shape[0], grid.shape[1], d)
        top = grid[:, : grid.shape[0]]
        rest = grid[:, grid.shape[0]:]
        per_module.append({
            "module": name, "d": d, "phi_1_1": float(grid[0, 0]),
            "mean_top": float(top.mean()), "chance_top": float(chance[:, : grid.shape[0]].mean()),
            "mean_rest": float(rest.mean()) if rest.numel() else None,
            "chance_rest": float(chance[:, grid.shape[0]:].mean()) if rest.numel() else None,
        })
    layers = sorted({layer_index(name) for name in grids if layer_index(name) is not None})
    middle = layers[len(layers) // 2] if layers else None
    os.makedirs(figures, exist_ok=True)
    pictures = []
    for name, grid in grids.items():
        if layer_index(name) == middle:
            path = os.path.join(figures, f"phi_r{low['r']}_r{high['r']}_{name.rsplit('.', 1)[-1]}.png")
            plot_similarity(grid, f"{name}: A of r={low['r']} (rows) vs r={high['r']} (columns)", path, "A")
            pictures.append(path)

    def mean(key: str) -> float:
        values = [row[key] for row in per_module if row[key] is not None]
        return sum(values) / len(values)

    return {"low": low["r"], "high": high["r"], "modules": len(per_module), "middle_layer": middle,
            "phi_1_1_mean": mean("phi_1_1"), "phi_1_1_min": min(row["phi_1_1"] for row in per_module),
            "mean_top": mean("mean_top"), "chance_top": mean("chance_top"),
            "mean_rest": mean("mean_rest"), "chance_rest": mean("chance_rest"),
            "pictures": pictures, "per_module": per_module}


def _seconds(value: object) -> str:
    return "" if value is None else f"{float(value):.0f}"


def percent(value: object) -> str:
    return "failed" if value is None else f"{100 * float(value):.1f}%"


def write_doc(results: dict[str, object], path: str) -> None:
    """docs/rank.md from the results: the table, the similarity summary and what it shows."""
    rows = results["runs"]
    eval_rows = next((int(row["eval_rows"]) for row in rows if row.get("eval_rows")), 30)
    lines = [
        "# Rank study: LoRA rank r on the main job's task",
        "",
        f"Measured {results['date']} on {results['machine']} with `{results['command']}`. One run per setting on a",
        f"shared machine: one held-out example in {eval_rows} is {100 / eval_rows:.1f} points of exact match, so "
        "differences of one example are noise. The train seconds include the load of other jobs on the machine (a "
        "test suite ran beside some of the runs); compare them only loosely.",
        f"Every run: the default model and built-in task, {results['steps_note']}, lr, alpha 16, dropout and seed "
        "the `deltatune train` defaults (alpha fixed across r, as in Hu et al. 2021, so the scale alpha/r changes).",
        "",
        "| targets | r | trainable params | exact match before | after | final loss | train s | peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        loss = row.get("final_loss")
        lines.append(
            f"| {row['targets']} | {row['r']} | {row.get('trainable_params') or 0:,} | "
            f"{percent(row.get('exact_match_before'))} | {percent(row.get('exact_match_after'))} | "
            f"{'' if loss is None else f'{loss:.3f}'} | {_seconds(row.get('train_seconds'))} | {row['peak_rss_gib']} |")
    similarity = results.get("similarity")
    if similarity:
        s = similarity
        lines += [
            "",
            f"## Do r={s['low']} and r={s['high']} learn the same directions? (q,v adapters, A matrices)",
            "",
            f"phi(i, j) = ||U_{s['low']}[:, :i]^T U_{s['high']}[:, :j]||_F^2 / min(i, j) (Hu et al. 2021, section 7) "
            f"over all {s['modules']} adapted modules; chance is max(i, j)/d for random subspaces "
            f"(d = {s['per_module'][0]['d']}, the input width of q_proj and v_proj).",
            "",
            "| quantity | measured (mean over modules) | chance |",
            "|---|---:|---:|",
            f"| phi(1, 1): the top directions | {s['phi_1_1_mean']:.3f} (lowest module {s['phi_1_1_min']:.3f}) | "
            f"{1 / s['per_module'][0]['d']:.4f} |",
            f"| mean phi(i, j), i <= {s['low']}, j <= {s['low']} | {s['mean_top']:.3f} | {s['chance_top']:.4f} |",
            f"| mean phi(i, j), i <= {s['low']}, {s['low']} < j <= {s['high']} | {s['mean_rest']:.3f} | "
            f"{s['chance_rest']:.4f} |",
            "",
            f"Heatmaps for layer {s['middle_layer']} (rows: r={s['low']}, columns: r={s['high']}; 1 = same subspace):",
            "",
            *[f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(path))})" for p in s["pictures"]],
        ]
    lines += ["", "## What this shows", "", results.get("reading", "").strip(), ""]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def reading(results: dict[str, object]) -> str:
    """A plain statement of what the numbers say, computed from them (never written by hand)."""
    rows = [row for row in results["runs"] if row.get("exact_match_after") is not None]
    one_example = 1 / next((int(row["eval_rows"]) for row in rows if row.get("eval_rows")), 30)
    parts = []
    for targets in TARGETS:
        ours = sorted((row for row in rows if row["targets"] == targets), key=lambda row: row["r"])
        if not ours:
            continue
        best = max(row["exact_match_after"] for row in ours)
        smallest = next(row for row in ours if row["exact_match_after"] >= best - one_example - 1e-9)
        parts.append(f"For {targets}, the best exact match is {percent(best)}; the smallest rank within one "
                     f"example of it is r={smallest['r']} ({smallest['trainable_params']:,} trainable parameters).")
    s = results.get("similarity")
    if s:
        ratio_top = s["mean_top"] / s["chance_top"]
        ratio_rest = s["mean_rest"] / s["chance_rest"]
        parts.append(f"Between r={s['low']} and r={s['high']}, the top direction is shared far above chance (phi(1, 1) "
                     f"{s['phi_1_1_mean']:.3f} on average vs {1 / s['per_module'][0]['d']:.4f}) and the first "
                     f"{s['low']} directions of each overlap {ratio_top:.0f}x more than chance (mean phi "
                     f"{s['mean_top']:.3f} vs {s['chance_top']:.4f}). Against the r={s['high']} adapter's other "
                     f"directions (j > {s['low']}) the mean phi is {s['mean_rest']:.3f}, {ratio_rest:.1f}x its chance "
                     f"level {s['chance_rest']:.4f}: the top directions agree, as Hu et al. found; the rest overlap "
                     "much less relative to chance, though not at chance.")
    return " ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4,8,64")
    parser.add_argument("--targets", default="qv,all-linear", help=f"comma list of {sorted(TARGETS)}")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the built-in task's)")
    parser.add_argument("--eval-size", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join("runs", "rank"))
    parser.add_argument("--doc", default=DOC)
    parser.add_argument("--from-json", help="rewrite the page from a results.json of an earlier run")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as fh:
            results = json.load(fh)
        results["reading"] = reading(results)
        write_doc(results, args.doc)
        return 0
    ranks = [int(r) for r in args.ranks.split(",")]
    targets = args.targets.split(",")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or any(r <= 0 for r in ranks):
        parser.error(f"--targets must be from {sorted(TARGETS)} and --ranks positive integers")
    runs = [train_one(t, r, args) for t in targets for r in ranks]
    results: dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}",
        "command": "python benchmarks/bench_rank.py " + " ".join(sys.argv[1:]),
        "steps_note": f"{args.steps} steps" if args.steps else "the built-in task's default steps",
        "runs": runs,
    }
    by_key = {(row["targets"], row["r"]): row for row in runs if row["exit_code"] == 0}
    if ("qv", 8) in by_key and ("qv", 64) in by_key:
        results["similarity"] = compare_ranks(by_key["qv", 8], by_key["qv", 64], FIGURES)
    results["reading"] = reading(results)
    os.makedirs(FIGURES, exist_ok=True)
    with open(os.path.join(FIGURES, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
    write_doc(results, args.doc)
    print(f"wrote {args.doc}")
    return 0 if all(row["exit_code"] == 0 for row in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
