"""What ``deltatune analyze`` writes: PNG plots (matplotlib, Agg, imported only when plotting), CSV and JSON."""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import asdict

import torch

from .adapter import AdapterSource, load_lora
from .intrinsic import IntrinsicResult, intrinsic_dimension
from .intrinsic_tasks import IntrinsicSettings, RowMaker, load_model_and_task
from .similarity import similarity_grids, similarity_rows
from .spectrum import effective_rank, spectrum_rows, update_svdvals


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def file_stem(module: str) -> str:
    """A module name as a file name: anything but letters, digits, '.', '_' and '-' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", module)


def layer_index(module: str) -> int | None:
    """The first number between dots in a module name (the layer of ``model.layers.3.mlp.up_proj``), if any."""
    found = re.search(r"\.(\d+)\.", f".{module}.")
    return int(found.group(1)) if found else None


def write_csv(path: str, rows: list[dict[str, object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_similarity(grid: torch.Tensor, title: str, path: str, matrix: str = "A") -> None:
    """A heatmap of phi(i, j) like Hu et al. 2021, Figure 3: i (first adapter) down, j (second) across."""
    plt = _pyplot()
    r_a, r_b = grid.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.25 * max(r_b, 8), 1.2 + 0.25 * max(r_a, 8)))
    image = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", origin="upper",
                      extent=(0.5, r_b + 0.5, r_a + 0.5, 0.5), aspect="auto")
    ax.set_xlabel("j (second adapter)")
    ax.set_ylabel("i (first adapter)")
    ax.set_title(f"{title}\nphi(i, j), matrix {matrix}", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_spectra(spectra: dict[str, torch.Tensor], path: str) -> None:
    """Left: each module's singular values by index, coloured by layer; right: effective rank per layer and
    module kind (the last part of the name, e.g. q_proj)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    # x: the layer number, or the module's position when its name has none
    xs = [layer if (layer := layer_index(name)) is not None else i for i, name in enumerate(spectra)]
    cmap = plt.get_cmap("viridis")
    positive = all(bool((s > 0).all()) for s in spectra.values())
    kinds: dict[str, list[tuple[int, float]]] = {}
    for x, (name, s) in zip(xs, spectra.items(), strict=True):
        left.plot(range(1, len(s) + 1), s.numpy(), color=cmap(x / max(xs + [1])), alpha=0.7, linewidth=1)
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append((x, effective_rank(s)))
    if positive:
        left.set_yscale("log")
    left.set_xlabel("index i")
    left.set_ylabel("singular value of scaling * B @ A")
    left.set_title("spectra (colour: layer)")
    for kind, points in kinds.items():
        points.sort()  # the folder's order is by name ("layers.10" before "layers.2"): draw the line by layer
        right.plot([x for x, _ in points], [e for _, e in points], marker="o", label=kind)
    right.set_xlabel("layer")
    right.set_ylabel("effective rank exp(H(s / sum s))")
    right.set_title("effective rank across layers")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def similarity_report(a: AdapterSource, b: AdapterSource, out: str | os.PathLike, module: str | None = None,
                      matrix: str = "A") -> list[str]:
    """``deltatune analyze similarity``: one heatmap PNG per module, similarity.csv and similarity.json.

    Returns the paths written. Raises ValueError as :func:`~.similarity.subspace_similarity`.
    """
    factors_a, factors_b = load_lora(a), load_lora(b)
    grids = similarity_grids(factors_a, factors_b, matrix, module)
    dims = {name: factors_a[name].A.shape[1] if matrix == "A" else factors_a[name].B.shape[0] for name in grids}
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    paths = []
    for name, grid in grids.items():
        paths.append(os.path.join(out, f"similarity_{file_stem(name)}.png"))
        plot_similarity(grid, name, paths[-1], matrix)
    paths.append(os.path.join(out, "similarity.csv"))
    write_csv(paths[-1], similarity_rows(grids, dims))
    paths.append(os.path.join(out, "similarity.json"))
    with open(paths[-1], "w", encoding="utf-8") as fh:
        json.dump({"matrix": matrix, "phi": {name: grid.tolist() for name, grid in grids.items()}}, fh)
    return paths


def spectrum_report(adapter: AdapterSource, out: str | os.PathLike) -> list[str]:
    """``deltatune analyze spectrum``: spectrum.png, spectrum.csv and spectrum.json (all singular values too).

    Returns the paths written. Raises ValueError as :func:`~.spectrum.spectrum`.
    """
    factors = load_lora(adapter)
    spectra = {name: update_svdvals(f) for name, f in factors.items()}
    rows = spectrum_rows(spectra)
    for row in rows:
        row["scaling"] = factors[str(row["module"])].scaling
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, name) for name in ("spectrum.png", "spectrum.csv", "spectrum.json")]
    plot_spectra(spectra, paths[0])
    write_csv(paths[1], rows)
    with open(paths[2], "w", encoding="utf-8") as fh:
        json.dump([{**row, "singular_values": spectra[str(row["module"])].tolist()} for row in rows], fh, indent=1)
    return paths


def plot_intrinsic(result: IntrinsicResult, path: str, title: str = "") -> None:
    """The metric against d (log axis) with full fine-tuning's metric, its 90% line and the untrained model's."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot([r.d for r in result.runs], [r.metric for r in result.runs], marker="o", label="trained in d dims")
    full = result.full.metric if result.full else (result.threshold or 0.0) / 0.9
    ax.axhline(full, color="black", linewidth=1, label=f"full fine-tuning ({full:.3f})")
    ax.axhline(0.9 * full, color="black", linestyle="--", linewidth=1, label="90% of full")
    ax.axhline(result.baseline, color="grey", linestyle=":", linewidth=1, label=f"no training ({result.baseline:.3f})")
    if result.d90 is not None:
        ax.axvline(result.d90, color="tab:red", linewidth=1, label=f"d90 = {result.d90}")
    ax.set_xscale("log")
    ax.set_xlabel("d (trained dimensions" + (", SAID)" if result.said else ")"))
    ax.set_ylabel(result.metric)
    ax.set_title(f"{title or result.task}: D = {result.D:,}, {result.steps} steps, "
                 f"d90 = {result.d90 if result.d90 is not None else 'not reached'}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def intrinsic_rows(result: IntrinsicResult) -> list[dict[str, object]]:
    """One CSV row per run: full fine-tuning (d "full") first, then each d."""
    runs = ([result.full] if result.full else []) + result.runs
    return [{"d": "full" if r.d is None else r.d, result.metric: round(r.metric, 6),
             "final_loss": round(r.final_loss, 6), "seconds_per_step": round(r.seconds_per_step, 4),
             "peak_memory_mib": round(r.peak_memory_bytes / 2**20, 1),
             "projection_mib": round(r.stored_bytes / 2**20, 1), "trainable": r.trainable} for r in runs]


def intrinsic_report(settings: IntrinsicSettings, out: str | os.PathLike,
                     builtin_rows: RowMaker | None = None) -> list[str]:
    """``deltatune analyze intrinsic``: train at each d and fully, write intrinsic.png, .csv and .json (with d90).

    Returns the paths written. Raises ValueError/FileNotFoundError as :func:`~.intrinsic_tasks.load_model_and_task`
    and :func:`~.intrinsic.intrinsic_dimension` (bad dims are refused before any training).
    """
    settings = settings.resolved()
    model, task = load_model_and_task(settings, builtin_rows)
    result = intrinsic_dimension(model, task, settings.dims, settings.steps, settings.lr, settings.full_lr,
                                 settings.said, settings.seed)
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, name) for name in ("intrinsic.png", "intrinsic.csv", "intrinsic.json")]
    name = settings.model or ("all-MiniLM-L6-v2" if settings.task == "sst2" else "SmolLM2-135M-Instruct")
    plot_intrinsic(result, paths[0], f"{name} on {settings.task}")
    write_csv(paths[1], intrinsic_rows(result))
    with open(paths[2], "w", encoding="utf-8") as fh:
        json.dump({"model": name, "settings": asdict(settings), **result.to_dict()}, fh, indent=1)
    return paths
