"""``deltatune estimate`` against the measured peak memory of real training runs of SmolLM2-135M on CPU.

Cases: full fine-tuning, LoRA r=8 on q,v and on all-linear, QLoRA (NF4 base, LoRA all-linear), (IA)^3,
bottleneck adapters, prompt tuning, P-tuning and prefix tuning (each with ``deltatune train``'s defaults for the
method), at two sequence lengths, without and with gradient checkpointing. Prefix tuning with checkpointing is
not applicable: transformers drops the key/value cache inside checkpointed layers, so the prefix would not reach
attention, and deltatune refuses the combination (``estimate_memory`` and the forward both raise); the table
lists those rows as such.

Each case runs in a fresh child process (this script with ``--child``) that does what ``deltatune train`` does up to
the Trainer: ``formats.load_model`` (tokenizer included, ``--quantize nf4`` for QLoRA), then ``get_peft_model`` with
the method's config, then AdamW (torch's default, lr 1e-5) for ``--steps`` steps of one fixed batch of random token
ids as labels (``deltatune train`` has no gradient-checkpointing flag, hence this small loop rather than the train
command; checkpointing is transformers' non-reentrant ``gradient_checkpointing_enable``). As in the Trainer
(``training_step`` returns ``loss.detach()``), a step's loss is dropped before the next forward: a loop that keeps
``loss`` until it is reassigned holds the previous step's graph through the next forward, 246 MiB more peak for LoRA
q,v at 512 tokens, which no real run has. Peak memory is the child's kernel RSS high-water mark (VmHWM, read at its
end: the whole process, loading included, no sampling gap); the parent also samples the child's RSS every 0.1 s with
psutil as a cross-check. Two steps are enough: the second step's backward runs with the optimizer states allocated,
which is the steady-state peak. The child runs with one torch thread (the machine is shared; threads change time,
not memory).

The model is the bundled GGUF converted once to an HF folder (``--model-dir``, default
``/tmp/deltatune-bench-smollm2``; ``formats.save_full_model``): loading it takes seconds where the GGUF takes most
of a minute, and the config (hence the estimate) is the same one ``deltatune estimate`` reads from the GGUF.

Measurements are cached in ``--cache`` (JSON) so the comparison can be reprinted after changing the estimator
without measuring again (``--reuse``). Prints a markdown table with estimate / measured per case and flags any
case outside 15%.

Usage::

    python benchmarks/bench_estimate.py [--seqs 128,512] [--batch 1] [--steps 2] [--cases full,lora-qv,...]
        [--reuse | --cached-only] [--cache /tmp/bench_estimate.json] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procmem import status_kib  # noqa: E402

TOLERANCE = 0.15
# case -> (estimate's method, its options, quantize)
CASES: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "full": ("full", {}, None),
    "lora-qv": ("lora", {"target_modules": ["q_proj", "v_proj"]}, None),
    "lora-all": ("lora", {"target_modules": "all-linear"}, None),
    "qlora-nf4": ("qlora", {"target_modules": "all-linear"}, "nf4"),
    "ia3": ("ia3", {}, None),
    "bottleneck": ("bottleneck", {}, None),
    "prompt": ("prompt", {}, None),
    "ptuning": ("ptuning", {}, None),
    "prefix": ("prefix", {}, None),
}
NO_CHECKPOINTING = {"prefix"}  # prefix tuning refuses gradient checkpointing
NOT_APPLICABLE = ("not applicable: prefix tuning cannot train with gradient checkpointing (transformers drops the "
                  "key/value cache in checkpointed layers; deltatune refuses the combination)")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process; sizes in bytes."""
    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401 - part of the measured baseline, as in a real run

    from deltatune import get_peft_model
    from deltatune.analysis.memory import method_config
    from deltatune.formats.models import load_model, resolve_model

    baseline = status_kib("VmRSS") * 1024
    method, options, quantize = CASES[args.child]
    source = resolve_model(args.model_dir)
    model, _ = load_model(source, quantize=quantize)
    loaded_rss, load_peak = status_kib("VmRSS") * 1024, status_kib("VmHWM") * 1024
    if args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "full":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        model = get_peft_model(model, method_config(method, options))
        trainable = model.get_nb_trainable_parameters()[0]
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = model(input_ids=ids, labels=ids).loss  # as Trainer: the outputs (logits) are dropped before backward
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss  # as Trainer (training_step returns loss.detach()): the step's graph goes before the next forward
    return {"baseline": baseline, "loaded_rss": loaded_rss, "load_peak": load_peak,
            "peak": status_kib("VmHWM") * 1024, "trainable": trainable,
            "step_seconds": (time.perf_counter() - start) / args.steps}


def measure(case: str, seq: int, gc: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Run one case in a child; its JSON result plus the psutil-sampled peak of its RSS."""
    import psutil

    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--seq", str(seq), "--batch",
           str(args.batch), "--steps", str(args.steps), "--model-dir", args.model_dir] + (["--gc"] if gc else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    watched, sampled = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            sampled = max(sampled, watched.memory_info().rss)
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{case} seq={seq} gc={gc} failed (exit {proc.returncode}); rerun the child by hand:\n"
                           f"{' '.join(cmd)}")
    return {**json.loads(out.strip().splitlines()[-1]), "sampled_peak": sampled}


def ensure_model_dir(path: str) -> None:
    """Write the bundled GGUF as an HF folder at ``path`` once."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    from deltatune.formats.models import load_model, resolve_model, save_full_model

    model, tokenizer = load_model(resolve_model(None))
    save_full_model(model, tokenizer, path)


def estimate(case: str, seq: int, gc: bool, args: argparse.Namespace) -> Any:
    from deltatune.analysis.memory import estimate_memory

    method, options, _ = CASES[case]
    return estimate_memory(args.model_dir, method=method, batch=args.batch, seq=seq, grad_checkpointing=gc,
                           optimizer="adamw", precision="fp32", options=options)


def table(rows: list[dict[str, Any]], seqs: list[int] | None = None, cases: list[str] | None = None) -> str:
    mib = 2**20
    lines = ["| case | seq | grad ckpt | trainable | estimate MiB (w / g / opt / act / base) | measured peak MiB "
             "| estimate / measured |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["estimate"]
        flag = "" if abs(r["ratio"] - 1) <= TOLERANCE else " **outside 15%**"
        lines.append(f"| {r['case']} | {r['seq']} | {'on' if r['gc'] else 'off'} | {e['trainable_params']:,} | "
                     f"{e['total_bytes'] / mib:.0f} ({e['weights_bytes'] / mib:.0f} / {e['gradients_bytes'] / mib:.0f}"
                     f" / {e['optimizer_bytes'] / mib:.0f} / {e['activations_bytes'] / mib:.0f} / "
                     f"{e['baseline_bytes'] / mib:.0f}) | {r['measured']['peak'] / mib:.0f} | {r['ratio']:.3f}{flag} |")
    for case in (c for c in cases or [] if c in NO_CHECKPOINTING):
        lines += [f"| {case} | {seq} | on | - | {NOT_APPLICABLE} | - | - |" for seq in seqs or []]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model-dir", default="/tmp/deltatune-bench-smollm2")
    parser.add_argument("--cache", default="/tmp/bench_estimate.json", help="measurements, read with --reuse")
    parser.add_argument("--reuse", action="store_true", help="use the cached measurements where present")
    parser.add_argument("--cached-only", action="store_true", help="print the table of the cached cases, measure none")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    ensure_model_dir(args.model_dir)
    cache: dict[str, Any] = {}
    if (args.reuse or args.cached_only) and os.path.isfile(args.cache):
        with open(args.cache) as f:
            cache = json.load(f)
    runs = [(case, seq, gc) for gc in (False, True) for case in args.cases.split(",")
            for seq in (int(s) for s in args.seqs.split(",")) if not (gc and case in NO_CHECKPOINTING)]
    started = time.time()
    for case, seq, gc in runs:  # measure everything first, then estimate (the estimator may change in between)
        key = f"{case}/{seq}/{int(gc)}/b{args.batch}/s{args.steps}"
        if key not in cache and not args.cached_only:
            cache[key] = measure(case, seq, gc, args)
            with open(args.cache, "w") as f:
                json.dump(cache, f, indent=1)
            print(f"measured {key}: {cache[key]['peak'] / 2**20:.0f} MiB ({time.time() - started:.0f} s so far)",
                  file=sys.stderr, flush=True)
    rows = []
    for case, seq, gc in runs:
        measured = cache.get(f"{case}/{seq}/{int(gc)}/b{args.batch}/s{args.steps}")
        if measured is None:  # --cached-only: not measured yet
            continue
        est = estimate(case, seq, gc, args)
        rows.append({"case": case, "seq": seq, "gc": gc, "measured": measured, "estimate": est.to_dict(),
                     "ratio": est.total_bytes / measured["peak"]})
    print(f"`python benchmarks/bench_estimate.py --seqs {args.seqs} --batch {args.batch} --steps {args.steps}`, "
          f"{datetime.date.today()}, batch {args.batch}, fp32, AdamW, peak = child VmHWM\n")
    print(table(rows, [int(s) for s in args.seqs.split(",")], args.cases.split(",")))
    bad = [r for r in rows if abs(r["ratio"] - 1) > TOLERANCE]
    mismatched = [r for r in rows if r["estimate"]["trainable_params"] != r["measured"]["trainable"]]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} cases within 15%; trainable counts equal in "
          f"{len(rows) - len(mismatched)}/{len(rows)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad or mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
