"""The command line: a table from command name to one library function.

``deltatune train`` -> ``train.run.train``, ``generate``/``chat``/``evaluate``/``merge`` ->
``train.infer``, ``inspect`` -> ``train.inspect``, ``analyze`` -> ``analysis.report``, ``estimate`` ->
``analysis.memory``, ``merge-adapters`` -> ``train.merge_adapters``. This file only
parses arguments and prints.

Errors from bad input (a bad file, setting or folder: ``ValueError``, ``OSError`` and their kin, and
running out of memory) are shown as one line, ``deltatune <command>: error: ...``, with exit code 2;
``--debug`` (or the environment variable ``DELTATUNE_DEBUG=1``) shows the traceback instead. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

# The run's own flags; --method, --lr, --target-modules (whose defaults are the method's) and each method's flags
# come from the method registry (method_flags()).
RUN_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--model", {"help": "HF model folder or .gguf file (default: bundled SmolLM2-135M-Instruct)"}),
    ("--data", {"help": ".jsonl/.json/.csv/.parquet training file (default: the built-in order-to-JSON task)"}),
    ("--eval-data", {"help": "held-out file (default: rows taken out of --data)"}),
    ("--format", {"choices": ["alpaca", "chat", "text"], "help": "data format (default: from the columns)"}),
    ("--epochs", {"type": float}),
    ("--max-steps", {"type": int, "help": "optimizer steps (overrides --epochs)"}),
    ("--batch-size", {"type": int}),
    ("--grad-accum", {"type": int}),
    ("--max-length", {"type": int}),
    ("--seed", {"type": int}),
    ("--output", {"help": "run folder (default: runs/default)"}),
    ("--resume", {"action": "store_true", "default": None, "help": "continue from the last checkpoint"}),
    ("--overwrite", {"action": "store_true", "default": None,
                     "help": "replace an adapter, model or earlier run's checkpoints already in --output"}),
    ("--eval-size", {"type": int, "help": "held-out examples scored before and after (0: none)"}),
    ("--max-new-tokens", {"type": int}),
    ("--save-steps", {"type": int}),
    ("--threads", {"type": int}),
    ("--precision", {"choices": ["auto", "fp32", "bf16"], "help": "auto: bf16 autocast where the hardware has it"}),
    ("--quantize", {"choices": ["nf4", "fp4", "int8"],
                    "help": "QLoRA: store the frozen base in 4-bit NF4 (or FP4) or int8"}),
    ("--loraplus-ratio", {"type": float, "help": "LoRA+: train LoRA's B at --lr times this (e.g. 16; --method lora)"}),
    ("--packing", {"action": "store_true", "default": None,
                   "help": "padding-free batches: join each micro-batch's rows into one sequence (layer methods)"}),
    ("--config", {"help": "YAML file with any of these settings; flags win over it"}),
]


def method_flags() -> list[tuple[str, str, dict[str, Any]]]:
    """(group, flag, argparse options) for --method and every method's flags, from the registry.

    A flag several methods declare (e.g. a number of virtual tokens) is added once, in the first one's group;
    its help names every method that takes it and each one's default.
    """
    from .train.config import method_cli, method_names, method_options

    names = method_names()
    defaults = "; ".join(f"{name} {method_cli(name).lr:g}" for name in names)
    targets = "; ".join(f"{name} {method_cli(name).target_modules or 'per architecture'}" for name in names
                        if _takes_targets(name))
    flags = [("method", "--method", {"choices": list(names), "help": "adapter method (default: lora)"}),
             ("method", "--lr", {"type": float, "help": f"peak learning rate (default: {defaults})"}),
             ("method", "--target-modules", {"help": f"comma-separated names, a regex, or all-linear (default: "
                                                      f"{targets})"})]
    for key, owners in method_options().items():
        first = owners[0][1]
        kinds = {opt.kind for _, opt in owners}
        if len(kinds) > 1:  # a declaration bug: argparse can parse a flag one way only
            raise TypeError(f"--{first.flag} is declared with different kinds {sorted(kinds)} by "
                            f"{[name for name, _ in owners]}; methods that share a flag must agree on its kind.")
        shared = len(owners) > 1
        shown = ", ".join(f"{name} {opt.default}" if shared else str(opt.default) for name, opt in owners
                          if opt.default is not None)
        text = (f"[--method {' / '.join(name for name, _ in owners)}] " if shared else "") + first.help + \
            (f" (default: {shown})" if shown else "")
        flags.append((owners[0][0], f"--{first.flag}", {**_argparse_kind(first.kind, first.choices), "help": text,
                                                         "dest": key}))
    return flags


def _takes_targets(name: str) -> bool:
    from .train.config import method_entry, takes_targets

    return takes_targets(method_entry(name))


def _argparse_kind(kind: str, choices: tuple[str, ...]) -> dict[str, Any]:
    """How argparse reads a method flag of this kind (None when not given: the YAML file or the default wins)."""
    if kind == "bool":
        return {"action": argparse.BooleanOptionalAction, "default": None}
    kinds: dict[str, dict[str, Any]] = {"int": {"type": int}, "number": {"type": float},
                                        "names": {"metavar": "NAMES"}, "text": {}}
    return {**kinds[kind], **({"choices": list(choices)} if choices else {})}


def train_flags() -> list[tuple[str, dict[str, Any]]]:
    """Every flag of ``deltatune train`` as (flag, argparse options): the run's and the methods'."""
    return [*RUN_FLAGS, *((flag, options) for _, flag, options in method_flags())]


def _add_train(parser: argparse.ArgumentParser) -> None:
    for flag, options in RUN_FLAGS:
        parser.add_argument(flag, **options)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for group, flag, options in method_flags():
        if group not in groups:
            title = "adapter method" if group == "method" else f"--method {group}"
            groups[group] = parser.add_argument_group(title)
        groups[group].add_argument(flag, **options)


def _run_train(args: argparse.Namespace) -> int:
    from .train.config import config_from_sources, field_names
    from .train.run import train

    overrides = {name: getattr(args, name, None) for name in field_names()}
    train(config_from_sources(args.config, overrides))
    return 0


def _add_adapter_and_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter folder (from deltatune train)")
    parser.add_argument("--model", help="base model (default: the one the adapter was trained on)")


def _add_generate(parser: argparse.ArgumentParser) -> None:
    _add_adapter_and_model(parser)
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")


def _run_generate(args: argparse.Namespace) -> int:
    from .train.infer import generate

    print(generate(args.adapter, args.prompt, args.model, args.max_new_tokens, args.temperature))
    return 0


def _add_chat(parser: argparse.ArgumentParser) -> None:
    _add_adapter_and_model(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")


def _run_chat(args: argparse.Namespace) -> int:
    from .train.infer import chat

    chat(args.adapter, args.model, args.max_new_tokens, args.temperature)
    return 0


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    _add_adapter_and_model(parser)
    parser.add_argument("--data", required=True, help=".jsonl/.json/.csv/.parquet file to score")
    parser.add_argument("--format", choices=["alpaca", "chat", "text"])
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .train.config import _check_data_path
    from .train.infer import evaluate_file

    _check_data_path("data", args.data)
    result = evaluate_file(args.adapter, args.data, args.model, args.format, args.max_length, args.max_new_tokens)
    report = {"rows": result.count, "exact_match": result.exact_match, "loss": result.loss}
    print(json.dumps(report, indent=2))
    return 0


def _add_merge(parser: argparse.ArgumentParser) -> None:
    _add_adapter_and_model(parser)
    parser.add_argument("--output", required=True, help="folder for the merged model")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--requantize", choices=["nf4", "fp4", "int8"],
                        help="also report the rounding error of quantizing the merged model again")
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter or model already in --output")


def _run_merge(args: argparse.Namespace) -> int:
    from .train.infer import merge, requantize_report

    print(f"merged model written to {merge(args.adapter, args.output, args.dtype, args.model, args.overwrite)}")
    if args.requantize:
        print(requantize_report(args.output, args.requantize))
    return 0


def _add_merge_adapters(parser: argparse.ArgumentParser) -> None:
    from .methods.lora_combine import COMBINATION_TYPES

    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="LoRA adapter folders (same base model)")
    parser.add_argument("--weights", required=True, help="one weight per adapter, comma-separated, e.g. 0.7,0.3")
    parser.add_argument("--type", choices=COMBINATION_TYPES, default="svd", dest="combination_type",
                        help="how to combine (default: svd; see PeftModel.add_weighted_adapter)")
    parser.add_argument("--density", type=float, help="fraction of entries kept by ties/dare/magnitude_prune")
    parser.add_argument("--svd-rank", type=int, help="rank of an svd result (default: the largest input rank)")
    parser.add_argument("--model", help="base model (default: the one the adapters were trained on)")
    parser.add_argument("--output", required=True, help="folder for the combined adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter or model already in --output")


def _run_merge_adapters(args: argparse.Namespace) -> int:
    from .train.merge_adapters import merge_adapters

    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers, e.g. 0.7,0.3; got {args.weights!r}.") from None
    path = merge_adapters(args.adapters, weights, args.output, args.combination_type, args.density, args.svd_rank,
                          args.model, args.overwrite)
    print(f"combined adapter written to {path}")
    return 0


def _add_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="adapter folder")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _run_inspect(args: argparse.Namespace) -> int:
    from .train.inspect import format_report, inspect_adapter

    info = inspect_adapter(args.directory)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def _add_analyze(parser: argparse.ArgumentParser) -> None:
    analyses = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    similarity = analyses.add_parser("similarity", help="subspace similarity phi(i, j) of two LoRA adapters "
                                     "(Hu et al. 2021, section 7): heatmap PNGs and a CSV")
    similarity.add_argument("a", help="first adapter folder")
    similarity.add_argument("b", help="second adapter folder (trained on the same base model)")
    similarity.add_argument("--module", help="only modules whose name matches this regular expression")
    similarity.add_argument("--matrix", choices=["A", "B"], default="A",
                            help="compare A's right-singular vectors (default) or B's left-singular vectors")
    spectrum = analyses.add_parser("spectrum", help="singular values of each module's update scaling * B @ A: "
                                   "a PNG across layers, CSV and JSON")
    spectrum.add_argument("directory", help="adapter folder")
    intrinsic = analyses.add_parser("intrinsic", help="intrinsic dimension (Aghajanyan et al. 2020): train in a "
                                    "random d-dim subspace at each d, report d90; a PNG, CSV and JSON")
    intrinsic.add_argument("--dims", required=True, help="comma-separated d values, e.g. 10,100,1000")
    intrinsic.add_argument("--task", choices=["sst2", "builtin"], default="sst2",
                           help="sst2 (default model all-MiniLM-L6-v2 + a 2-way head) or the main job's built-in "
                                "task (default model SmolLM2)")
    intrinsic.add_argument("--data", help="--task sst2: folder with train.tsv and dev.tsv (text<TAB>label)")
    intrinsic.add_argument("--said", action="store_true", help="structure-aware: one trained scale per tensor")
    for flag, kind in (("--model", str), ("--steps", int), ("--lr", float), ("--full-lr", float),
                       ("--batch-size", int), ("--train-size", int), ("--eval-size", int), ("--max-length", int),
                       ("--seed", int)):
        intrinsic.add_argument(flag, type=kind, help="default: the task's (analysis/intrinsic_tasks.py)")
    for sub in (similarity, spectrum, intrinsic):
        sub.add_argument("--out", required=True, help="folder for the PNG, CSV and JSON files")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of an error")


def _run_analyze(args: argparse.Namespace) -> int:
    from .analysis import similarity_report, spectrum_report

    if args.analysis == "similarity":
        paths = similarity_report(args.a, args.b, args.out, args.module, args.matrix)
    elif args.analysis == "intrinsic":
        from .analysis import IntrinsicSettings, intrinsic_report
        from .analysis.intrinsic import parse_dims
        from .train.task import builtin_splits  # the library does not import train/: the rows are passed in

        names = ("task", "model", "data", "steps", "lr", "full_lr", "said", "batch_size", "train_size", "eval_size",
                 "max_length", "seed")
        settings = IntrinsicSettings(parse_dims(args.dims), **{k: getattr(args, k) for k in names
                                                                 if getattr(args, k) is not None})
        paths = intrinsic_report(settings, args.out, builtin_splits)
    else:
        paths = spectrum_report(args.directory, args.out)
    print("\n".join(paths))
    return 0


def _add_estimate(parser: argparse.ArgumentParser) -> None:
    from .analysis.memory import OPTIMIZERS, PRECISIONS, method_names

    parser.add_argument("--model", help="HF model folder or .gguf file; only its config is read (default: bundled "
                                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--method", choices=list(method_names()), default="lora",
                        help="full fine-tuning, qlora (LoRA on an NF4 base) or an adapter method (default: lora)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default: 1)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (default: 512)")
    parser.add_argument("--r", type=int, help="LoRA rank (default: 8)")
    parser.add_argument("--target-modules", help="comma-separated names, a regex, or all-linear (default: the "
                                                 "method's)")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw",
                        help="adamw: two fp32 states per trainable parameter; sgd: none (default: adamw)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute each layer in backward")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="bf16: autocast over fp32 "
                                                                                       "weights (default: fp32)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="print the numbers as JSON (or write them to PATH)")


def _run_estimate(args: argparse.Namespace) -> int:
    from .analysis.memory import estimate_memory, format_estimate

    targets = args.target_modules
    if targets is not None and "," in targets:
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    options = {"r": args.r, "target_modules": targets}
    estimate = estimate_memory(args.model, args.method, args.batch, args.seq, args.grad_checkpointing,
                               args.optimizer, args.precision, {k: v for k, v in options.items() if v is not None})
    if args.json is None:
        print(format_estimate(estimate))
    elif args.json == "-":
        print(json.dumps(estimate.to_dict(), indent=2))
    else:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(estimate.to_dict(), fh, indent=2)
        print(f"estimate written to {args.json}")
    return 0


# command -> (help, add arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("fine-tune a model with an adapter method, LoRA by default (no arguments: SmolLM2 on the built-in "
              "task)", _add_train, _run_train),
    "generate": ("answer one prompt with base model + adapter", _add_generate, _run_generate),
    "chat": ("talk to base model + adapter", _add_chat, _run_chat),
    "evaluate": ("exact match and loss of an adapter on a data file", _add_evaluate, _run_evaluate),
    "merge": ("fold an adapter into its base model and save a full model (methods that change weights: LoRA, "
              "(IA)^3, ...)", _add_merge, _run_merge),
    "merge-adapters": ("combine LoRA adapters into one new adapter (svd, linear, cat, ties, dare_linear, dare_ties, "
                       "magnitude_prune)", _add_merge_adapters, _run_merge_adapters),
    "inspect": ("show an adapter's method, its settings, targets, size and base model", _add_inspect, _run_inspect),
    "analyze": ("look inside LoRA adapters (subspace similarity of two, the spectrum of one) and models (intrinsic "
                "dimension)", _add_analyze,
                _run_analyze),
    "estimate": ("memory (weights, gradients, optimizer, activations) and trainable parameters of a training run, "
                 "from the model's config alone", _add_estimate, _run_estimate),
}


# What bad input raises (a file, setting or folder the user gave, or a size that does not fit in memory):
# shown as one line with exit code 2. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning (delta tuning).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (text, add, _) in COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=text)
        add(sub)
        sub.add_argument("--debug", action="store_true",
                         help="show the full traceback of an error (also: environment variable DELTATUNE_DEBUG=1)")
    return parser


def error_line(err: BaseException) -> str:
    """The one line an error is shown as: its message with line breaks folded, or what it was when it has none."""
    text = " ".join(str(err).split())
    if isinstance(err, MemoryError):
        return f"out of memory{f' ({text})' if text else ''}; lower --r, --batch-size or --max-length."
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``deltatune`` and ``python -m deltatune``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 1
    debug = args.debug or os.environ.get("DELTATUNE_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[args.command][2](args)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"deltatune {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Under torchrun, end the process group Trainer started: a gloo worker thread still alive when the
    interpreter exits can abort the process ("terminate called without an active exception")."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
