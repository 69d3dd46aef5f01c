"""The main job's training against the same training done by HF PEFT + ``transformers.Trainer``.

deltatune's side is the default run, ``deltatune train`` (SmolLM2-135M-Instruct, the built-in task, LoRA r=8 on
all linear layers, the default precision), plus any flags given after ``--``. PEFT's side trains the same
model on the same rows with the same ``TrainingArguments`` (batch, accumulation, learning rate and schedule,
steps, seed, precision, checkpoint interval) and the same collator, so the batches are the same; its LoRA is
``peft.LoraConfig`` with deltatune's r, alpha, dropout and target modules, and starts from deltatune's initial
adapter values (copied over). It is a plain ``transformers.Trainer``: the model's own loss over every position,
padded batches. Both are then scored by the same greedy exact-match evaluation on the same held-out rows.

Each side runs in a fresh process; the sides alternate (D P, P D, ...) for ``--rounds`` rounds. Reported: the
training seconds (the time inside ``Trainer.train``, as run_summary.json's ``train_seconds``), the median of the
per-round ratios deltatune / PEFT, the exact match of each and their last logged losses.

Usage::

    python benchmarks/bench_vs_peft_trainer.py [--rounds 2] [--output runs/vs-peft] [--json FILE] [-- train flags]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIDES = ("deltatune", "peft")


def deltatune_side(output: str, flags: list[str]) -> dict:
    from deltatune import cli

    code = cli.main(["train", "--output", output, "--overwrite", *flags])
    if code:
        raise SystemExit(f"deltatune train exited with {code}")
    with open(os.path.join(output, "run_summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    return {"train_seconds": summary["train_seconds"], "exact_match": summary["exact_match_after"],
            "final_loss": summary["final_loss"], "steps": summary["steps"]}


def peft_side(output: str, flags: list[str]) -> dict:
    import peft
    import torch
    from transformers import PrinterCallback, Trainer

    from deltatune import get_peft_model
    from deltatune.cli import build_parser
    from deltatune.formats.models import load_model, load_tokenizer, resolve_model
    from deltatune.train.config import config_from_sources, field_names, method_config
    from deltatune.train.evaluate import default_max_new_tokens, evaluate
    from deltatune.train.run import _set_threads, prepare_data
    from deltatune.train.trainer import Collator, ListDataset, training_arguments

    parsed = build_parser().parse_args(["train", "--output", output, "--overwrite", *flags])
    config = config_from_sources(parsed.config, {name: getattr(parsed, name, None) for name in field_names()})
    if config.method != "lora":
        raise SystemExit("this comparison is for LoRA runs")
    source = resolve_model(config.model)
    lora = method_config(config, source.name)
    _set_threads(config)
    tokenizer = load_tokenizer(source)
    prepared = prepare_data(config, tokenizer)
    args = training_arguments(os.path.join(output, "checkpoints"), config, use_cpu=not torch.cuda.is_available())
    model, tokenizer = load_model(source, tokenizer=tokenizer)
    reference = load_model(source, tokenizer=tokenizer)[0]
    torch.manual_seed(config.seed)  # as deltatune train does before creating the adapter
    initial = get_peft_model(reference, lora)
    peft_config = peft.LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                  target_modules=lora.target_modules, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, peft_config)
    ours = {n: p for n, p in initial.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    if set(ours) != set(theirs):
        raise SystemExit(f"adapter names differ: {sorted(set(ours) ^ set(theirs))[:4]}")
    with torch.no_grad():
        for name, param in theirs.items():
            param.copy_(ours[name])
    del initial, reference, ours
    trainer = Trainer(model=peft_model, args=args, train_dataset=ListDataset(prepared.train.rows),
                      data_collator=Collator(tokenizer.pad_token_id))
    trainer.remove_callback(PrinterCallback)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    steps = trainer.state.global_step
    del trainer
    max_new = config.max_new_tokens or default_max_new_tokens(prepared.eval_examples, tokenizer)
    after = evaluate(peft_model, tokenizer, prepared.eval_examples, max_new_tokens=max_new, bf16=config.use_bf16)
    return {"train_seconds": seconds, "exact_match": after.exact_match, "final_loss": losses[-1], "steps": steps}


def run_side(side: str, output: str, flags: list[str]) -> dict:
    """``side`` in a fresh process; its numbers come back as the last line of its output."""
    os.makedirs(output, exist_ok=True)
    command = [sys.executable, os.path.abspath(__file__), "--child", side, "--output", output, "--", *flags]
    with open(os.path.join(output, "bench_stdout.log"), "w", encoding="utf-8") as log:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True)
    if proc.returncode:
        raise SystemExit(f"{side} run failed ({proc.returncode}); see {output}/bench_stdout.log")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=os.path.join("runs", "vs-peft"))
    parser.add_argument("--json")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("flags", nargs="*", help="deltatune train flags for both sides (after --)")
    args = parser.parse_args()
    if args.child:
        result = (deltatune_side if args.child == "deltatune" else peft_side)(args.output, args.flags)
        print(json.dumps(result))
        return 0
    runs = []
    for round_ in range(args.rounds):
        for side in (SIDES if round_ % 2 == 0 else SIDES[::-1]):
            result = {"round": round_, "side": side, **run_side(side, os.path.join(args.output, side), args.flags)}
            runs.append(result)
            print(json.dumps(result), flush=True)
    by_side = {side: [r for r in runs if r["side"] == side] for side in SIDES}
    ratios = [d["train_seconds"] / p["train_seconds"] for d, p in zip(by_side["deltatune"], by_side["peft"],
                                                                        strict=True)]
    report = {"flags": args.flags, "load_average": [round(x, 2) for x in os.getloadavg()],
              **{f"{side}_train_seconds_median": statistics.median(r["train_seconds"] for r in by_side[side])
                 for side in SIDES},
              **{f"{side}_exact_match": [r["exact_match"] for r in by_side[side]] for side in SIDES},
              "ratio_median": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios]}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"runs": runs, **report}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
