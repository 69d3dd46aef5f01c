"""The main job with the loss at labelled positions only (``deltatune.loss``) against the model's own loss.

Runs ``deltatune train`` (the default run: SmolLM2-135M-Instruct, the built-in task, LoRA r=8 on all linear
layers) as a child process, alternately with ``AdapterTrainer.label_positions_loss`` on (the default) and off
(transformers computes the logits of every position and their loss), ``--rounds`` times each, the order
flipping every round. Reported per setting: the median of training seconds (from run_summary.json), the peak
resident memory of the process tree (sampled every 0.2 s), the exact match after training and the last loss;
and the median of the per-round ratios on / off.

``--saved-bytes`` measures instead, in this process, what autograd keeps for backward from one training forward
of the same model, adapter and a batch of the main job (8 built-in rows, bf16 autocast as ``deltatune train`` on
this CPU): every saved tensor's storage counted once, parameters left out, with the model's own loss and with
``causal_lm_loss``. That is exact and free of allocator and machine-load noise.

Usage::

    python benchmarks/bench_label_loss.py [--rounds 2] [--steps 40] [--output runs/label-loss] [--json FILE]
    python benchmarks/bench_label_loss.py --saved-bytes [--batch 8] [--no-bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_main_job import measure  # noqa: E402

CHILD = ("import sys; from deltatune.train import trainer; trainer.AdapterTrainer.label_positions_loss = {on}; "
         "from deltatune import cli; sys.exit(cli.main(sys.argv[1:]))")


def run(on: bool, output: str, steps: int) -> dict:
    command = [sys.executable, "-c", CHILD.format(on=on), "train", "--output", output, "--overwrite",
               "--max-steps", str(steps)]
    os.makedirs(output, exist_ok=True)
    seconds, peak, code = measure(command, os.path.join(output, "bench_stdout.log"))
    if code != 0:
        raise SystemExit(f"run failed (exit {code}); see {output}/bench_stdout.log")
    with open(os.path.join(output, "run_summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    return {"label_positions_loss": on, "wall_seconds": round(seconds, 1), "peak_rss_gib": round(peak / 2**30, 3),
            "train_seconds": round(summary["train_seconds"], 1), "exact_match_after": summary["exact_match_after"],
            "final_loss": summary["final_loss"]}


def saved_bytes(args: argparse.Namespace) -> dict:
    import torch

    from deltatune import LoraConfig, causal_lm_loss, get_peft_model
    from deltatune.analysis import saved_tensor_bytes
    from deltatune.formats.models import load_model, resolve_model
    from deltatune.loss import backbone_and_head
    from deltatune.train import data as datamod
    from deltatune.train.evaluate import collate
    from deltatune.train.task import builtin_splits

    model, tokenizer = load_model(resolve_model(None))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    rows, _ = builtin_splits(args.batch, 1, 0)
    examples = datamod.to_examples(rows[:args.batch], "chat", tokenizer, "built-in")
    batch = collate(datamod.tokenize(examples, tokenizer, 512, "built-in").rows, tokenizer.pad_token_id)
    backbone, head = backbone_and_head(model)

    def measure_one(label_loss: bool) -> int:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            if label_loss:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                hidden = backbone(**inputs, use_cache=False).last_hidden_state
                loss = causal_lm_loss(hidden, head, batch["labels"])
            else:
                loss = model(**batch).loss
        saved = saved_tensor_bytes(loss, exclude=model)  # read from the graph (see deltatune.analysis)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return saved

    tokens = int(batch["attention_mask"].sum())
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    own, ours = measure_one(False), measure_one(True)
    return {"batch": list(batch["input_ids"].shape), "tokens": tokens, "labelled_tokens": labelled,
            "vocab": head.weight.shape[0], "bf16": not args.no_bf16, "saved_mib_model_loss": round(own / 2**20, 1),
            "saved_mib_causal_lm_loss": round(ours / 2**20, 1), "ratio": round(ours / own, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--output", default=os.path.join("runs", "label-loss"))
    parser.add_argument("--json")
    parser.add_argument("--saved-bytes", action="store_true", help="measure autograd's saved tensors instead")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-bf16", action="store_true")
    args = parser.parse_args()
    if args.saved_bytes:
        print(json.dumps(saved_bytes(args), indent=2))
        return 0
    runs = []
    for round_ in range(args.rounds):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        for on in order:
            runs.append({"round": round_, **run(on, os.path.join(args.output, "on" if on else "off"), args.steps)})
            print(json.dumps(runs[-1]), flush=True)
    report = {"runs": runs, "load_average": [round(x, 2) for x in os.getloadavg()]}
    for key in ("train_seconds", "peak_rss_gib"):
        on = [r[key] for r in runs if r["label_positions_loss"]]
        off = [r[key] for r in runs if not r["label_positions_loss"]]
        report[key] = {"on_median": statistics.median(on), "off_median": statistics.median(off),
                       "ratio_median": round(statistics.median(a / b for a, b in zip(on, off, strict=True)), 3)}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
