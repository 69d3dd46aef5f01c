"""Compare the adapter methods of ``deltatune train`` on two tasks and write docs/methods.md.

Every method (lora, ia3, bottleneck, prompt, ptuning, prefix) trains with the same step budget on

* ``builtin``: the main job's order-to-JSON task (``deltatune train`` with no ``--data``);
* ``banking``: BANKING77 intent classification restricted to ten card-related intents, read from
  ``../shared/data/banking77`` and written as chat JSONL under ``--output`` (never into the repo).

Phases, each training run a child process (``python -m deltatune train``) whose resident memory
(with its children) is sampled every 0.2 s and whose progress bar is timestamped to get per-step times:

1. learning-rate sweep: each method at a few learning rates on ``builtin`` with a shorter budget; the
   chosen lr has the best held-out exact match, ties broken by the lowest mean training loss of the
   last five steps (each built-in example is seen once, so that loss is on unseen examples);
2. the full runs on every task at the chosen lr;
3. inference latency: one child process loads the base once and, per method, times the adapted model's
   forward and greedy generation alternately with the bare base; for methods that merge, also the
   merged model (after checking that its logits equal the unmerged ones).

Results go to a JSON file after every run, and the Markdown report is rewritten from it each time, so
a stopped run still leaves a report of what finished. Run by hand, not as a test:

    python benchmarks/bench_methods.py [--methods lora,ia3] [--tasks builtin,banking] [--steps 40]
        [--banking-steps 30] [--sweep-steps 16] [--lrs lora=1e-3,2e-3] [--no-sweep] [--eval-size 30]
        [--output runs/methods] [--json runs/methods/results.json] [--doc docs/methods.md] [--resume]
    python benchmarks/bench_methods.py --from-json runs/methods/results.json   # only rewrite the report
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procmem import tree_rss  # noqa: E402

METHODS = ("lora", "ia3", "bottleneck", "prompt", "ptuning", "prefix")
MERGEABLE_CLAIM = ("lora", "ia3")  # only used to order the report; mergeability itself is measured
# Sweep grids around each method's default lr (deltatune's --lr defaults: lora 2e-3, ia3 1e-2,
# bottleneck 1e-3, prompt 3e-2, ptuning 1e-2, prefix 1e-2); prompt tuning's includes the 0.3 of Lester et al.
SWEEP_LRS = {
    "lora": (5e-4, 2e-3, 5e-3),
    "ia3": (3e-3, 1e-2, 3e-2),
    "bottleneck": (3e-4, 1e-3, 3e-3),
    "prompt": (3e-2, 1e-1, 3e-1),
    "ptuning": (3e-3, 1e-2, 3e-2),
    "prefix": (3e-3, 1e-2, 3e-2),
}
TASKS = ("builtin", "banking")
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "banking77")
# Ten intents about cards that read alike ("my card hasn't come" vs "when will my card come"), so the task
# needs more than keyword matching, while the label list still fits in the prompt of a 135M model.
BANKING_INTENTS = (
    "activate_my_card", "card_arrival", "card_delivery_estimate", "card_not_working", "card_payment_fee_charged",
    "card_payment_not_recognised", "compromised_card", "declined_card_payment", "lost_or_stolen_card",
    "pending_card_payment",
)
BANKING_PROMPT = ("Classify this bank customer's message into exactly one of these intents: {labels}.\n"
                  "Answer with the intent name only.\n\nMessage: {text}")
THREADS: int | None = None  # --threads, set once by main() for every training child
CPU = "step_cpu_seconds"
STEP_RE = re.compile(r"training:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


# ---------------------------------------------------------------- the harder task's data

def read_tsv(path: str) -> list[tuple[str, str]]:
    """(text, label) rows of a BANKING77 TSV file with a header; a clear error if the file is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the banking task needs the BANKING77 TSV files of "
                                "../shared/data/banking77 (see ../shared/data/README.md); or run --tasks builtin.")
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()[1:]
    return [tuple(line.rsplit("\t", 1)) for line in lines if "\t" in line]  # type: ignore[misc]


def banking_rows(rows: list[tuple[str, str]], seed: int) -> list[dict]:
    """Chat rows for the chosen intents, shuffled (the files are not, and eval takes the first rows)."""
    labels = ", ".join(BANKING_INTENTS)
    chosen = [(t, lab) for t, lab in rows if lab in BANKING_INTENTS]
    random.Random(seed).shuffle(chosen)
    return [{"messages": [{"role": "user", "content": BANKING_PROMPT.format(labels=labels, text=t.strip())},
                          {"role": "assistant", "content": lab}]} for t, lab in chosen]


def write_banking(output: str, seed: int = 0) -> tuple[str, str, int]:
    """Write train (BANKING77 train split) and held-out (test split) JSONL; returns their paths and train rows."""
    folder = os.path.join(output, "data")
    os.makedirs(folder, exist_ok=True)
    paths = []
    count = 0
    for split in ("train", "test"):
        rows = banking_rows(read_tsv(os.path.join(DATA_DIR, f"{split}.tsv")), seed)
        if not rows:
            raise ValueError(f"{split}.tsv holds none of the intents {BANKING_INTENTS}.")
        path = os.path.join(folder, f"banking_{split}.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        paths.append(path)
        count = count or len(rows)
    return paths[0], paths[1], count


# ---------------------------------------------------------------- one training run, measured from outside

def tree_cpu(process: psutil.Process) -> float:
    """CPU seconds (user + system) used so far by a process and its live descendants."""
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def pump(stream: Any, log: Any, stamps: dict[int, tuple[float, float]], cpu: Callable[[], float]) -> None:
    """Copy the child's output to ``log`` and note when (wall clock, CPU seconds) each training step first shows.

    The trainer writes no per-step times, but its tqdm bar redraws on every step (steps take seconds,
    far above tqdm's 0.1 s redraw interval), so the moment step k appears is when step k ended. The
    CPU seconds per step are what a step costs whatever else the machine runs; wall seconds are not.
    """
    pending = ""
    while chunk := os.read(stream.fileno(), 4096):
        now = time.perf_counter()
        text = chunk.decode("utf-8", errors="replace")
        log.write(text)
        log.flush()
        pending += text
        *parts, pending = re.split(r"[\r\n]", pending)
        for part in parts:
            if (match := STEP_RE.search(part)) and int(match.group(1)) not in stamps:
                with contextlib.suppress(psutil.NoSuchProcess):
                    stamps[int(match.group(1))] = (now, cpu())


def step_seconds(stamps: dict[int, tuple[float, float]], which: int) -> list[float]:
    """Seconds per step (``which`` 0: wall, 1: CPU) from the step stamps; a jump of several steps is split evenly."""
    steps = sorted(stamps)
    out = []
    for prev, cur in zip(steps, steps[1:], strict=False):
        out += [(stamps[cur][which] - stamps[prev][which]) / (cur - prev)] * (cur - prev)
    return out


def measure(command: list[str], log_path: str) -> dict[str, Any]:
    """Run ``command``; wall seconds, peak tree RSS, exit code and per-step seconds."""
    stamps: dict[int, tuple[float, float]] = {}
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        watched = psutil.Process(child.pid)
        reader = threading.Thread(target=pump, args=(child.stdout, log, stamps, lambda: tree_cpu(watched)),
                                  daemon=True)
        reader.start()
        peak = 0
        while child.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                peak = max(peak, tree_rss(watched))
            time.sleep(0.2)
        reader.join(timeout=10)
    return {"wall_seconds": time.perf_counter() - start, "peak_rss_bytes": peak, "exit_code": child.returncode,
            "step_seconds": step_seconds(stamps, 0), "step_cpu_seconds": step_seconds(stamps, 1)}


def read_json(path: str) -> Any:
    """The JSON in ``path``, or None when the file is not there (a run that failed early writes none)."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def log_losses(folder: str) -> list[float | None]:
    """Training loss per logged step (None where the run logged NaN/Inf, which it writes as null)."""
    path = os.path.join(folder, "train_log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        entries = [json.loads(line) for line in fh if line.strip()]
    return [e["loss"] for e in entries if "loss" in e]


def error_tail(log_path: str, lines: int = 6) -> str:
    """The last lines of a failed run's output, progress-bar redraws dropped, for the report."""
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        text = [ln for ln in re.split(r"[\r\n]", fh.read())
                if ln.strip() and not STEP_RE.search(ln) and "it/s]" not in ln and "gemm_4bit" not in ln]
    return "\n".join(text[-lines:])


def train_run(method: str, lr: float, task: str, steps: int, eval_size: int, folder: str,
              task_args: list[str]) -> dict[str, Any]:
    """Train one method once and collect everything the report needs from the run folder."""
    os.makedirs(folder, exist_ok=True)
    command = [sys.executable, "-m", "deltatune", "train", "--method", method, "--lr", f"{lr:g}",
               "--max-steps", str(steps), "--eval-size", str(eval_size), "--seed", "0", "--output", folder,
               "--overwrite", *task_args]
    if THREADS:
        command += ["--threads", str(THREADS)]
    load = os.getloadavg()
    print(f"[{time.strftime('%H:%M:%S')}] {task} {method} lr={lr:g} steps={steps} ...", flush=True)
    log_path = os.path.join(folder, "bench_stdout.log")
    result = measure(command, log_path)
    summary = read_json(os.path.join(folder, "run_summary.json")) or {}
    losses = log_losses(folder)
    adapter = os.path.join(folder, "adapter_model.safetensors")
    tail = [x for x in losses[-5:] if x is not None]
    result.update({
        "method": method, "lr": lr, "task": task, "steps_requested": steps, "eval_size": eval_size,
        "command": " ".join(["python", *command[1:]]), "folder": folder,
        "load_average_before": [round(x, 2) for x in load],
        "steps": summary.get("steps"), "train_seconds": summary.get("train_seconds"),
        "trainable_params": summary.get("trainable_params"), "all_params": summary.get("all_params"),
        "exact_match_before": summary.get("exact_match_before"),
        "exact_match_after": summary.get("exact_match_after"),
        "eval_rows": summary.get("eval_rows"), "train_rows": summary.get("train_rows"),
        "truncated": summary.get("truncated"), "first_loss": losses[0] if losses else None,
        "tail_loss": statistics.mean(tail) if tail else None,
        "nonfinite_loss": any(x is None for x in losses),
        "adapter_bytes": os.path.getsize(adapter) if os.path.isfile(adapter) else None,
        "samples": summary.get("samples", [])[:3],
    })
    if result["exit_code"] != 0 or result["nonfinite_loss"]:
        result["error"] = error_tail(log_path)
    print(f"    exit {result['exit_code']}, EM {result['exact_match_before']} -> {result['exact_match_after']}, "
          f"{result['wall_seconds']:.0f} s, peak {result['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return result


# ---------------------------------------------------------------- learning-rate choice

def sweep_key(run: dict[str, Any]) -> tuple[float, float]:
    """Sort key, smaller is better: highest exact match, then lowest tail loss; failed runs last."""
    if run.get("exit_code") != 0 or run.get("exact_match_after") is None:
        return (math.inf, math.inf)
    loss = run.get("tail_loss")
    return (-run["exact_match_after"], loss if loss is not None and math.isfinite(loss) else math.inf)


def choose_lr(runs: list[dict[str, Any]]) -> float | None:
    """The lr of the best sweep run of one method (None when every run failed)."""
    ok = [r for r in runs if sweep_key(r)[0] != math.inf]
    return min(ok, key=sweep_key)["lr"] if ok else None


def default_lr(method: str) -> float:
    """deltatune's own default ``--lr`` for ``method`` (what --no-sweep uses unless --lrs names one)."""
    from deltatune.train.config import method_cli

    return method_cli(method).lr


# ---------------------------------------------------------------- inference latency (child process)

def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(base: Callable[[], Any], other: Callable[[], Any], rounds: int) -> dict[str, Any]:
    """Median seconds of each and the median per-round ratio other / base, the order flipping every round.

    Each ratio compares two calls made a moment apart, so load from other processes on the shared
    machine mostly cancels out; one warm-up call of each is discarded.
    """
    base()
    other()
    times_b, times_o, ratios = [], [], []
    for i in range(rounds):
        if i % 2:
            t_o, t_b = timed(other), timed(base)
        else:
            t_b, t_o = timed(base), timed(other)
        times_b.append(t_b)
        times_o.append(t_o)
        ratios.append(t_o / t_b)
    return {"base_ms": 1000 * statistics.median(times_b), "other_ms": 1000 * statistics.median(times_o),
            "ratio": statistics.median(ratios)}


def mean_tokens(path: str | None, tokenizer: Any, builtin: bool) -> float:
    """Mean tokens of a training row (prompt + answer, chat template) of a task: the sequence the model sees."""
    if builtin:
        from deltatune.train.task import builtin_splits

        rows = builtin_splits(200, 1)[0]
    else:
        with open(path, encoding="utf-8") as fh:  # type: ignore[arg-type]
            rows = [json.loads(line) for line in fh][:200]
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in rows]
    return statistics.mean(lengths)


def latency_worker(spec_path: str, out_path: str) -> int:
    """Time base vs adapted (and merged) models for every adapter in the spec; write the results as JSON."""
    import copy

    import torch

    from deltatune.formats.models import load_model, resolve_model
    from deltatune.model import PeftModel
    from deltatune.train.task import builtin_splits

    spec = read_json(spec_path)
    torch.set_num_threads(spec["threads"] or os.cpu_count() or 1)
    torch.manual_seed(0)
    base, tokenizer = load_model(resolve_model(None))
    # Frozen like the base inside every PeftModel: autocast keeps its bf16 copy of a weight only for leaves
    # that require grad, so an unfrozen base would skip the weight casts the adapted models pay for.
    base.requires_grad_(False)
    bf16 = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    prompts = [tokenizer.apply_chat_template(r["messages"][:1], tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"] for r in builtin_splits(4, 4)[1]]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    one = torch.tensor([prompts[0]])
    new = spec["new_tokens"]
    results: dict[str, Any] = {"bf16_autocast": bf16, "batch": list(ids.shape), "gen_prompt_tokens": one.shape[1],
                               "new_tokens": new, "rounds": spec["rounds"], "seq_tokens": {}, "methods": {}}
    for task, path in spec["tasks"].items():
        results["seq_tokens"][task] = mean_tokens(path, tokenizer, task == "builtin")

    def autocast() -> Any:  # one autocast region per timed call, as one evaluate() or generate() call has
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def forward(model: Any) -> Callable[[], Any]:
        def call() -> Any:
            with autocast():
                return model(input_ids=ids, attention_mask=mask)
        return call

    def generate(model: Any) -> Callable[[], Any]:
        def call() -> Any:
            with autocast():
                return model.generate(input_ids=one, attention_mask=torch.ones_like(one), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=pad, temperature=None,
                                      top_p=None, top_k=None)
        return call

    with torch.no_grad():
        for method, folder in spec["adapters"].items():
            print(f"[{time.strftime('%H:%M:%S')}] latency {method}", flush=True)
            try:
                model = PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=False).eval()
                row: dict[str, Any] = {"logit_positions": model(input_ids=ids, attention_mask=mask).logits.shape[1],
                                       "input_positions": ids.shape[1]}
                row["forward"] = alternate(forward(base), forward(model), spec["rounds"])
                row["generate"] = alternate(generate(base), generate(model), spec["rounds"])
                try:  # keep the unmerged timings whatever the merge does
                    row.update(merged_latency(model, base, ids, mask, forward, spec["rounds"]))
                except Exception as err:  # noqa: BLE001
                    row["merge_error"] = f"{type(err).__name__}: {err}"
            except Exception as err:  # noqa: BLE001 - one method's failure is reported, the others still run
                row = {"error": f"{type(err).__name__}: {err}"}
            results["methods"][method] = row
            with open(out_path, "w", encoding="utf-8") as fh:
                json.dump(results, fh, indent=2)
    return 0


def merged_latency(model: Any, base: Any, ids: Any, mask: Any, forward: Callable[[Any], Callable[[], Any]],
                   rounds: int) -> dict[str, Any]:
    """Merge the adapter into its (copied) base if the method allows it; check the logits, time the forward.

    Mergeability is what ``merge_and_unload`` does, not a table: a method that cannot merge refuses.
    """
    import torch

    real = mask.bool()  # left-padding positions attend to nothing; their logits are noise in both
    with torch.autocast("cpu", enabled=False):  # compare in fp32: a bf16 difference would hide a wrong merge
        before = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:][real]
        try:
            merged = model.merge_and_unload()
        except Exception as err:  # noqa: BLE001 - the refusal is the measurement
            return {"mergeable": False, "merge_refusal": f"{type(err).__name__}: {err}"}
        after = merged(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:][real]
    return {"mergeable": True, "merged_max_abs_logit_diff": float((after - before).abs().max()),
            "logit_scale": float(before.abs().max()),
            "merged_forward": alternate(forward(base), forward(merged), rounds)}


def run_latency(adapters: dict[str, str], tasks: dict[str, str | None], output: str, rounds: int,
                new_tokens: int, threads: int | None) -> dict[str, Any] | None:
    """Run :func:`latency_worker` in a child process (the parent stays small while training children run)."""
    spec_path = os.path.join(output, "latency_spec.json")
    out_path = os.path.join(output, "latency.json")
    with open(spec_path, "w", encoding="utf-8") as fh:
        json.dump({"adapters": adapters, "tasks": tasks, "rounds": rounds, "new_tokens": new_tokens,
                   "threads": threads}, fh)
    with contextlib.suppress(FileNotFoundError):
        os.remove(out_path)
    log_path = os.path.join(output, "latency_stdout.log")
    result = measure([sys.executable, os.path.abspath(__file__), "--latency-worker", spec_path, out_path], log_path)
    latency = read_json(out_path)
    if result["exit_code"] != 0:
        latency = latency or {"methods": {}}
        latency["error"] = error_tail(log_path)
    return latency


# ---------------------------------------------------------------- the report

def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def size(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def median_step(run: dict[str, Any], key: str = "step_seconds") -> float | None:
    """Median seconds per step (wall, or CPU with key="step_cpu_seconds") over the steps after the first.

    Wall falls back to train seconds / steps when the bar could not be read.
    """
    steps = run.get(key) or []
    if len(steps) >= 3:
        return statistics.median(steps[1:])  # step 1 carries the warm-up (first autocast casts, allocations)
    if key == "step_seconds" and run.get("train_seconds") and run.get("steps"):
        return run["train_seconds"] / run["steps"]
    return None


def status(run: dict[str, Any]) -> str:
    if run.get("exit_code") != 0:
        return f"FAILED (exit {run.get('exit_code')})"
    return "NaN/Inf loss" if run.get("nonfinite_loss") else "ok"


def sweep_table(data: dict[str, Any]) -> list[str]:
    lines = ["| method | lr | exact match after | mean loss, last 5 steps | chosen |", "|---|---|---|---|---|"]
    for run in data.get("sweep", []):
        chosen = "**yes**" if data.get("chosen_lr", {}).get(run["method"]) == run["lr"] else ""
        em = pct(run.get("exact_match_after")) if run.get("exit_code") == 0 else status(run)
        lines.append(f"| {run['method']} | {run['lr']:g} | {em} | {num(run.get('tail_loss'), '.4f')} | {chosen} |")
    return lines


def task_table(data: dict[str, Any], task: str, methods: list[str]) -> list[str]:
    runs = data.get("runs", {}).get(task, {})
    lora_cpu = median_step(runs["lora"], CPU) if "lora" in runs else None
    lines = ["| method | lr | trainable params | share | step wall (median) | step CPU (median) | CPU vs LoRA "
             "| peak RSS | exact match before -> after | adapter file | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        run = runs.get(method)
        if run is None:
            lines.append(f"| {method} | MISSING (not run) | | | | | | | | | |")
            continue
        step, cpu = median_step(run), median_step(run, CPU)
        trainable, total = run.get("trainable_params"), run.get("all_params")
        share = f"{100 * trainable / total:.3f}%" if trainable and total else "n/a"
        rel = f"{cpu / lora_cpu:.2f}x" if cpu and lora_cpu else "n/a"
        lines.append(
            f"| {method} | {run['lr']:g} | {trainable:,} | {share} | {num(step)} s | {num(cpu)} s | {rel} | "
            f"{run['peak_rss_bytes'] / 2**30:.2f} GiB | {pct(run.get('exact_match_before'))} -> "
            f"{pct(run.get('exact_match_after'))} | {size(run.get('adapter_bytes'))} | {status(run)} |"
            if trainable is not None else
            f"| {method} | {run['lr']:g} | n/a | n/a | {num(step)} s | {num(cpu)} s | {rel} | "
            f"{run['peak_rss_bytes'] / 2**30:.2f} GiB | n/a | n/a | {status(run)} |")
    return lines


def virtual_tokens(run: dict[str, Any] | None) -> int:
    """num_virtual_tokens from the run's adapter_config.json (0 for methods that add none)."""
    config = read_json(os.path.join(run["folder"], "adapter_config.json")) if run else None
    return int((config or {}).get("num_virtual_tokens") or 0)


def latency_table(data: dict[str, Any], methods: list[str]) -> list[str]:
    lat = data.get("latency") or {}
    seq = lat.get("seq_tokens", {})
    runs = data.get("runs", {}).get("builtin", {})
    head = " | ".join(f"tokens/row {t} (+virtual)" for t in seq)
    lines = [f"| method | {head} | logit positions (base {lat.get('batch', ['?', '?'])[1]}) | forward vs base "
             f"| generate {lat.get('new_tokens', '?')} tokens vs base | mergeable | merged forward vs base "
             "| max abs logit diff merged vs unmerged |",
             "|---|" + "---|" * (len(seq) + 6)]
    for method in methods:
        row = lat.get("methods", {}).get(method)
        extra = virtual_tokens(runs.get(method))
        lens = " | ".join(f"{n + extra:.0f}" + (f" (+{extra})" if extra else "") for n in seq.values())
        if row is None:
            lines.append(f"| {method} | {lens} | MISSING | | | | | |")
        elif "error" in row:
            lines.append(f"| {method} | {lens} | ERROR: {row['error'][:120]} | | | | | |")
        else:
            merged = row.get("merged_forward")
            lines.append(
                f"| {method} | {lens} | {row['logit_positions']} | {row['forward']['ratio']:.2f}x "
                f"({row['forward']['other_ms']:.0f} vs {row['forward']['base_ms']:.0f} ms) | "
                f"{row['generate']['ratio']:.2f}x | {'yes' if row.get('mergeable') else 'no'} | "
                f"{format(merged['ratio'], '.2f') + 'x' if merged else '-'} | "
                f"{num(row.get('merged_max_abs_logit_diff'), '.2e') if row.get('mergeable') else '-'} |")
    return lines


def findings(data: dict[str, Any], methods: list[str]) -> list[str]:
    """Sentences computed from the numbers, so the text can never claim more than was measured."""
    out = []
    prompt_like = [m for m in ("prompt", "ptuning", "prefix") if m in methods]
    ordered = {task: {m: runs[m] for m in methods if m in runs} for task, runs in data.get("runs", {}).items()}
    for task, runs in ordered.items():
        cpu = {m: median_step(r, CPU) for m, r in runs.items() if median_step(r, CPU)}
        if cpu and prompt_like:
            fastest = min(cpu, key=cpu.get)
            out.append(f"- CPU seconds per training step on `{task}`, relative to the cheapest ({fastest}): "
                       + ", ".join(f"{m} {c / cpu[fastest]:.2f}x" for m, c in cpu.items()) + ".")
        done = {m: r for m, r in runs.items() if r.get("exact_match_after") is not None}
        if done:
            best = max(done.values(), key=lambda r: r["exact_match_after"])["exact_match_after"]
            out.append(f"- Exact match after {next(iter(done.values()))['steps_requested']} steps on `{task}`: "
                       + ", ".join(f"{m} {pct(r['exact_match_after'])}" for m, r in done.items())
                       + f" (best {pct(best)}).")
    for task, runs in ordered.items():
        peaks = {m: r["peak_rss_bytes"] / 2**30 for m, r in runs.items() if r.get("peak_rss_bytes")}
        sizes = {m: r["adapter_bytes"] for m, r in runs.items() if r.get("adapter_bytes")}
        if peaks and sizes:
            out.append(f"- Peak RSS on `{task}` spans {min(peaks.values()):.2f}-{max(peaks.values()):.2f} GiB; "
                       "adapter files: " + ", ".join(f"{m} {size(b)}" for m, b in sizes.items())
                       + ".")
    lat = {m: r for m in methods if (r := (data.get("latency") or {}).get("methods", {}).get(m))}
    if lat:
        unmerged = {m: r["forward"]["ratio"] for m, r in lat.items() if "forward" in r}
        out.append("- Unmerged forward latency vs the base: "
                   + ", ".join(f"{m} {r:.2f}x" for m, r in unmerged.items()) + ".")
        gen = {m: r["generate"]["ratio"] for m, r in lat.items() if "generate" in r}
        out.append(f"- Unmerged greedy generation ({(data.get('latency') or {}).get('new_tokens')} new tokens) vs the "
                   "base: " + ", ".join(f"{m} {r:.2f}x" for m, r in gen.items()) + ".")
        merged = {m: r["merged_forward"]["ratio"] for m, r in lat.items() if r.get("merged_forward")}
        refused = [m for m, r in lat.items() if r.get("mergeable") is False]
        if merged:
            out.append("- After `merge_and_unload()`: " + ", ".join(f"{m} {r:.2f}x" for m, r in merged.items())
                       + " of the base's forward time; " + (", ".join(refused) + " refused to merge."
                                                            if refused else "every adapter merged."))
    return out


def failures(data: dict[str, Any]) -> list[str]:
    """Every failed or non-finite run, with its command and error, so nothing is hidden."""
    out = []
    every = list(data.get("sweep", [])) + [r for runs in data.get("runs", {}).values() for r in runs.values()]
    for run in every:
        if run.get("exit_code") != 0 or run.get("nonfinite_loss"):
            out += [f"- `{run['command']}`: {status(run)}", "", "```", run.get("error", ""), "```", ""]
    lat = data.get("latency") or {}
    for method, row in lat.get("methods", {}).items():
        if "error" in row:
            out.append(f"- latency of {method}: `{row['error']}`")
    if lat.get("error"):
        out += ["- latency worker:", "", "```", lat["error"], "```"]
    return out


def contention(data: dict[str, Any]) -> list[str]:
    """How busy the machine was, and how the runs shared it: what the absolute seconds must be read against."""
    meta = data["meta"]
    loads = [r["load_average_before"][0] for runs in data.get("runs", {}).values() for r in runs.values()]
    loads += [r["load_average_before"][0] for r in data.get("sweep", [])]
    out = []
    if loads:
        out.append(f"- 1-minute load average when runs started: {min(loads):.1f} to {max(loads):.1f} "
                   f"on {meta['cpu_count']} cores (other jobs' tests and benchmarks ran at the same time).")
    if meta.get("threads"):
        out.append(f"- Every process used {meta['threads']} torch thread(s) (`--threads {meta['threads']}`).")
    parallel = {task: max(r.get("parallel", meta.get("parallel", 1)) for r in runs.values())
                for task, runs in data.get("runs", {}).items() if runs}
    if any(n > 1 for n in parallel.values()):
        out.append("- Full runs at once (`--parallel`): " + ", ".join(f"`{t}` {n}" for t, n in parallel.items())
                   + ". Their wall step times include contention with each other as well as with other jobs, so "
                   "the per-step CPU seconds are the cost to compare; the inference timings ran as one process, "
                   "alternating base and adapter call by call.")
    return out


def render(data: dict[str, Any]) -> str:
    """docs/methods.md from the results JSON."""
    meta = data["meta"]
    methods = meta["methods"]
    tasks = meta["tasks"]
    lat = data.get("latency") or {}
    lines = [
        "# Adapter methods compared",
        "",
        "Generated by `benchmarks/bench_methods.py` from one run; do not edit by hand "
        "(rerun the script, or `--from-json docs/methods.json`, its results file, to re-render).",
        "",
        f"- Date: {meta['date']}. Machine: {meta['machine']}, {meta['cpu_count']} CPU cores **shared with other "
        "jobs** (load averages are in the JSON). Numbers are from one run each: ratios measured side by side "
        "mean more than absolute seconds.",
        f"- Command: `{meta['command']}` ("
        + (f"total wall time {meta['total_seconds'] / 60:.1f} min)." if meta.get("total_seconds") else
           "stopped before the end: see Missing below)."),
        "- Model: the bundled SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32), "
        f"{'bf16 autocast' if lat.get('bf16_autocast', True) else 'fp32'} compute, batch 4 x 2 gradient "
        "accumulation, max length 256, seed 0, each method with deltatune's defaults (`deltatune train --help`: LoRA "
        "r=8 on all linear layers; (IA)3 and the Pfeiffer bottleneck on their per-architecture default modules; "
        "prompt / P-tuning / prefix with the virtual tokens shown under Inference).",
        "- Same step budget for every method within a task: "
        + ", ".join(f"`{t}` {meta['steps'][t]} steps" for t in tasks) + "; "
        + f"exact match on {meta['eval_size']} held-out rows (greedy, before and after training).",
        *contention(data),
        *([f"- Note: {meta['note']}"] if meta.get("note") else []),
        "",
        "## Tasks",
        "",
        "- `builtin`: the main job's order-to-JSON task (one exact JSON line per English order).",
    ]
    if "banking" in tasks:
        lines.append(
            "- `banking`: BANKING77 (Casanueva et al. 2020; `../shared/data/banking77`, train split for training, "
            f"test split held out), restricted to {len(BANKING_INTENTS)} card-related intents "
            f"({', '.join(BANKING_INTENTS)}), {meta.get('banking_train_rows', '?')} training rows. The label list is "
            "in every prompt and the answer is the label: the names of all 77 intents would not fit in the 256-token "
            "rows next to the message, ten do; the ten chosen read alike (card arrival vs delivery estimate, not "
            "working vs declined payment), and the messages are real customer text, not a template.")
    lines += ["", "## Learning rates", ""]
    if data.get("sweep"):
        lines += [f"Sweep on `builtin`, {meta['sweep_steps']} steps (shorter than the full budget), "
                  f"{meta['sweep_eval_size']} held-out rows; chosen: best exact match, ties broken by the mean "
                  "training loss of the last 5 steps (built-in examples are seen once, so it is a loss on unseen "
                  "examples). The chosen lr is used for every task.", "", *sweep_table(data)]
    else:
        lines.append("No sweep (`--no-sweep`); lrs: " + ", ".join(f"{m} {lr:g}" for m, lr in
                                                                      data.get("chosen_lr", {}).items()) + ".")
    for task in tasks:
        lines += ["", f"## Training: `{task}`", "", *task_table(data, task, methods)]
    lines += ["", "Step time: median over the steps after the first, timed from the trainer's progress bar. Peak RSS: "
              "the training process tree's resident memory, sampled every 0.2 s (includes evaluation). Share: "
              "trainable / all parameters of the adapted model. Adapter file: adapter_model.safetensors."]
    lines += ["", "## Inference", "",
              f"One process, the base loaded once; each adapter (from the `builtin` runs) on a copy of it. Forward: "
              f"a batch of {lat.get('batch', ['?'])[0]} left-padded built-in prompts; generate: greedy, one prompt "
              f"of {lat.get('gen_prompt_tokens', '?')} tokens, exactly {lat.get('new_tokens', '?')} new tokens. "
              f"Each is timed alternately with the bare base ({lat.get('rounds', '?')} rounds, order flipping); "
              "the ratio is the median of per-round ratios. Mergeable = `merge_and_unload()` succeeded; the merged "
              "model's logits are compared with the unmerged ones. tokens/row: mean tokens of a training row "
              "(chat template), plus the virtual tokens the method puts in front (prefix tuning puts them in the "
              "attention cache, not the input, so its logit positions stay those of the input).",
              "", *latency_table(data, methods)]
    lines += ["", "## How to read it", "", *findings(data, methods)]
    missing = [f"{t}/{m}" for t in tasks for m in methods if m not in data.get("runs", {}).get(t, {})]
    if missing:
        lines += ["", f"**Missing (not run before the report was written):** {', '.join(missing)}."]
    fails = failures(data)
    lines += ["", "## Failures", ""] + (fails or ["None: every run finished with finite losses."])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- driver

def parse_lrs(values: list[str]) -> dict[str, tuple[float, ...]]:
    """``--lrs lora=1e-3,2e-3 --lrs ia3=1e-2`` -> {"lora": (1e-3, 2e-3), "ia3": (1e-2,)}."""
    out = {}
    for value in values:
        method, _, numbers = value.partition("=")
        if method not in METHODS or not numbers:
            raise SystemExit(f"--lrs expects METHOD=LR[,LR...] with METHOD in {METHODS}, got {value!r}")
        out[method] = tuple(float(x) for x in numbers.split(","))
    return out


def save(data: dict[str, Any], json_path: str, doc_path: str) -> None:
    """Write the results and re-render the report (after every run, so a stopped run leaves both)."""
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    os.makedirs(os.path.dirname(doc_path) or ".", exist_ok=True)
    with open(doc_path, "w", encoding="utf-8") as fh:
        fh.write(render(data))


def task_arguments(task: str, args: argparse.Namespace, data: dict[str, Any]) -> tuple[list[str], str | None]:
    """Extra ``deltatune train`` flags for a task, and its training file (None for the built-in task)."""
    if task == "builtin":
        return [], None
    train, held_out, rows = write_banking(args.output)
    data["meta"]["banking_train_rows"] = rows
    return ["--data", train, "--eval-data", held_out], train


def run_parallel(todo: list[tuple[str, float]], task: str, args: argparse.Namespace, data: dict[str, Any],
                 extra: list[str]) -> None:
    """The full runs of one task, ``--parallel`` at a time (1: one after another, the clean measurement).

    On a machine other jobs keep busy, several runs at once get this benchmark a fair share of the
    cores; their step times then include contention with each other, which the report says.
    """
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()
    steps = args.steps if task == "builtin" else args.banking_steps

    def one(index: int, method: str, lr: float) -> None:
        time.sleep(args.stagger * (index % args.parallel) if index < args.parallel else 0)
        run = train_run(method, lr, task, steps, args.eval_size, os.path.join(args.output, task, method), extra)
        run["parallel"] = args.parallel
        with lock:
            data["runs"].setdefault(task, {})[method] = run
            save(data, args.json, args.doc)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for future in [pool.submit(one, i, m, lr) for i, (m, lr) in enumerate(todo)]:
            future.result()


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    methods = args.methods.split(",")
    tasks = args.tasks.split(",")
    grids = {**SWEEP_LRS, **parse_lrs(args.lrs)}
    data = read_json(args.json) if args.resume else None
    data = data or {"sweep": [], "chosen_lr": {}, "runs": {}, "latency": None}
    earlier = data.get("meta")
    data["meta"] = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} "
                    f"{platform.processor() or ''}".strip(), "cpu_count": os.cpu_count(),
                    "command": "python " + " ".join(sys.argv), "methods": methods, "tasks": tasks,
                    "steps": {"builtin": args.steps, "banking": args.banking_steps}, "eval_size": args.eval_size,
                    "sweep_steps": args.sweep_steps, "sweep_eval_size": args.sweep_eval_size,
                    "parallel": args.parallel, "threads": args.threads, "note": args.note,
                    "started": time.time()}
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo", encoding="utf-8") as fh:
        data["meta"]["machine"] = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    if earlier:  # --resume: the report describes the first run, and says how it was continued
        command = data["meta"]["command"]
        data["meta"] = {**earlier, "command": f"{earlier['command']}`, resumed with `{command}"}
    task_args = {t: task_arguments(t, args, data) for t in tasks}
    for method in methods:  # phase 1: learning rates
        if args.no_sweep:
            data["chosen_lr"][method] = grids[method][0] if method in parse_lrs(args.lrs) else default_lr(method)
            continue
        for lr in grids[method]:
            if args.resume and any(r["method"] == method and r["lr"] == lr for r in data["sweep"]):
                continue
            folder = os.path.join(args.output, "sweep", f"{method}_lr{lr:g}")
            data["sweep"].append(train_run(method, lr, "builtin", args.sweep_steps, args.sweep_eval_size, folder,
                                           []))
            save(data, args.json, args.doc)
        data["chosen_lr"][method] = choose_lr([r for r in data["sweep"] if r["method"] == method])
        save(data, args.json, args.doc)
    for task in tasks:  # phase 2: full runs (phase 3 right after the built-in ones, which it needs)
        todo = []
        for method in methods:
            lr = data["chosen_lr"].get(method)
            done = data["runs"].get(task, {}).get(method)
            if lr is not None and not (args.resume and done and done.get("exit_code") == 0 and done["lr"] == lr):
                todo.append((method, lr))
        run_parallel(todo, task, args, data, task_args[task][0])
        if task == "builtin" and not args.no_latency:
            adapters = {m: r["folder"] for m, r in data["runs"]["builtin"].items()
                        if m in methods and r.get("adapter_bytes")}
            data["latency"] = run_latency(adapters, {t: a[1] for t, a in task_args.items()}, args.output,
                                          args.rounds, args.new_tokens, args.threads)
            save(data, args.json, args.doc)
    data["meta"]["total_seconds"] = time.time() - data["meta"]["started"]
    save(data, args.json, args.doc)
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps on the built-in task")
    parser.add_argument("--banking-steps", type=int, default=30, help="optimizer steps on the banking task")
    parser.add_argument("--sweep-steps", type=int, default=16, help="optimizer steps of each lr-sweep run")
    parser.add_argument("--sweep-eval-size", type=int, default=20)
    parser.add_argument("--eval-size", type=int, default=30, help="held-out rows of the full runs")
    parser.add_argument("--lrs", action="append", default=[], help="METHOD=LR[,LR...]: the sweep grid (or, with "
                        "--no-sweep, the lr) of a method; repeatable")
    parser.add_argument("--no-sweep", action="store_true", help="no sweep: --lrs' first value or the default lr")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of the latency timing")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated in the latency timing")
    parser.add_argument("--threads", type=int, help="torch threads of every run (default: train's, all cores)")
    parser.add_argument("--parallel", type=int, default=1, help="full runs at once (default 1; more only on a "
                        "machine other jobs keep busy, see the report)")
    parser.add_argument("--stagger", type=float, default=20.0, help="seconds between parallel starts (model loads "
                        "are the memory peak)")
    parser.add_argument("--output", default=os.path.join("runs", "methods"))
    parser.add_argument("--json", help="results file (default: OUTPUT/results.json)")
    parser.add_argument("--doc", default=os.path.join("docs", "methods.md"))
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --json, run the rest")
    parser.add_argument("--from-json", help="only re-render --doc from this results file")
    parser.add_argument("--note", help="a sentence for the report's header (e.g. why a phase was skipped)")
    parser.add_argument("--latency-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.latency_worker:
        return latency_worker(*args.latency_worker)
    if args.from_json:
        data = read_json(args.from_json)
        if args.note:
            data["meta"]["note"] = args.note
        with open(args.doc, "w", encoding="utf-8") as fh:
            fh.write(render(data))
        return 0
    unknown = set(args.methods.split(",")) - set(METHODS) | set(args.tasks.split(",")) - set(TASKS)
    if unknown:
        parser.error(f"unknown method or task: {', '.join(sorted(unknown))}")
    global THREADS
    THREADS = args.threads
    os.makedirs(args.output, exist_ok=True)
    args.json = args.json or os.path.join(args.output, "results.json")
    data = run_all(args)
    failed = [r for runs in data["runs"].values() for r in runs.values() if r.get("exit_code") != 0]
    print(f"wrote {args.json} and {args.doc}; {len(failed)} failed full run(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
