"""What a run leaves behind besides the adapter: the training log, the loss curve, the summary."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import write_atomically
from ..quant.convert import QUANTIZE_NAMES

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
        """Write run_summary.json (strict JSON: a value that is not finite is null, never a made-up number)."""
        path = os.path.join(self.output_dir, SUMMARY_NAME)
        _write_json(path, _finite_or_none(asdict(self)), indent=2)
        return path


def write_log(log_history: list[dict[str, Any]], directory: str) -> str:
    """One JSON object per logged step (loss, learning rate, grad norm, epoch); NaN/Inf are written as null."""
    path = os.path.join(directory, LOG_NAME)
    text = "".join(json.dumps(_finite_or_none(entry), allow_nan=False) + "\n" for entry in log_history)
    write_atomically(path, lambda tmp: _write_text(tmp, text))
    return path


def _finite_or_none(value: Any) -> Any:
    """``value`` with every NaN/Inf float replaced by None: JSON has no NaN, and 0 would be a lie."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    return value


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _write_json(path: str, data: Any, **options: Any) -> None:
    """Strict JSON written to a temporary file and renamed, so a crash never leaves a torn record."""
    text = json.dumps(data, allow_nan=False, **options)
    write_atomically(path, lambda tmp: _write_text(tmp, text))


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
    _write_json(os.path.join(output, RUN_INFO_NAME),
                {"format": fmt, "max_new_tokens": max_new_tokens, "quantize": quantize}, indent=2)


def read_run_info(adapter: str) -> dict[str, Any]:
    """What deltatune train recorded beside the adapter (empty for adapters from elsewhere).

    Raises:
        ValueError: the file is not a JSON object with a known ``quantize`` (names the file and the fix).
    """
    path = os.path.join(adapter, RUN_INFO_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh, parse_constant=_refuse_constant)
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not readable JSON ({' '.join(str(err).split())}); fix it or delete it "
                         "(it only records how the adapter was trained).") from err
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(info).__name__}; fix it or delete it.")
    if info.get("quantize") is not None and info["quantize"] not in QUANTIZE_NAMES:
        raise ValueError(f"{path}: quantize={info['quantize']!r} is not one of {', '.join(QUANTIZE_NAMES)} or null.")
    return info


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
