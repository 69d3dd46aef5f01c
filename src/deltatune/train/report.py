"""What a run leaves behind besides the adapter: the training log, the loss curve, the summary."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

LOG_NAME = "train_log.jsonl"
CURVE_NAME = "loss_curve.png"
SUMMARY_NAME = "run_summary.json"


@dataclass
class RunSummary:
    """The numbers a run prints at the end, also written to run_summary.json."""

    output_dir: str
    base_model: str  # the local folder or GGUF file trained on (adapter_config.json may record a hub id instead)
    data: str
    train_rows: int
    eval_rows: int
    truncated: int
    steps: int
    trainable_params: int
    all_params: int
    exact_match_before: float | None = None
    exact_match_after: float | None = None
    final_loss: float | None = None
    train_seconds: float | None = None
    total_seconds: float | None = None
    samples: list[dict[str, str]] = field(default_factory=list)

    def write(self) -> str:
        path = os.path.join(self.output_dir, SUMMARY_NAME)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(asdict(self), fh, indent=2)
        return path


def write_log(log_history: list[dict[str, Any]], directory: str) -> str:
    """One JSON object per logged step (loss, learning rate, grad norm, epoch)."""
    path = os.path.join(directory, LOG_NAME)
    with open(path, "w", encoding="utf-8") as fh:
        for entry in log_history:
            fh.write(json.dumps(entry) + "\n")
    return path


def plot_loss(log_history: list[dict[str, Any]], directory: str) -> str | None:
    """Save the training loss per step as a PNG; None when nothing was logged."""
    points = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps, losses = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = os.path.join(directory, CURVE_NAME)
    fig.savefig(path)
    plt.close(fig)
    return path


def print_summary(summary: RunSummary) -> None:
    """The end-of-run report: before/after score, where things are, how to chat with the result."""
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    print()
    print(f"exact match on {summary.eval_rows} held-out examples: before {pct(summary.exact_match_before)}"
          f" -> after {pct(summary.exact_match_after)}")
    for sample in summary.samples[:3]:
        print(f"  prompt:    {sample['prompt']}\n  expected:  {sample['expected']}\n  got:       {sample['got']}")
    if summary.truncated:
        print(f"{summary.truncated} training rows were longer than max_length and were cut.")
    print(f"adapter, log ({LOG_NAME}), loss curve ({CURVE_NAME}) and summary in {summary.output_dir}")
    print(f"time: {summary.total_seconds:.0f}s in all, {summary.train_seconds:.0f}s training")
    print("\nTalk to the result:")
    print(f"  deltatune chat --adapter {summary.output_dir}")


RUN_INFO_NAME = "deltatune_run.json"


def write_run_info(output: str, fmt: str, max_new_tokens: int, quantize: str | None) -> None:
    """A record beside the adapter of how it was trained; loaders read ``quantize`` to rebuild the same base."""
    with open(os.path.join(output, RUN_INFO_NAME), "w", encoding="utf-8") as fh:
        json.dump({"format": fmt, "max_new_tokens": max_new_tokens, "quantize": quantize}, fh, indent=2)


def read_run_info(adapter: str) -> dict[str, Any]:
    """What deltatune train recorded beside the adapter (empty for adapters from elsewhere)."""
    path = os.path.join(adapter, RUN_INFO_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
