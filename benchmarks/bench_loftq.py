"""LoftQ against plain QLoRA on the main job (SmolLM2-135M-Instruct, the built-in task), on CPU.

What is measured
----------------
1. Where training starts. For ``--quantize`` (default nf4) and the main job's adapter (LoRA r=8, alpha 16, all
   linear layers; LoftQ also at ``--start-ranks``, alpha 2r): the held-out loss (mean token cross-entropy on
   the answers of ``--eval-size`` built-in examples) of the float model, of the quantized base with a plain
   LoRA adapter (B = 0: QLoRA's start), and of LoftQ's start with 1 and ``--loftq-iter`` rounds; and the
   weight error of the adapted layers, ``||W - (deq(Q) + s B A)|| / ||W||`` against QLoRA's
   ``||W - deq(Q(W))|| / ||W||`` (summed over layers).
2. Where training ends. ``deltatune train --quantize Q`` and ``deltatune train --quantize Q --init loftq`` for
   each of ``--steps`` (short runs, where a better start should show) and ``--seeds``, everything else the
   main job's defaults: exact match before / after on the held-out examples, the last training loss, and the
   held-out loss after training.

Usage::

    python benchmarks/bench_loftq.py [--quantize nf4] [--steps 8,16] [--seeds 0] [--eval-size 30]
        [--start-ranks 8,64] [--no-train | --train-json EARLIER.json] [--json runs/loftq/results.json]
        [--doc docs/loftq.md] [--from-json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from typing import Any

import torch


def heldout(tokenizer: Any, eval_size: int, seed: int = 0, n_train: int = 8
            ) -> tuple[list[Any], list[dict[str, list[int]]]]:
    """The built-in task's held-out examples (those of a run with this seed and training size) and their rows."""
    from deltatune.train import data as datamod
    from deltatune.train.task import builtin_splits

    _, rows = builtin_splits(n_train, eval_size, seed)
    examples = datamod.to_examples(rows[:eval_size], "chat", tokenizer, "built-in")
    return examples, datamod.tokenize(examples, tokenizer, 512, "built-in").rows


def start_losses(args: argparse.Namespace) -> dict[str, Any]:
    """Held-out loss and weight error of each starting point (no training)."""
    from deltatune import LoraConfig, get_peft_model
    from deltatune.formats.models import load_model, load_tokenizer, quantize_beside_adapters, resolve_model
    from deltatune.quant import quantize_4bit, quantize_int8
    from deltatune.train.evaluate import mean_loss

    source = resolve_model(None)
    tokenizer = load_tokenizer(source)
    _, rows = heldout(tokenizer, args.eval_size)
    lora = dict(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    out: dict[str, Any] = {}

    def loss_of(model: torch.nn.Module) -> float:
        return round(mean_loss(model.eval(), rows, tokenizer.pad_token_id), 4)

    model, _ = load_model(source, tokenizer=tokenizer)
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    out["float"] = {"loss": loss_of(model)}
    bits = 4 if args.quantize == "nf4" else 8
    err = qerr = norm = 0.0
    for w in floats.values():
        q = quantize_4bit(w, 64, double_quant=True) if bits == 4 else quantize_int8(w)
        qerr += (w - q.dequantize(torch.float32)).norm().item() ** 2
        norm += w.norm().item() ** 2
    del model
    gc.collect()
    model, _ = load_model(source, quantize=args.quantize, tokenizer=tokenizer)
    out["qlora"] = {"loss": loss_of(get_peft_model(model, LoraConfig(**lora))), "weight_error": (qerr / norm) ** 0.5}
    del model
    gc.collect()
    for rank, iters in [(r, i) for r in args.start_ranks for i in sorted({1, args.loftq_iter})]:
        model, _ = load_model(source, tokenizer=tokenizer)
        started = time.perf_counter()
        peft_model = get_peft_model(model, LoraConfig(**{**lora, "r": rank, "lora_alpha": 2 * rank},
                                                      init_lora_weights="loftq",
                                                      loftq_config={"loftq_bits": bits, "loftq_iter": iters}))
        seconds = time.perf_counter() - started
        quantize_beside_adapters(peft_model, args.quantize)
        err = 0.0
        for name, w in floats.items():
            layer = peft_model.get_base_model().get_submodule(name)
            update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            err += (w - layer.base_layer.dequantized_weight(torch.float32) - update).norm().item() ** 2
        key = f"loftq_iter{iters}" + ("" if rank == 8 else f"_r{rank}")
        out[key] = {"loss": loss_of(peft_model), "weight_error": (err / norm) ** 0.5,
                                     "init_seconds": round(seconds, 1)}
        del model, peft_model
        gc.collect()
    return out


def train_runs(args: argparse.Namespace, work: str) -> list[dict[str, Any]]:
    """Short ``deltatune train`` runs, QLoRA and LoftQ alternating."""
    from deltatune.formats.models import load_tokenizer, resolve_model
    from deltatune.train import run as runmod
    from deltatune.train.config import TrainConfig
    from deltatune.train.evaluate import mean_loss
    from deltatune.train.infer import load_adapted

    tokenizer = load_tokenizer(resolve_model(None))
    results = []
    for steps in args.steps:
        for seed in args.seeds:
            defaults = TrainConfig(max_steps=steps)
            _, rows = heldout(tokenizer, args.eval_size, seed, steps * defaults.batch_size * defaults.grad_accum)
            for init in ("qlora", "loftq"):
                output = os.path.join(work, f"{init}-s{steps}-seed{seed}")
                options = {"init": "loftq"} if init == "loftq" else {}
                print(f"[{time.strftime('%H:%M:%S')}] {init} steps={steps} seed={seed}", flush=True)
                summary = runmod.train(TrainConfig(quantize=args.quantize, max_steps=steps, seed=seed,
                                                   eval_size=args.eval_size, output=output, overwrite=True,
                                                   options=options))
                model, _ = load_adapted(output)
                results.append({"init": init, "steps": steps, "seed": seed,
                                "em_before": summary.exact_match_before, "em_after": summary.exact_match_after,
                                "final_train_loss": summary.final_loss,
                                "heldout_loss_after": round(mean_loss(model, rows, tokenizer.pad_token_id), 4),
                                "train_seconds": round(summary.train_seconds or 0, 1)})
                del model
                gc.collect()
    return results


def render(result: dict[str, Any]) -> str:
    q = result["settings"]["quantize"]
    lines = [
        "# LoftQ against plain QLoRA on the main job",
        "",
        f"Measured {result['date']} on {result['machine']} with `python benchmarks/bench_loftq.py "
        f"{result['settings']['argv']}`. Model: SmolLM2-135M-Instruct; base quantized to {q}; adapter: the main "
        "job's LoRA (r=8, alpha 16, all linear layers); data: the built-in order-to-JSON task, "
        f"{result['settings']['eval_size']} held-out examples."
        + (f" The training runs are from an earlier run of the script ({result['settings']['train_run']})."
           if "train_run" in result["settings"] else ""),
    ]
    if result["settings"].get("note"):
        lines += ["", result["settings"]["note"]]
    lines += [
        "",
        "## Where training starts",
        "",
        "| start | held-out loss | weight error of the adapted layers |",
        "|---|---|---|",
    ]
    names = {"float": "float model (no quantization)", "qlora": f"QLoRA: {q} base, B = 0"}
    for key, row in result["start"].items():
        rounds, _, rank = key.removeprefix("loftq_iter").partition("_r")
        label = names.get(key, f"LoftQ, {rounds} round(s), r={rank or 8}")
        error = f"{row['weight_error']:.4f}" if "weight_error" in row else "0"
        lines.append(f"| {label} | {row['loss']:.4f} | {error} |")
    lines += ["", "Weight error: sqrt(sum ||W - W_start||^2 / sum ||W||^2) over the adapted layers.", "",
              "## Where training ends", "",
              "| steps | seed | init | exact match before -> after | last training loss | held-out loss after | "
              "training s |", "|---|---|---|---|---|---|---|"]
    for row in result["train"]:
        loss = "n/a" if row["final_train_loss"] is None else f"{row['final_train_loss']:.4f}"
        lines.append(f"| {row['steps']} | {row['seed']} | {row['init']} | {row['em_before']:.2f} -> "
                     f"{row['em_after']:.2f} | {loss} | {row['heldout_loss_after']:.4f} | {row['train_seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default="nf4", choices=["nf4", "int8"])
    parser.add_argument("--steps", default="8,16", help="comma-separated step counts of the training runs")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--eval-size", type=int, default=30)
    parser.add_argument("--loftq-iter", type=int, default=4, help="rounds of the second LoftQ start measured")
    parser.add_argument("--start-ranks", default="8", help="LoRA ranks of the LoftQ starting points (alpha = 2r)")
    parser.add_argument("--no-train", action="store_true", help="only the starting points")
    parser.add_argument("--train-json", help="take the training runs from this earlier results file")
    parser.add_argument("--work", default=os.path.join("runs", "loftq"))
    parser.add_argument("--json", help="results file (default: WORK/results.json)")
    parser.add_argument("--doc", default=os.path.join("docs", "loftq.md"))
    parser.add_argument("--from-json", help="only re-render --doc from this results file")
    parser.add_argument("--note", help="a paragraph for the report (e.g. what else ran on the machine)")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as fh:
            result = json.load(fh)
        if args.note:
            result["settings"]["note"] = args.note
    else:
        args.steps = [int(s) for s in args.steps.split(",")]
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.start_ranks = [int(s) for s in args.start_ranks.split(",")]
        os.makedirs(args.work, exist_ok=True)
        torch.set_num_threads(os.cpu_count() or 1)
        result = {"date": datetime.date.today().isoformat(),
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}",
                  "settings": {"quantize": args.quantize, "eval_size": args.eval_size,
                               "argv": " ".join(sys.argv[1:]), "note": args.note}}
        result["start"] = start_losses(args)
        print(json.dumps(result["start"], indent=2), flush=True)
        if args.train_json:
            with open(args.train_json, encoding="utf-8") as fh:
                earlier = json.load(fh)
            result["train"] = earlier["train"]
            result["settings"]["train_run"] = f"{earlier['date']}, `{earlier['settings']['argv']}`"
        else:
            result["train"] = [] if args.no_train else train_runs(args, args.work)
        with open(args.json or os.path.join(args.work, "results.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    text = render(result)
    with open(args.doc, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
