"""What rebuilding adapted inputs in backward costs: a LoRA (or DoRA) step with and without it, and the floor.

deltatune's fused LoRA/DoRA nodes keep references to the factors an adapted layer's input was multiplied from
(RMSNorm's, the MLP's ``act(gate) * up``) and multiply them again in backward instead of keeping the input
(``methods/lora_inputs.py``). This script times one model's training step with that on and off in alternate
rounds (switched by replacing ``rebuildable_input`` in ``methods/lora_fused.py``, nothing else changes), with the
frozen base's forward + backward (``bench_floor.py``'s floor) in the same rotation, and the bytes autograd keeps.
``--per-layer`` compares instead against every layer rebuilding its own input (q/k/v and gate/up then each
multiply the same factors again; by default the layers that read one input share one rebuild).

Model: ``bench_lora_step.py``'s SmolLM2-135M-shaped Llama (30 layers, ``--quick``: a tiny one), fp32, CPU, r=8,
alpha 16, all-linear, AdamW.

Usage::

    python benchmarks/bench_rebuild.py [--steps N] [--warmup K] [--batch B] [--seq S] [--dora] [--threads T]
                                       [--per-layer]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deltatune.methods.lora_fused as lora_fused  # noqa: E402
import deltatune.methods.lora_inputs as lora_inputs  # noqa: E402
from bench_dora import saved_for_backward_bytes  # noqa: E402
from bench_floor import floor, floor_step  # noqa: E402
from bench_lora_step import ALPHA, RANK, build_base, train_step, trainable  # noqa: E402
from deltatune import LoraConfig, get_peft_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dora", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--per-layer", action="store_true",
                        help="against one rebuild per layer (no sharing between q/k/v or gate/up), not a kept input")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    base = build_base(args.quick, 0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    floor_model = floor(copy.deepcopy(base))
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                                           use_dora=args.dora, init_lora_weights=False))
    model.train()
    steps = {"floor": floor_step(floor_model, ids),
             "rebuilt": train_step(model, torch.optim.AdamW(trainable(model).values(), lr=1e-4), ids, False)}
    other = "per-layer" if args.per_layer else "kept"
    steps[other] = steps["rebuilt"]
    rebuild = lora_fused.rebuildable_input

    def unshared(x: torch.Tensor) -> object:
        lora_inputs._LAST.entry = None  # forget the last input seen: this layer starts its own rebuild
        return rebuild(x)

    def switch(kind: str) -> None:
        lora_fused.rebuildable_input = {"rebuilt": rebuild, "kept": lambda x: None, "per-layer": unshared}.get(
            kind, rebuild)

    saved = {}
    for kind in ("rebuilt", other):
        switch(kind)
        saved[kind] = saved_for_backward_bytes(model, ids) / 2**20
    saved["floor"] = saved_for_backward_bytes(floor_model, ids) / 2**20
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    order = list(steps)
    for index in range(args.warmup + args.steps):
        for kind in (order if index % 2 else order[::-1]):
            switch(kind)
            start = time.perf_counter()
            steps[kind]()
            if index >= args.warmup:
                times[kind].append(time.perf_counter() - start)
    switch("rebuilt")
    print(f"{'DoRA' if args.dora else 'LoRA'} all-linear, batch {args.batch} x {args.seq}, {torch.get_num_threads()} "
          f"threads, {args.steps} rounds, torch {torch.__version__}")
    for kind in order:
        median_ms = statistics.median(times[kind]) * 1e3
        print(f"{kind:9s} step ms {median_ms:8.1f}   saved for backward MiB {saved[kind]:7.1f}")
    ratio = statistics.median(a / b for a, b in zip(times["rebuilt"], times[other], strict=True))
    print(f"rebuilt / {other}: median of per-round ratios {ratio:.3f}; over the floor: rebuilt "
          f"{statistics.median(a / b for a, b in zip(times['rebuilt'], times['floor'], strict=True)):.3f}, {other} "
          f"{statistics.median(a / b for a, b in zip(times[other], times['floor'], strict=True)):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
