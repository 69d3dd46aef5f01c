"""How close LoRA gets to the floor: deltatune, HF PEFT and the frozen base model, side by side, on CPU.

The floor is the least work any adapter step can take: the frozen base model doing the same forward and
backward with gradients flowing only to its inputs (the embedding output), no parameter gradient and no
optimizer. Every row of issue 14's table is measured here, each with the floor (or the bare base model) in
the same rotation, the order flipping every round as in ``bench_lora_step.py``:

* ``step all-linear`` / ``step q,v``: a LoRA training step (forward with labels, backward, AdamW step,
  zero_grad) over the floor's forward + backward. Five contenders in one rotation: floor, deltatune and
  PEFT on all linear layers, deltatune and PEFT on q_proj + v_proj. ``--aa`` adds a sixth, an identical copy
  of deltatune's all-linear model, and reports it against the original: on a noisy machine that ratio, which
  should be 1, shows how much of a difference one run can resolve.
* ``prefill``: an unmerged, all-linear adapter's ``no_grad`` forward over the bare base model's, batch 4 x 128.
* ``decode``: one new token for each of 4 rows with a 128-token KV cache, unmerged adapter over the bare
  base model (the cache is cropped back to 128 after every call, so every call does the same work).
* ``memory``: training memory added over the weights, all-linear: in a fresh process per contender, the RSS
  high-water mark of ``--memory-steps`` steps minus the RSS before the first one (model and optimizer built,
  no state yet), so it counts activations, gradients, optimizer states and transient buffers. Also the bytes
  autograd saves for backward in one forward (each storage once, parameters excluded), a count that does not
  depend on the allocator.
* ``qlora``: an NF4 base (double quantization, blocks of 64) with all-linear LoRA: deltatune against PEFT +
  bitsandbytes, with deltatune's NF4 base as the floor in the same rotation.

Every adapter starts from the same values in both libraries (B random, so the update is live), and the
losses / logits are compared as a check that both do the same work.

Usage::

    python benchmarks/bench_floor.py [--rows step,prefill,decode,memory,qlora] [--steps N] [--warmup K]
        [--threads T] [--batch B] [--seq S] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from bench_dora import saved_for_backward_bytes  # the script's own folder is on sys.path
from bench_lora_step import (
    ALPHA,
    RANK,
    Comparison,
    alternate,
    build_base,
    copy_adapter_weights,
    interval_text,
    median_interval,
    to_ms,
    train_step,
    trainable,
)
from bench_qlora_step import bnb_quantize
from procmem import status_kib

W = 32  # width of a contender's column in the report
ROWS = ("step", "prefill", "decode", "memory", "qlora")
TARGETS: dict[str, list[str] | str] = {"all-linear": "all-linear", "qv": ["q_proj", "v_proj"]}
# issue 14's targets, contender / floor (qlora: deltatune / PEFT + bitsandbytes)
TARGET_RATIOS = {"step all-linear": 1.05, "step q,v": 1.02, "prefill": 1.03, "decode": 1.05, "memory": 1.10,
                 "qlora vs peft+bnb": 0.80}


# ---- contenders ------------------------------------------------------------------------------------


def lora(library: str, base: nn.Module, targets: list[str] | str) -> nn.Module:
    """``base`` (not copied) with an r=8 LoRA adapter from ``library``, B drawn at random so the update is live."""
    if library == "deltatune":
        from deltatune import LoraConfig, get_peft_model
    else:
        from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=copy.deepcopy(targets))
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in trainable(model).items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return model


def floor(base: nn.Module) -> nn.Module:
    """``base`` (not copied), frozen, with gradients flowing to its embedding output and nowhere else."""
    for param in base.parameters():
        param.requires_grad_(False)
    base.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    return base


def floor_step(model: nn.Module, ids: torch.Tensor, bf16: bool = False) -> Callable[[], torch.Tensor]:
    """Forward with labels and backward, as a training step does, without any parameter to update."""

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    return step


def synced_pair(base: nn.Module, targets: list[str] | str) -> dict[str, nn.Module]:
    """deltatune's and PEFT's LoRA on copies of ``base``, PEFT's adapter given deltatune's values."""
    pair = {lib: lora(lib, copy.deepcopy(base), targets) for lib in ("deltatune", "peft")}
    assert copy_adapter_weights(pair["deltatune"], pair["peft"]), "adapter names differ between the libraries"
    return pair


def max_diff(results: list[dict[str, Any]], a: str, b: str) -> float:
    return max(float((torch.as_tensor(r[a]).float() - torch.as_tensor(r[b]).float()).abs().max()) for r in results)


# ---- rows ------------------------------------------------------------------------------------------


def step_rows(base: nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    models = {"floor": floor(copy.deepcopy(base))}
    for key in ("all-linear", "qv"):
        for lib, model in synced_pair(base, TARGETS[key]).items():
            models[f"{lib} {key}"] = model
    if args.aa:  # a second deltatune all-linear model, identical to the first: what one run can tell apart
        models["deltatune all-linear copy"] = copy.deepcopy(models["deltatune all-linear"])
    steps = {"floor": floor_step(models["floor"], ids, args.bf16)}
    for name, model in models.items():
        model.train()
        if name != "floor":
            steps[name] = train_step(model, torch.optim.AdamW(trainable(model).values(), lr=1e-4), ids, args.bf16)
    times, results = alternate(steps, args.steps, args.warmup)
    ms = {name: to_ms(t) for name, t in times.items()}
    out: dict[str, Any] = {}
    for key, label in (("all-linear", "step all-linear"), ("qv", "step q,v")):
        out[label] = {lib: asdict(Comparison(f"{lib} {key}", "floor", ms[f"{lib} {key}"], ms["floor"]))
                      for lib in ("deltatune", "peft")}
        out[label]["max_loss_diff"] = max_diff(results, f"deltatune {key}", f"peft {key}")
    if args.aa:
        out["a/a"] = asdict(Comparison("deltatune all-linear copy", "deltatune all-linear",
                                       ms["deltatune all-linear copy"], ms["deltatune all-linear"]))
    return out


def decode_call(model: nn.Module, prompt: torch.Tensor, new: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One cached decoding forward of ``new`` (rows x 1) after ``prompt``; the cache is cut back after each call."""
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
    length = prompt.shape[1]
    mask = torch.ones(prompt.shape[0], length + 1, dtype=torch.long)
    position = torch.full((prompt.shape[0], 1), length, dtype=torch.long)

    def call() -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=new, attention_mask=mask, position_ids=position, past_key_values=cache,
                           use_cache=True).logits
        cache.crop(-1)
        return logits[:, -1]

    return call


def inference_rows(base: nn.Module, ids: torch.Tensor, args: argparse.Namespace, rows: list[str]) -> dict[str, Any]:
    models = {"base": base, **synced_pair(base, TARGETS["all-linear"])}
    for model in models.values():
        model.eval()
    out: dict[str, Any] = {}
    if "prefill" in rows:
        def forward(model: nn.Module) -> Callable[[], torch.Tensor]:
            def call() -> torch.Tensor:
                with torch.no_grad():
                    return model(input_ids=ids).logits[:, -1]
            return call

        times, results = alternate({name: forward(m) for name, m in models.items()}, args.steps, args.warmup)
        out["prefill"] = _versus_base(times, results)
    if "decode" in rows:
        new = ids[:, :1].clone()
        calls = {name: decode_call(m, ids, new) for name, m in models.items()}
        times, results = alternate(calls, args.decode_steps, args.warmup * 5)
        out["decode"] = _versus_base(times, results)
    return out


def _versus_base(times: dict[str, list[float]], results: list[dict[str, Any]]) -> dict[str, Any]:
    ms = {name: to_ms(t) for name, t in times.items()}
    row: dict[str, Any] = {lib: asdict(Comparison(lib, "base", ms[lib], ms["base"])) for lib in ("deltatune", "peft")}
    row["max_logit_diff"] = max_diff(results, "deltatune", "peft")
    return row


def qlora_row(base: nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    from deltatune.quant import quantize_model

    dt_base = copy.deepcopy(base)
    quantize_model(dt_base, bits=4)
    models = {"floor": floor(copy.deepcopy(dt_base)),
              "deltatune": lora("deltatune", dt_base, "all-linear"),
              "peft+bnb": lora("peft", bnb_quantize(copy.deepcopy(base)), "all-linear")}
    assert copy_adapter_weights(models["deltatune"], models["peft+bnb"])
    steps = {"floor": floor_step(models["floor"], ids, args.bf16)}
    for name in ("deltatune", "peft+bnb"):
        models[name].train()
        steps[name] = train_step(models[name], torch.optim.AdamW(trainable(models[name]).values(), lr=1e-4), ids,
                                 args.bf16)
    times, results = alternate(steps, args.qlora_steps, args.warmup)
    ms = {name: to_ms(t) for name, t in times.items()}
    return {"qlora vs peft+bnb": asdict(Comparison("deltatune", "peft+bnb", ms["deltatune"], ms["peft+bnb"])),
            "qlora over floor": {lib: asdict(Comparison(lib, "floor", ms[lib], ms["floor"]))
                                 for lib in ("deltatune", "peft+bnb")},
            "max_loss_diff": max_diff(results, "deltatune", "peft+bnb")}


# ---- memory (fresh processes) ----------------------------------------------------------------------


def memory_child(contender: str, args: argparse.Namespace) -> dict[str, float]:
    base = build_base(args.quick, args.seed)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(args.seed + 1))
    if contender == "floor":
        model = floor(base)
        step = floor_step(model, ids, args.bf16)
    else:
        model = lora(contender, base, "all-linear")
        step = train_step(model, torch.optim.AdamW(trainable(model).values(), lr=1e-4), ids, args.bf16)
    model.train()
    saved = saved_for_backward_bytes(model, ids, args.bf16)
    model.zero_grad(set_to_none=True)
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for _ in range(args.memory_steps):
        step()
    peak = status_kib("VmHWM")
    return {"before_mib": before / 1024, "peak_mib": peak / 1024, "added_mib": (peak - before) / 1024,
            "saved_for_backward_mib": saved / 2**20}


def memory_row(args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # large blocks go back to the OS at once
    out: dict[str, Any] = {}
    for contender in ("floor", "deltatune", "peft"):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", contender, "--memory-steps",
               str(args.memory_steps), "--threads", str(args.threads), "--seed", str(args.seed), "--batch",
               str(args.batch), "--seq", str(args.seq)] + (["--quick"] if args.quick else []) + \
              (["--bf16"] if args.bf16 else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[contender] = json.loads(proc.stdout.strip().splitlines()[-1])
    for lib in ("deltatune", "peft"):
        out[f"{lib} / floor"] = {
            "added": out[lib]["added_mib"] / out["floor"]["added_mib"],
            "saved_for_backward": out[lib]["saved_for_backward_mib"] / out["floor"]["saved_for_backward_mib"],
        }
    return out


# ---- report ----------------------------------------------------------------------------------------


def report(payload: dict[str, Any]) -> None:
    print(payload["header"])
    print()
    print("ratio = median of per-round ratios [its 95% interval] (ratio of medians, ratio of fastest); contender "
          "over floor/base")
    print(f"{'row':<28} {'deltatune':>{W}} {'PEFT':>{W}} {'target':>7}  floor/base ms")

    def cell(c: dict[str, Any]) -> str:
        # from the times, not a stored interval: JSON files written before the interval existed have none
        interval = interval_text(median_interval([a / b for a, b in zip(c["a_ms"], c["b_ms"], strict=True)]), 2)
        return (f"{c['median_of_round_ratios']:.3f} [{interval}] "
                f"({c['ratio_of_medians']:.2f},{c['ratio_of_minima']:.2f})")

    res = payload["results"]
    for label in ("step all-linear", "step q,v", "prefill", "decode"):
        if label in res:
            r = res[label]
            print(f"{label:<28} {cell(r['deltatune']):>{W}} {cell(r['peft']):>{W}} {TARGET_RATIOS[label]:>7.2f}  "
                  f"{r['deltatune']['median_b_ms']:.1f} (deltatune {r['deltatune']['median_a_ms']:.1f}, "
                  f"PEFT {r['peft']['median_a_ms']:.1f})")
    if "a/a" in res:
        print(f"{'  a/a: identical copy / it':<28} {cell(res['a/a']):>{W}} {'':>{W}} {'':>7}  "
              f"{res['a/a']['median_a_ms']:.1f} vs {res['a/a']['median_b_ms']:.1f} (1.000 but for noise)")
    if "memory" in res:
        m = res["memory"]
        d, p = m["deltatune / floor"], m["peft / floor"]
        print(f"{'memory added, all-linear':<28} {d['added']:>{W}.3f} {p['added']:>{W}.3f} "
              f"{TARGET_RATIOS['memory']:>7.2f}  added MiB: floor {m['floor']['added_mib']:.0f}, "
              f"deltatune {m['deltatune']['added_mib']:.0f}, PEFT {m['peft']['added_mib']:.0f}")
        print(f"{'  saved for backward':<28} {d['saved_for_backward']:>{W}.3f} {p['saved_for_backward']:>{W}.3f} "
              f"{'':>7}  MiB: floor {m['floor']['saved_for_backward_mib']:.0f}, deltatune "
              f"{m['deltatune']['saved_for_backward_mib']:.0f}, PEFT {m['peft']['saved_for_backward_mib']:.0f}")
    if "qlora vs peft+bnb" in res:
        q, f = res["qlora vs peft+bnb"], res["qlora over floor"]
        print(f"{'qlora step vs PEFT + bnb':<28} {cell(q):>{W}} {'1.000':>{W}} "
              f"{TARGET_RATIOS['qlora vs peft+bnb']:>7.2f}  deltatune {q['median_a_ms']:.1f}, "
              f"PEFT + bnb {q['median_b_ms']:.1f}")
        print(f"{'  qlora step over NF4 floor':<28} {cell(f['deltatune']):>{W}} {cell(f['peft+bnb']):>{W}} "
              f"{'':>7}  {f['deltatune']['median_b_ms']:.1f}")
    for key in ("max_loss_diff", "max_logit_diff"):
        diffs = {label: r[key] for label, r in res.items() if isinstance(r, dict) and key in r}
        if diffs:
            print(f"{key} deltatune vs PEFT: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list from {list(ROWS)}")
    parser.add_argument("--steps", type=int, default=None, help="measured rounds per rotation (default 12; 4 quick)")
    parser.add_argument("--decode-steps", type=int, default=None, help="measured decode rounds (default 60)")
    parser.add_argument("--qlora-steps", type=int, default=None, help="measured QLoRA rounds (default --steps)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--batch", type=int, default=None, help="default 4 (2 quick)")
    parser.add_argument("--seq", type=int, default=None, help="default 128 (16 quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="training forwards under CPU bf16 autocast")
    parser.add_argument("--aa", action="store_true",
                        help="step rows: add an identical copy of deltatune's all-linear model to the rotation and "
                             "report it against the original (an A/A test: how far apart one run puts equal code)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--quick", action="store_true", help="tiny Llama and batch: a smoke run")
    parser.add_argument("--memory-child", choices=("floor", "deltatune", "peft"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 12)
    args.decode_steps = args.decode_steps or (10 if args.quick else 60)
    args.qlora_steps = args.qlora_steps or args.steps
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq = args.seq or (16 if args.quick else 128)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.row_list = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(args.row_list) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return 0
    import peft
    import transformers

    import deltatune

    base = build_base(args.quick, args.seed)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(args.seed + 1))
    header = (f"model: {'tiny Llama (--quick)' if args.quick else 'SmolLM2-135M-shaped Llama (30 layers)'}, "
              f"fp32{' + bf16 autocast' if args.bf16 else ''}, CPU ({platform.processor() or platform.machine()}, "
              f"{args.threads} threads) | batch {args.batch}x{args.seq} | LoRA r={RANK} alpha={ALPHA} dropout 0 | "
              f"{args.steps} measured + {args.warmup} warm-up rounds, alternating\n"
              f"{time.strftime('%Y-%m-%d')} | torch {torch.__version__}, transformers {transformers.__version__}, "
              f"peft {peft.__version__}, deltatune {deltatune.__version__}")
    started = time.perf_counter()
    results: dict[str, Any] = {}
    plan = [("step", lambda: step_rows(base, ids, args)),
            ("prefill/decode", lambda: inference_rows(base, ids, args, args.row_list)),
            ("memory", lambda: {"memory": memory_row(args)}),
            ("qlora", lambda: qlora_row(base, ids, args))]
    for name, run in plan:
        if any(part in args.row_list for part in name.split("/")):
            print(f"[{time.perf_counter() - started:6.1f}s] {name} ...", file=sys.stderr, flush=True)
            results.update(run())
    print(f"[{time.perf_counter() - started:6.1f}s] done", file=sys.stderr, flush=True)
    payload = {"header": header, "args": {k: v for k, v in vars(args).items() if k != "row_list"},
               "results": results}
    report(payload)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
