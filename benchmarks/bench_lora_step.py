"""LoRA training-step and merged-inference speed: deltatune against HF PEFT, on CPU.

What is measured
----------------
* Model: a Llama shaped like SmolLM2-135M (576 hidden, 30 layers, 9 heads / 3 KV heads, 1536 MLP,
  49152 vocab, tied embeddings), random weights, fp32, on CPU. ``--quick`` swaps in a tiny Llama
  and a tiny batch for a smoke run that finishes in seconds.
* For each target set ("qv" = q_proj + v_proj, and "all-linear") one deep copy of that base model is
  wrapped with deltatune and one with peft, same ``LoraConfig`` (r=8, lora_alpha=16,
  lora_dropout=``--dropout``, default 0.0). Both get ``torch.optim.AdamW`` over their trainable
  parameters; the trainable-parameter counts must be equal (asserted). With dropout 0 the
  deltatune adapter weights are copied into the peft model, so both run exactly the same
  computation and their losses are compared every round as a check that the work is identical.
* Training step = forward with labels -> ``loss.backward()`` -> ``optimizer.step()`` ->
  ``optimizer.zero_grad()``, on one fixed batch of random token ids (default 4 x 128).
* Inference: after training, the deltatune model is merged (``merge_and_unload()``); the merged
  model must hold no adapter layer (asserted) and give the unmerged model's logits (checked). Its
  ``torch.no_grad()`` forward is then timed against the untouched base model's.

Method
------
The machine is shared and noisy, so the two contenders are timed *alternately* in one process:
each round runs one step of each, and the order flips every round (A B, B A, A B, ...), so a slow
spell of the machine and any first/second position effect hit both sides alike. ``--warmup``
rounds are run first and discarded. Each step is timed with ``time.perf_counter`` (a
``gc.collect()`` runs before, outside the timer). Reported per target set:

* the median step time of each side (medians shrug off the odd step a neighbour's job slowed);
* the median of the per-round ratios ``deltatune / peft`` (each ratio compares two steps taken
  seconds apart, under nearly the same load; this is the headline number);
* the ratio of the two medians and the ratio of the two minima (best-of-N); all three should
  agree. If they differ a lot, neighbours' load swamped the run and it should be repeated.

Usage::

    python benchmarks/bench_lora_step.py [--steps N] [--warmup K] [--targets qv,all-linear]
        [--threads T] [--dropout P] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

TARGET_SETS: dict[str, list[str] | str] = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}
LIBRARIES = ("deltatune", "peft")
RANK, ALPHA = 8, 16


# ---- setup --------------------------------------------------------------------------------------


def llama_config(quick: bool) -> Any:
    """SmolLM2-135M's shape, or a tiny Llama for ``--quick``."""
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=1000, tie_word_embeddings=True,
                           max_position_embeddings=256)
    return LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                       max_position_embeddings=2048)


def build_base(quick: bool, seed: int) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = llama_config(quick)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype=torch.float32, device="cpu")


def wrap(library: str, base: nn.Module, targets: list[str] | str, dropout: float) -> nn.Module:
    """A deep copy of ``base`` with a LoRA adapter from ``library`` ("deltatune" or "peft")."""
    if library == "deltatune":
        from deltatune import LoraConfig, get_peft_model
    else:
        from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=copy.deepcopy(targets))
    return get_peft_model(copy.deepcopy(base), config)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def copy_adapter_weights(source: nn.Module, target: nn.Module) -> bool:
    """Give ``target`` the trainable tensors of ``source`` (same PEFT names); False if names differ."""
    src, dst = trainable(source), trainable(target)
    if set(src) != set(dst):
        return False
    with torch.no_grad():
        for name, param in dst.items():
            param.copy_(src[name])
    return True


def count_adapter_layers(model: nn.Module) -> int:
    """Modules that still look like adapter wrappers (deltatune's or peft's)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from deltatune.adapter_layer import AdapterLayer

    return sum(isinstance(m, (AdapterLayer, BaseTunerLayer)) or hasattr(m, "base_layer") for m in model.modules())


# ---- timing -------------------------------------------------------------------------------------


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
               bf16: bool = False) -> Callable[[], float]:
    """One full step; the returned closure gives the step's loss. ``bf16``: the forward under CPU bf16 autocast
    (what the main job does on a CPU with AMX/AVX512-BF16; the weights and the optimizer stay fp32)."""

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def forward_only(model: nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    def step() -> Any:
        with torch.no_grad():
            return model(input_ids=ids).logits[0, 0, 0]

    return step


def alternate(
    steps: dict[str, Callable[[], Any]], rounds: int, warmup: int
) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    """Run the callables in turn, flipping the order every round; times (s) and results of measured rounds."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: list[dict[str, Any]] = []
    gc.collect()
    gc.freeze()  # park the long-lived objects so the per-step collect below costs microseconds
    try:
        _run_rounds(steps, names, rounds, warmup, times, results)
    finally:
        gc.unfreeze()
    return times, results


def _run_rounds(steps: dict[str, Callable[[], Any]], names: list[str], rounds: int, warmup: int,
                times: dict[str, list[float]], results: list[dict[str, Any]]) -> None:
    for round_index in range(warmup + rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        round_results: dict[str, Any] = {}
        for name in order:
            gc.collect()
            start = time.perf_counter()
            round_results[name] = steps[name]()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
        if round_index >= warmup:
            results.append(round_results)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values``: the k-th smallest and k-th largest, k the largest
    with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2, so it covers the true median with at least that
    probability if the values are independent draws (NaN when n is too small for that). Rounds on a shared machine
    drift together, so read it as the least uncertainty a run has, not the most."""
    n, tail = len(values), (1 - confidence) / 2
    k, below = 0, 0.0
    while k < n and below + math.comb(n, k) / 2 ** n <= tail:
        below += math.comb(n, k) / 2 ** n
        k += 1
    if k == 0:
        return math.nan, math.nan
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


@dataclass
class Comparison:
    """Times in ms of ``a`` and ``b``, measured alternately; ratios are a / b."""

    a: str
    b: str
    a_ms: list[float]
    b_ms: list[float]
    median_a_ms: float = field(init=False)
    median_b_ms: float = field(init=False)
    median_of_round_ratios: float = field(init=False)
    ratio_of_medians: float = field(init=False)
    ratio_of_minima: float = field(init=False)  # best-of-N: a third view, least touched by neighbours
    round_ratio_ci95: tuple[float, float] = field(init=False)  # around median_of_round_ratios (median_interval)

    def __post_init__(self) -> None:
        self.median_a_ms = statistics.median(self.a_ms)
        self.median_b_ms = statistics.median(self.b_ms)
        round_ratios = [x / y for x, y in zip(self.a_ms, self.b_ms, strict=True)]
        self.median_of_round_ratios = statistics.median(round_ratios)
        self.round_ratio_ci95 = median_interval(round_ratios)
        self.ratio_of_medians = self.median_a_ms / self.median_b_ms
        self.ratio_of_minima = min(self.a_ms) / min(self.b_ms)


def to_ms(times: list[float]) -> list[float]:
    return [round(t * 1000, 3) for t in times]


# ---- one target set -----------------------------------------------------------------------------


@dataclass
class TargetResult:
    targets: str
    trainable_params: int
    adapter_layers: int
    train: Comparison
    inference: Comparison
    max_loss_diff: float | None  # |loss_deltatune - loss_peft| over rounds; None when not comparable
    merged_max_logit_diff: float


def run_target_set(key: str, base: nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> TargetResult:
    targets = TARGET_SETS[key]
    models = {lib: wrap(lib, base, targets, args.dropout) for lib in LIBRARIES}
    counts = {lib: sum(p.numel() for p in trainable(m).values()) for lib, m in models.items()}
    assert counts["deltatune"] == counts["peft"], f"{key}: trainable parameter counts differ: {counts}"
    layers = {lib: count_adapter_layers(m) for lib, m in models.items()}
    assert layers["deltatune"] == layers["peft"], f"{key}: adapted layer counts differ: {layers}"
    synced = args.dropout == 0.0 and copy_adapter_weights(models["deltatune"], models["peft"])

    steps: dict[str, Callable[[], Any]] = {}
    for lib, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-4)
        steps[lib] = train_step(model, optimizer, ids, args.bf16)
    times, results = alternate(steps, args.steps, args.warmup)
    train = Comparison("deltatune", "peft", to_ms(times["deltatune"]), to_ms(times["peft"]))
    max_loss_diff = (max(abs(float(r["deltatune"]) - float(r["peft"])) for r in results) if synced else None)

    # Inference: merge the (now trained, so non-zero) deltatune adapter and compare with the bare base model.
    dt_model = models.pop("deltatune")
    del models, steps
    gc.collect()
    dt_model.eval()
    with torch.no_grad():
        unmerged_logits = dt_model(input_ids=ids).logits
    merged = dt_model.merge_and_unload()
    leftover = count_adapter_layers(merged)
    assert leftover == 0, f"{key}: merged model still holds {leftover} adapter layers"
    assert not any("lora_" in name for name, _ in merged.named_parameters()), f"{key}: lora_ parameters left"
    assert type(merged) is type(base)
    merged.eval()
    base.eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    merged_diff = float((merged_logits - unmerged_logits).abs().max())
    del unmerged_logits, merged_logits
    inf_times, _ = alternate({"merged": forward_only(merged, ids), "base": forward_only(base, ids)},
                             args.steps, args.warmup)
    inference = Comparison("merged", "base", to_ms(inf_times["merged"]), to_ms(inf_times["base"]))
    del merged, dt_model
    gc.collect()
    return TargetResult(key, counts["deltatune"], layers["deltatune"], train, inference, max_loss_diff, merged_diff)


# ---- main ---------------------------------------------------------------------------------------


def add_step_arguments(parser: argparse.ArgumentParser, steps: int, quick_steps: int, warmup: int) -> None:
    """The options every step benchmark shares (this one and bench_qlora_step.py); see `fill_step_defaults`."""
    parser.add_argument("--steps", type=int, default=None,
                        help=f"measured rounds per comparison (default {steps}; {quick_steps} quick)")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=f"discarded rounds before measuring (default {warmup})")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 4; 2 quick)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 128; 16 quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write all numbers (raw times included) here")
    parser.add_argument("--quick", action="store_true", help="tiny model and batch: a smoke run of a few seconds")
    parser.add_argument("--bf16", action="store_true", help="training forward under CPU bf16 autocast, for both "
                        "libraries (the main job's default on CPUs with native bf16); default fp32")


def fill_step_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser, steps: int, quick_steps: int) -> None:
    """Defaults that depend on --quick, the thread count, and the range checks of `add_step_arguments`' options."""
    args.steps = args.steps or (quick_steps if args.quick else steps)
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq = args.seq or (16 if args.quick else 128)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, steps=20, quick_steps=10, warmup=3)
    parser.add_argument("--targets", default="qv,all-linear", help=f"comma list from {sorted(TARGET_SETS)}")
    parser.add_argument("--dropout", type=float, default=0.0, help="lora_dropout for both libraries (default 0.0)")
    args = parser.parse_args(argv)
    fill_step_defaults(args, parser, steps=20, quick_steps=10)
    args.target_keys = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.target_keys if t not in TARGET_SETS]
    if unknown:
        parser.error(f"unknown target sets {unknown}; choose from {sorted(TARGET_SETS)}")
    return args


def interval_text(interval: tuple[float, float], digits: int = 3) -> str:
    """A :func:`median_interval` as ``low-high``, or n/a where the rounds were too few for one (under 6)."""
    low, high = interval
    return "n/a" if math.isnan(low) else f"{low:.{digits}f}-{high:.{digits}f}"


def print_report(results: list[TargetResult], header: str) -> None:
    print(header)
    print()
    print("training step (fwd+labels, backward, AdamW step, zero_grad); ratio = deltatune / peft")
    print(f"{'targets':<11} {'trainable':>10} {'layers':>6} {'deltatune ms':>13} {'peft ms':>9} "
          f"{'med(ratio)':>10} {'95% interval':>12} {'ratio(med)':>10} {'ratio(min)':>10} {'max|dloss|':>10}")
    for r in results:
        t = r.train
        loss = "n/a" if r.max_loss_diff is None else f"{r.max_loss_diff:.1e}"
        print(f"{r.targets:<11} {r.trainable_params:>10,d} {r.adapter_layers:>6d} {t.median_a_ms:>13.1f} "
              f"{t.median_b_ms:>9.1f} {t.median_of_round_ratios:>10.3f} {interval_text(t.round_ratio_ci95):>12} "
              f"{t.ratio_of_medians:>10.3f} "
              f"{t.ratio_of_minima:>10.3f} {loss:>10}")
    print()
    print("inference, torch.no_grad forward; ratio = deltatune merge_and_unload() model / bare base model")
    print(f"{'targets':<11} {'merged ms':>10} {'base ms':>9} {'med(ratio)':>10} {'95% interval':>12} "
          f"{'ratio(med)':>10} "
          f"{'ratio(min)':>10} {'max|dlogit|':>11}")
    for r in results:
        i = r.inference
        print(f"{r.targets:<11} {i.median_a_ms:>10.1f} {i.median_b_ms:>9.1f} {i.median_of_round_ratios:>10.3f} "
              f"{interval_text(i.round_ratio_ci95):>12} {i.ratio_of_medians:>10.3f} {i.ratio_of_minima:>10.3f} "
              f"{r.merged_max_logit_diff:>11.1e}")
    print("(med(ratio) = median of per-round ratios; ratio(med) = ratio of the two medians; ratio(min) = ratio of\n"
          " the fastest steps; if the three disagree the machine was too busy; max|dlogit| = merged vs unmerged)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    import peft
    import transformers

    import deltatune

    base = build_base(args.quick, args.seed)
    base_params = sum(p.numel() for p in base.parameters())
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=generator)
    header = (
        f"model: {'tiny Llama (--quick)' if args.quick else 'SmolLM2-135M-shaped Llama'}, "
        f"{base_params / 1e6:.1f}M params, fp32 CPU{' + bf16 autocast' if args.bf16 else ''} | "
        f"batch {args.batch}x{args.seq} | "
        f"r={RANK} alpha={ALPHA} dropout={args.dropout} | "
        f"{args.steps} measured + {args.warmup} warm-up rounds, alternating | threads {args.threads}\n"
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"deltatune {deltatune.__version__}, python {platform.python_version()}"
    )
    started = time.perf_counter()
    results = []
    for key in args.target_keys:
        print(f"[{time.perf_counter() - started:6.1f}s] timing {key} ...", file=sys.stderr, flush=True)
        results.append(run_target_set(key, base, ids, args))
    print(f"[{time.perf_counter() - started:6.1f}s] done", file=sys.stderr, flush=True)
    print_report(results, header)
    if args.json:
        payload = {
            "header": header,
            "args": {k: v for k, v in vars(args).items() if k != "target_keys"},
            "results": [asdict(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
