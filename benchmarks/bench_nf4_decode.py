"""NF4 decode and quantized-layer time: deltatune's pure-PyTorch decode against bitsandbytes' C kernel, on CPU.

For each linear weight shape of SmolLM2-135M (q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536), NF4 with
blocksize 64 and double quantization, fp32:

* decode: the weight's kept ``DecodePlan`` replayed into the scratch buffers, as ``Linear4bit``'s backward does, against
  ``bitsandbytes.functional.dequantize_4bit`` (which allocates its result, as bitsandbytes' layers do);
* layer: forward + backward of ``deltatune.quant.Linear4bit`` against ``bitsandbytes.nn.Linear4bit`` on a 512-token
  input that needs a gradient (what a QLoRA step does per layer, minus LoRA).

The two sides alternate in rounds; medians in microseconds and their ratio (deltatune / bitsandbytes) are printed,
plus the per-step total weighted by how often each shape occurs in the model (x30 layers, forward and backward).
Standalone numbers flatter both sides (the data stays in cache between calls); the step benchmark
``bench_qlora_step.py`` is the one that counts.

Usage::

    python benchmarks/bench_nf4_decode.py [--threads T] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch

SHAPES = {"q/o": ((576, 576), 60), "k/v": ((192, 576), 60), "gate/up": ((1536, 576), 60), "down": ((576, 1536), 30)}


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def alternate(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Median microseconds per call of each function, timed in alternating rounds after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t = per_call_us(fns[name], calls)
            if r:
                times[name].append(t)
    return {name: statistics.median(v) for name, v in times.items()}


def compare_shape(out_f: int, in_f: int, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """(decode, layer forward + backward) median microseconds of each library for one weight shape."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    from deltatune.quant import Linear4bit, quantize_nf4
    from deltatune.quant.linear import _SCRATCH

    weight = torch.randn(out_f, in_f) * 0.05
    ours = Linear4bit(quantize_nf4(weight))
    packed, state = bnb_f.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    theirs = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4", device="meta")
    theirs.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                      blocksize=64).to("cpu")
    scales = ours.weight.absmax_fp32()
    assert torch.equal(_SCRATCH.plan(ours.weight, torch.float32).run(scales), bnb_f.dequantize_4bit(packed, state))
    decode = alternate({"ours": lambda: _SCRATCH.plan(ours.weight, torch.float32).run(scales),
                        "bnb": lambda: bnb_f.dequantize_4bit(packed, state)}, rounds, 100)
    x = torch.randn(512, in_f, requires_grad=True)
    grad = torch.randn(512, out_f)

    def step(layer: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer(x).backward(grad)
            x.grad = None
        return run

    return decode, alternate({"ours": step(ours), "bnb": step(theirs)}, rounds, 10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    warnings.filterwarnings("ignore")
    import bitsandbytes as bnb

    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()} | torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    print(f"{'shape':10s} {'decode us':>10s} {'bnb us':>8s} {'ratio':>6s} | {'layer f+b us':>12s} {'bnb us':>8s} "
          f"{'ratio':>6s}")
    totals = {"decode": [0.0, 0.0], "layer": [0.0, 0.0]}
    for name, ((out_f, in_f), count) in SHAPES.items():
        decode, layer = compare_shape(out_f, in_f, args.rounds)
        print(f"{name:10s} {decode['ours']:10.1f} {decode['bnb']:8.1f} {decode['ours'] / decode['bnb']:6.3f} | "
              f"{layer['ours']:12.1f} {layer['bnb']:8.1f} {layer['ours'] / layer['bnb']:6.3f}")
        totals["decode"][0] += decode["ours"] * count * 2
        totals["decode"][1] += decode["bnb"] * count * 2
        totals["layer"][0] += layer["ours"] * count
        totals["layer"][1] += layer["bnb"] * count
    for what, (a, b) in totals.items():
        print(f"per step, {what}: deltatune {a / 1e3:.1f} ms, bitsandbytes {b / 1e3:.1f} ms, ratio {a / b:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
