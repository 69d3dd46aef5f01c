"""DoRA training step: deltatune against HF PEFT, step time and peak memory, on CPU.

What is measured
----------------
* Model: a Llama shaped like SmolLM2-135M's blocks (576 hidden, 9 heads / 3 KV heads, 1536 MLP) with
  ``--layers`` blocks (default 6) and an 8192-token vocabulary (so that the adapted layers, not the LM
  head, make up most of the step), random weights, fp32, CPU. ``--quick``: a tiny Llama, a smoke run.
* One deep copy wrapped by deltatune and one by peft, the same ``LoraConfig(r=8, lora_alpha=16,
  lora_dropout=--dropout, use_dora=True, target_modules="all-linear")``; trainable parameter names and
  counts are asserted equal, and peft's adapter gets deltatune's initial values (random B, so DoRA's every
  term is live), so both do the same work: with dropout 0 their losses are compared every round.
* Step = forward with labels, ``backward()``, AdamW ``step()``, ``zero_grad()`` on one batch of random ids
  (default 4 x 256; ``--bf16``: the forward under CPU bf16 autocast). The two run alternately in one
  process, the order flipping every round, after ``--warmup`` discarded rounds (``bench_lora_step.py``'s
  method); reported: each median, the median of the per-round ratios deltatune / peft (the headline), the
  ratio of medians and of minima.
* Memory, two views:
  - saved for backward: the bytes of all tensors autograd keeps from one training forward (each storage
    counted once, parameters excluded), in this process; exact and free of allocator noise.
  - peak RSS: each library alone in a fresh subprocess (``--memory-child``), the kernel's RSS high-water mark
    over ``--memory-steps`` training steps after setup (VmHWM reset after the first step's allocations).

Usage::

    python benchmarks/bench_dora.py [--steps N] [--warmup K] [--layers L] [--batch B] [--seq S]
        [--dropout P] [--threads T] [--no-rss] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lora_step import Comparison, interval_text, to_ms, train_step, trainable  # noqa: E402
from procmem import status_kib  # noqa: E402

LIBRARIES = ("deltatune", "peft")
RANK, ALPHA = 8, 16


def build_base(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    if args.quick:
        config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=1000, max_position_embeddings=256)
    else:
        config = LlamaConfig(hidden_size=576, num_hidden_layers=args.layers, num_attention_heads=9,
                             num_key_value_heads=3, intermediate_size=1536, vocab_size=8192, tie_word_embeddings=True,
                             max_position_embeddings=2048)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype=torch.float32)


def wrap(library: str, base: nn.Module, dropout: float, use_dora: bool = True) -> nn.Module:
    if library == "deltatune":
        from deltatune import LoraConfig, get_peft_model
    else:
        from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, use_dora=use_dora, target_modules="all-linear",
                        init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(base), config)


def models(args: argparse.Namespace) -> dict[str, nn.Module]:
    """Both wrapped models, holding the same adapter values (and deltatune's plain LoRA with ``--with-lora``)."""
    base = build_base(args)
    out = {lib: wrap(lib, base, args.dropout) for lib in LIBRARIES}
    if args.with_lora:
        out["deltatune-lora"] = wrap("deltatune", base, args.dropout, use_dora=False)
    ours, theirs = trainable(out["deltatune"]), trainable(out["peft"])
    assert {n: p.shape for n, p in ours.items()} == {n: p.shape for n, p in theirs.items()}, "parameters differ"
    with torch.no_grad():
        for name, param in theirs.items():
            param.copy_(ours[name])
    return out


def alternate(steps: dict[str, Any], rounds: int, warmup: int, clock: Any
              ) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    """``bench_lora_step.alternate`` with a choice of clock: one step of each per round, the order flipping."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    results = []
    for index in range(warmup + rounds):
        order = list(steps) if index % 2 == 0 else list(steps)[::-1]
        row = {}
        for name in order:
            gc.collect()
            start = clock()
            row[name] = steps[name]()
            if index >= warmup:
                times[name].append(clock() - start)
        if index >= warmup:
            results.append(row)
    return times, results


def saved_for_backward_bytes(model: nn.Module, ids: torch.Tensor, bf16: bool = False) -> int:
    """Bytes autograd keeps from one training forward: every saved tensor's storage once, parameters left out
    (``deltatune.analysis.saved_tensor_bytes``: read from the graph, not with saved-tensor hooks, which would switch
    off deltatune's rebuilt inputs and also count graphs PEFT's DoRA drops at once)."""
    from deltatune.analysis import saved_tensor_bytes

    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    saved = saved_tensor_bytes(loss, exclude=model)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved


def memory_child(library: str, args: argparse.Namespace) -> dict[str, float]:
    """In a fresh process: build, wrap, one warm-up step, then the RSS high-water of ``--memory-steps`` steps."""
    model = wrap(library, build_base(args), args.dropout)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(args.seed + 1))
    model.train()
    step = train_step(model, torch.optim.AdamW(trainable(model).values(), lr=1e-4), ids, args.bf16)
    step()
    setup = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for _ in range(args.memory_steps):
        step()
    return {"after_first_step_mib": setup / 1024, "train_peak_mib": status_kib("VmHWM") / 1024}


def peak_rss(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # large blocks back to the OS at once: honest peaks
    out = {}
    for lib in LIBRARIES:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", lib, "--memory-steps",
               str(args.memory_steps), "--threads", str(args.threads), "--seed", str(args.seed), "--batch",
               str(args.batch), "--seq", str(args.seq), "--layers", str(args.layers), "--dropout",
               str(args.dropout)] + (["--quick"] if args.quick else []) + (["--bf16"] if args.bf16 else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[lib] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="measured rounds (default 15; 5 quick)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layers", type=int, default=6, help="Llama blocks (default 6)")
    parser.add_argument("--batch", type=int, default=None, help="default 4 (2 quick)")
    parser.add_argument("--seq", type=int, default=None, help="default 256 (16 quick)")
    parser.add_argument("--dropout", type=float, default=0.0, help="lora_dropout for both (default 0.0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time steps by wall clock (default) or by this process's CPU time (steadier on a "
                        "crowded machine; use with --threads 1, where CPU time is the work done)")
    parser.add_argument("--bf16", action="store_true", help="training forward under CPU bf16 autocast (both), as "
                        "the main job runs on CPUs with native bf16; weights and optimizer stay fp32")
    parser.add_argument("--with-lora", action="store_true",
                        help="also time deltatune's plain LoRA in the same rounds (what DoRA costs on top of it)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-child", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 15)
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq = args.seq or (16 if args.quick else 256)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return 0
    wrapped = models(args)
    vocab = wrapped["deltatune"].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed + 1))
    saved = {lib: saved_for_backward_bytes(model, ids, args.bf16) for lib, model in wrapped.items() if lib in LIBRARIES}
    steps = {}
    for lib, model in wrapped.items():
        model.train()
        steps[lib] = train_step(model, torch.optim.AdamW(trainable(model).values(), lr=1e-4), ids, args.bf16)
    times, results = alternate(steps, args.steps, args.warmup, time.process_time if args.clock == "cpu"
                               else time.perf_counter)
    train = Comparison("deltatune", "peft", to_ms(times["deltatune"]), to_ms(times["peft"]))
    floor = (Comparison("deltatune-lora", "peft", to_ms(times["deltatune-lora"]), to_ms(times["peft"]))
             if args.with_lora else None)
    loss_diff = (max(abs(float(r["deltatune"]) - float(r["peft"])) for r in results) if args.dropout == 0 else None)
    del wrapped, steps
    rss = None if args.no_rss else peak_rss(args)

    mib = 2**20
    print(f"DoRA training step, deltatune vs peft; {datetime.date.today()}, torch {torch.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}")
    shape = "tiny Llama (64 hidden x 2 layers, --quick)" if args.quick else f"Llama 576 hidden x {args.layers} layers"
    print(f"model: {shape}, batch "
          f"{args.batch} x {args.seq}, r={RANK}, all-linear, dropout {args.dropout}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.steps} rounds")
    print(f"step ms ({args.clock} clock): deltatune {train.median_a_ms:.1f}, peft {train.median_b_ms:.1f}; "
          f"median(ratio) {train.median_of_round_ratios:.3f} "
          f"[95% interval {interval_text(train.round_ratio_ci95)}], "
          f"ratio(medians) {train.ratio_of_medians:.3f}, ratio(minima) "
          f"{train.ratio_of_minima:.3f}; max|dloss| {'n/a' if loss_diff is None else f'{loss_diff:.1e}'}")
    if floor:
        print(f"deltatune plain LoRA (same r, no magnitude) in the same rounds: {floor.median_a_ms:.1f} ms, "
              f"median(ratio) to peft's DoRA {floor.median_of_round_ratios:.3f} "
              f"[{interval_text(floor.round_ratio_ci95)}], ratio(medians) {floor.ratio_of_medians:.3f}: the floor "
              "for any DoRA")
    print(f"saved for backward MiB: deltatune {saved['deltatune'] / mib:.1f}, peft {saved['peft'] / mib:.1f}, "
          f"ratio {saved['deltatune'] / saved['peft']:.3f}")
    if rss:
        d, p = rss["deltatune"]["train_peak_mib"], rss["peft"]["train_peak_mib"]
        print(f"peak RSS over {args.memory_steps} steps (fresh process each) MiB: deltatune {d:.0f}, peft {p:.0f}, "
              f"ratio {d / p:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "train": train.__dict__, "lora": floor and floor.__dict__,
                       "saved_bytes": saved, "peak_rss": rss,
                       "max_loss_diff": loss_diff}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
