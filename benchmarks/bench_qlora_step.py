"""QLoRA training-step time and peak memory: deltatune NF4 + LoRA against bitsandbytes NF4 + HF PEFT, on CPU.

What is measured
----------------
* Model: a Llama shaped like SmolLM2-135M (576 hidden, 30 layers, 9 heads / 3 KV heads, 1536 MLP, 49152 vocab,
  tied embeddings), random weights, fp32, CPU; batch 4 x 128 random token ids. ``--quick`` uses a tiny Llama.
* deltatune: ``deltatune.quant.quantize_model(model, bits=4)`` (NF4, blocksize 64, double quantization, every
  linear layer but the output head), then ``deltatune.get_peft_model(model, deltatune.LoraConfig(...))``.
* PEFT + bitsandbytes: every ``nn.Linear`` but ``lm_head`` becomes ``bnb.nn.Linear4bit(quant_type="nf4",
  compress_statistics=True, compute_dtype=torch.float32)`` holding a ``bnb.nn.Params4bit`` of the same fp32
  weight (quantized by bitsandbytes' CPU kernels on ``.to("cpu")``), then ``peft.get_peft_model``.
* Both: ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")``, AdamW (lr 1e-4) on the
  trainable parameters. The NF4 codes of the two are bit-identical, and deltatune's initial adapter weights are
  copied into the PEFT model, so both do the same arithmetic: the losses are compared every round.
* Step = forward with labels -> ``loss.backward()`` -> ``optimizer.step()`` -> ``optimizer.zero_grad()``; with
  ``--bf16`` the forward runs under CPU bf16 autocast. ``--unfused`` adds a third model in the same rounds:
  deltatune with its fused LoRA training path off, to show what that path is worth.

Method
------
Time (a): the two models live in one process and are stepped alternately, the order flipping every round, after
``--warmup`` discarded rounds (the machine is shared, so a slow spell hits both alike). Reported: each side's
median step, the median of the per-round ratios deltatune / PEFT+bnb (the headline), the ratio of the medians
and the ratio of the minima. The timing loop is ``bench_lora_step.alternate``.

Memory (c), ``--memory``: this script is started once per library in a fresh subprocess (``--memory-child``),
which builds the fp32 model, quantizes and wraps it, then resets the kernel's RSS high-water mark
(``/proc/self/clear_refs`` <- 5) and runs ``--memory-steps`` training steps. Reported per library: RSS after
setup, the training high-water mark (VmHWM after the reset: what QLoRA training itself needs), and the
whole-process peak (``ru_maxrss``, dominated by the fp32 model built before quantization). The children run with
``MALLOC_MMAP_THRESHOLD_=131072`` so freed large tensors go back to the kernel at once and RSS tracks live memory
rather than glibc's arena history; both libraries get the same setting.

Stored bytes (b) are ``benchmarks/bench_quant_bytes.py``'s job; run that.

Usage::

    python benchmarks/bench_qlora_step.py [--steps N] [--warmup K] [--threads T] [--bf16] [--unfused]
        [--json out.json] [--quick]
    python benchmarks/bench_qlora_step.py --memory [--memory-steps 5] [--threads T] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lora_step import (  # noqa: E402 - the sibling benchmark's model, step and alternating timer
    Comparison,
    add_step_arguments,
    alternate,
    build_base,
    copy_adapter_weights,
    fill_step_defaults,
    interval_text,
    to_ms,
    train_step,
    trainable,
)
from procmem import status_kib  # noqa: E402

LIBRARIES = ("deltatune", "peft+bnb")
UNFUSED = "deltatune-unfused"
RANK, ALPHA = 8, 16


def bnb_quantize(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` except the output head for a bitsandbytes NF4 ``Linear4bit``, in place."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    for name in names:
        linear = model.get_submodule(name)
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4",
                                device="meta")
        weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                   quant_type="nf4", blocksize=64)
        new.weight = weight.to("cpu")  # quantizes here
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def qlora_model(library: str, base: nn.Module) -> nn.Module:
    """``base`` (modified in place) quantized to NF4 and wrapped with an all-linear LoRA adapter by ``library``."""
    if library == "deltatune":
        import deltatune
        from deltatune.quant import quantize_model

        quantize_model(base, bits=4)
        config = deltatune.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
        return deltatune.get_peft_model(base, config)
    import peft

    bnb_quantize(base)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
    return peft.get_peft_model(base, config)


# ---- (a) step time --------------------------------------------------------------------------------


def time_steps(args: argparse.Namespace) -> dict[str, Any]:
    base = build_base(args.quick, args.seed)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(args.seed + 1))
    models = {lib: qlora_model(lib, copy.deepcopy(base)) for lib in LIBRARIES}
    if args.unfused:  # a third contender: deltatune with its fused LoRA training path switched off
        models[UNFUSED] = unfused(qlora_model("deltatune", copy.deepcopy(base)))
    del base
    counts = {lib: sum(p.numel() for p in trainable(m).values()) for lib, m in models.items()}
    assert len(set(counts.values())) == 1, f"trainable parameter counts differ: {counts}"
    synced = all(copy_adapter_weights(models["deltatune"], m) for lib, m in models.items() if lib != "deltatune")
    steps = {}
    for lib, model in models.items():
        model.train()
        steps[lib] = train_step(model, torch.optim.AdamW(trainable(model).values(), lr=1e-4), ids, args.bf16)
    times, results = alternate(steps, args.steps, args.warmup)
    comparison = Comparison("deltatune", "peft+bnb", to_ms(times["deltatune"]), to_ms(times["peft+bnb"]))
    max_loss_diff = max(abs(float(r["deltatune"]) - float(r["peft+bnb"])) for r in results) if synced else None
    out = {"trainable_params": counts["deltatune"], "train": asdict(comparison), "max_loss_diff": max_loss_diff}
    if args.unfused:
        out["fused_vs_unfused"] = asdict(Comparison("deltatune", UNFUSED, to_ms(times["deltatune"]),
                                                    to_ms(times[UNFUSED])))
    return out


def unfused(model: nn.Module) -> nn.Module:
    """``model`` with every LoRA layer on its module-by-module path (what deltatune did before the fused one)."""
    from deltatune.methods.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module._fusable = False
    return model


# ---- (c) peak memory ------------------------------------------------------------------------------


def memory_child(library: str, args: argparse.Namespace) -> dict[str, float]:
    """Build, quantize and wrap in this process, then train ``--memory-steps`` steps; sizes in MiB."""
    model = qlora_model(library, build_base(args.quick, args.seed))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(args.seed + 1))
    model.train()
    step = train_step(model, torch.optim.AdamW(trainable(model).values(), lr=1e-4), ids, args.bf16)
    setup_rss = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for _ in range(args.memory_steps):
        step()
    return {"setup_rss_mib": setup_rss / 1024, "train_peak_mib": status_kib("VmHWM") / 1024,
            "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_memory(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = {}
    for lib in LIBRARIES:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", lib, "--memory-steps",
               str(args.memory_steps), "--threads", str(args.threads), "--seed", str(args.seed),
               "--batch", str(args.batch), "--seq", str(args.seq)] + (["--quick"] if args.quick else []) + \
              (["--bf16"] if args.bf16 else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[lib] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, steps=15, quick_steps=5, warmup=2)
    parser.add_argument("--memory", action="store_true", help="measure peak RSS (one subprocess per library) "
                        "instead of step time")
    parser.add_argument("--memory-steps", type=int, default=5, help="training steps per memory run (default 5)")
    parser.add_argument("--unfused", action="store_true", help="also time deltatune with its fused LoRA training "
                        "path off, in the same rounds, and print fused / unfused")
    parser.add_argument("--memory-child", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fill_step_defaults(args, parser, steps=15, quick_steps=5)
    if args.memory_steps < 1:
        parser.error("--memory-steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return 0

    import bitsandbytes
    import peft
    import transformers

    import deltatune

    precision = "fp32 CPU + bf16 autocast" if args.bf16 else "fp32 CPU"
    header = (f"model: {'tiny Llama (--quick)' if args.quick else 'SmolLM2-135M-shaped Llama'}, {precision} | "
              f"batch {args.batch}x{args.seq} | NF4 bs64 double-quant, LoRA all-linear r={RANK} alpha={ALPHA} | "
              f"threads {args.threads}\ntorch {torch.__version__}, transformers {transformers.__version__}, "
              f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, deltatune {deltatune.__version__}, "
              f"python {platform.python_version()}")
    print(header)
    started = time.perf_counter()
    payload: dict[str, Any] = {"header": header, "args": vars(args)}
    if args.memory:
        mem = payload["memory"] = measure_memory(args)
        print(f"peak RSS, {args.memory_steps} QLoRA training steps, one subprocess each (MiB)")
        print(f"{'library':<10} {'after setup':>12} {'train peak':>11} {'process peak':>13}")
        for lib, m in mem.items():
            print(f"{lib:<10} {m['setup_rss_mib']:>12.1f} {m['train_peak_mib']:>11.1f} {m['process_peak_mib']:>13.1f}")
        ratio = mem["deltatune"]["train_peak_mib"] / mem["peft+bnb"]["train_peak_mib"]
        print(f"train peak ratio deltatune / peft+bnb = {ratio:.3f}")
    else:
        res = payload["step"] = time_steps(args)
        t = res["train"]
        loss = "n/a" if res["max_loss_diff"] is None else f"{res['max_loss_diff']:.1e}"
        print(f"QLoRA training step, {args.steps} measured + {args.warmup} warm-up rounds, alternating; "
              f"trainable {res['trainable_params']:,}")
        print(f"  deltatune median {t['median_a_ms']:.1f} ms | peft+bnb median {t['median_b_ms']:.1f} ms")
        interval = interval_text(t["round_ratio_ci95"])
        print(f"  med(ratio) {t['median_of_round_ratios']:.3f} [95% interval {interval}] | "
              f"ratio(med) {t['ratio_of_medians']:.3f} | "
              f"ratio(min) {t['ratio_of_minima']:.3f} | max|dloss| {loss}   (ratio = deltatune / peft+bnb)")
        if args.unfused:
            u = res["fused_vs_unfused"]
            print(f"  deltatune-unfused median {u['median_b_ms']:.1f} ms | fused / unfused: med(ratio) "
                  f"{u['median_of_round_ratios']:.3f} | ratio(med) {u['ratio_of_medians']:.3f} | "
                  f"ratio(min) {u['ratio_of_minima']:.3f}")
    print(f"[{time.perf_counter() - started:.1f}s]", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
