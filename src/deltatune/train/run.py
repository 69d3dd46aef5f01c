"""``train(config)``: the main job, data -> tokens -> Trainer -> adapter on disk -> before/after score.

Cheap checks come first (settings, model path, the output folder, every data row, prompt lengths
with the tokenizer); the model is loaded only once all of them pass, and nothing on disk is removed
or replaced before then. The final adapter is written (atomically) before the checkpoints are
removed, and a run whose loss or weights become NaN/Inf stops with the checkpoints kept. Works the
same under ``torchrun --nproc_per_node N -m deltatune train`` (DDP over gloo on CPU): every process trains
on its share of each global batch, and process 0 evaluates and writes the files.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PrinterCallback

from ..config import PeftConfig
from ..formats.models import ModelSource, load_model, load_tokenizer, quantize_beside_adapters, resolve_model
from ..formats.peft import non_finite_keys
from ..methods import bottleneck, method_for
from ..methods.lora import LoraConfig
from ..methods.lora_init import base_init
from ..methods.prompt_tuning import PromptTuningConfig, init_prompt_from_text, text_token_ids
from ..targets import base_of, find_targets
from ..tasks import get_peft_model
from . import data as datamod
from .config import TrainConfig, _worded_as_flags, method_cli, method_config
from .evaluate import default_max_new_tokens, evaluate
from .outputs import CHECKPOINTS, check_output
from .report import RunSummary, plot_loss, print_summary, write_log, write_run_info
from .task import BUILTIN_STEPS, builtin_splits
from .trainer import (
    AdapterTrainer,
    Collator,
    ListDataset,
    LossProgress,
    NonFiniteTrainingError,
    PackingCollator,
    StopOnNonFinite,
    frozen_linear_weights_in,
    last_checkpoint,
    packing_keeps_rows_apart,
    resumable_checkpoint,
    training_arguments,
)

BUILTIN = "built-in order-to-JSON task"


@dataclass
class PreparedData:
    train: datamod.Tokenized
    eval_examples: list[datamod.Example]
    fmt: str
    source: str


def prepare_data(config: TrainConfig, tokenizer: Any) -> PreparedData:
    """Read, check, render and tokenize the training and held-out data (or build the built-in task)."""
    if config.data is None:
        steps = config.max_steps if config.max_steps > 0 else BUILTIN_STEPS
        n_train = steps * config.batch_size * config.grad_accum * _world_size()
        train_rows, eval_rows = builtin_splits(n_train, max(config.eval_size, 1), config.seed)
        eval_rows = eval_rows[:config.eval_size]
        fmt, source, eval_source = "chat", BUILTIN, BUILTIN
    else:
        train_rows = datamod.read_rows(config.data)
        fmt = datamod.detect_format(train_rows, config.data, config.format)
        source = config.data
        if config.eval_data:
            eval_rows = datamod.read_rows(config.eval_data)
            datamod.detect_format(eval_rows, config.eval_data, fmt)
            eval_rows, eval_source = eval_rows[:config.eval_size or None], config.eval_data
        else:
            train_rows, eval_rows = datamod.split_rows(train_rows, config.eval_size, config.seed)
            eval_source = f"{config.data} (held-out rows)"
    train_examples = datamod.to_examples(train_rows, fmt, tokenizer, source)
    eval_examples = datamod.to_examples(eval_rows, fmt, tokenizer, eval_source)
    train = datamod.tokenize(train_examples, tokenizer, config.max_length, source)
    return PreparedData(train, eval_examples, fmt, source)


def _describe_base(source: ModelSource) -> str:
    """The base model as the run prints it: the recorded name, and the local file when they differ."""
    return source.path if source.name == source.path else f"{source.name} (from {source.path})"


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _set_threads(config: TrainConfig) -> None:
    """Share the cores between the processes of this machine (torchrun runs several)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = config.threads or max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)


def train(config: TrainConfig) -> RunSummary:
    """Fine-tune ``config.model`` with ``config.method`` (LoRA by default) on ``config.data``; write the adapter
    and report.

    Returns:
        The run summary (before/after exact match, steps, timings), also written as JSON.

    Raises:
        FileNotFoundError / ValueError: bad settings, model path, output folder or data, raised before the
            model is loaded; an adapter too large for this machine's memory, before it is allocated.
        NonFiniteTrainingError (a ValueError): the loss, gradient norm or weights became NaN/Inf; the checkpoints
            written before that step are kept, and the message names the last one.
        KeyboardInterrupt: propagates after saying how to resume.
    """
    started = time.time()
    config.validate()
    main = int(os.environ.get("RANK", "0")) == 0
    source = resolve_model(config.model)
    output = config.output_dir
    checkpoints = os.path.join(output, CHECKPOINTS)
    check_output(output, {source.directory: "the base model's folder"}, config.overwrite, config.resume)
    peft_config = method_config(config, source.name)  # the method's own checks, before anything is loaded
    init_text = prompt_init_text(config, peft_config)
    resume_from = resumable_checkpoint(checkpoints, lambda text: _say(main, text)) if config.resume else None
    _set_threads(config)
    tokenizer = load_tokenizer(source)
    if init_text is not None:  # a text without tokens is refused before the model is loaded
        _as_flags(config, text_token_ids, init_text, tokenizer, peft_config.num_virtual_tokens)
    prepared = prepare_data(config, tokenizer)
    args = training_arguments(checkpoints, config, use_cpu=not torch.cuda.is_available())
    _say(main, f"base model: {_describe_base(source)}\ndata: {prepared.source} "
               f"({len(prepared.train.rows)} training rows, {len(prepared.eval_examples)} held-out, "
               f"format {prepared.fmt})")
    _say(main, f"method: {config.method} (lr {config.lr:g}"
               f"{f', LoRA+ ratio {config.loraplus_ratio:g}' if config.loraplus_ratio else ''})")
    if prepared.train.truncated:
        _say(main, f"{prepared.train.truncated} training rows are longer than max_length={config.max_length}; cut.")

    torch.manual_seed(config.seed)  # the adapter's initial A matrices
    loftq = getattr(peft_config, "init_lora_weights", None) == "loftq"  # LoftQ quantizes from the float weights
    model, tokenizer = load_model(source, quantize=None if loftq else config.quantize, tokenizer=tokenizer)
    check_adapter_fits(model, peft_config)
    peft_model = get_peft_model(model, peft_config)
    if loftq:
        quantize_beside_adapters(peft_model, config.quantize)
    if config.packing and not packing_keeps_rows_apart(peft_model):
        raise ValueError(f"--packing: the attention of this {getattr(model.config, 'model_type', 'model')} model "
                         "does not keep packed rows apart (they would attend to each other); train without "
                         "--packing.")
    if config.use_bf16 and isinstance(peft_config, LoraConfig) and not peft_config.use_dora \
            and not base_init(peft_config.init_lora_weights) and config.quantize is None:
        # what autocast would cast them to at every call; from here on the model runs under autocast only
        frozen_linear_weights_in(peft_model, torch.bfloat16)
    if init_text is not None:
        name, kwargs = tokenizer_record(source)
        _as_flags(config, init_prompt_from_text, peft_model, init_text, tokenizer, tokenizer_name_or_path=name,
                  tokenizer_kwargs=kwargs)
    trainable, all_params = peft_model.get_nb_trainable_parameters()
    if main:
        peft_model.print_trainable_parameters()
    max_new = config.max_new_tokens or (default_max_new_tokens(prepared.eval_examples, tokenizer)
                                        if prepared.eval_examples else 0)
    before = _score(main and resume_from is None, peft_model, tokenizer, prepared, max_new, "before training",
                    config.use_bf16)

    if not config.resume and main and os.path.isdir(checkpoints):  # only with --overwrite (check_output)
        print(f"removing checkpoints of an earlier run in {checkpoints} (--overwrite)")
        shutil.rmtree(checkpoints)
    initial = _save_initial_adapter(peft_model, peft_config, checkpoints) if main else None
    progress = LossProgress()
    trainer = AdapterTrainer(model=peft_model, args=args, train_dataset=ListDataset(prepared.train.rows),
                             data_collator=PackingCollator() if config.packing else Collator(tokenizer.pad_token_id),
                             callbacks=[progress, StopOnNonFinite()])
    trainer.remove_callback(PrinterCallback)  # our progress bar shows the loss; no dict per step
    trainer.loraplus_ratio = config.loraplus_ratio  # LoRA+: B's learning rate is lr x this (None: plain)
    train_start = time.time()
    _fit(trainer, progress, resume_from, checkpoints, config, main)
    train_seconds = time.time() - train_start
    summary = RunSummary(output, source.path, prepared.source, len(prepared.train.rows),
                         len(prepared.eval_examples), prepared.train.truncated, trainer.state.global_step,
                         trainable, all_params, exact_match_before=before)
    history = trainer.state.log_history
    del trainer  # the optimizer state and the autocast weight cache are not needed to evaluate
    _release_memory()
    if not main:
        return summary
    _save_adapter(peft_model, output, checkpoints, summary.steps, initial)
    write_run_info(output, prepared.fmt, max_new, config.quantize)
    write_log(history, output)
    plot_loss(history, output)
    shutil.rmtree(checkpoints, ignore_errors=True)  # only now: the finished adapter is safely on disk
    losses = [e["loss"] for e in history if "loss" in e]
    summary.final_loss = losses[-1] if losses and math.isfinite(losses[-1]) else None
    after = evaluate(peft_model, tokenizer, prepared.eval_examples, max_new_tokens=max_new, bf16=config.use_bf16) \
        if prepared.eval_examples else None
    if after is not None:
        summary.exact_match_after = after.exact_match
        summary.samples = [{"prompt": e.question,
                            "expected": e.reference, "got": p}
                           for e, p in zip(prepared.eval_examples, after.predictions, strict=False)][:5]
    summary.train_seconds = train_seconds
    summary.total_seconds = time.time() - started
    summary.write()
    print_summary(summary)
    return summary


def prompt_init_text(config: TrainConfig, peft_config: PeftConfig) -> str | None:
    """``--prompt-init-text``: the text whose token embeddings start the prompt, tokenized by the run's own tokenizer
    (the bundled GGUF model has no tokenizer folder to give PEFT's ``tokenizer_name_or_path``); None when not given.

    Raises:
        ValueError: ``--prompt-init`` is given too (each says how the prompt starts).
    """
    if not isinstance(peft_config, PromptTuningConfig) or config.option("prompt_init_text") is None:
        return None
    if config.option("prompt_init") is not None:
        raise ValueError(f"prompt_init_text starts the virtual tokens from the text's tokens and prompt_init="
                         f"{config.option('prompt_init')!r} says otherwise; give only one of --prompt-init-text and "
                         "--prompt-init.")
    return peft_config.prompt_tuning_init_text


def tokenizer_record(source: ModelSource) -> tuple[str, dict[str, str] | None]:
    """How adapter_config.json names the run's tokenizer for a TEXT init (``tokenizer_name_or_path`` and
    ``tokenizer_kwargs``; PEFT refuses TEXT without a name, and reads the tokenizer only to start a new adapter from
    the config, never to load this one): the bundled model's hub id, the HF folder, or a GGUF file's folder with
    ``gguf_file``."""
    if source.hub_id:
        return source.hub_id, None
    if source.gguf_file:
        return source.directory, {"gguf_file": source.gguf_file}
    return source.directory, None


def _as_flags(config: TrainConfig, function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a method's library function; a ValueError it raises names the flag (prompt_init_text) instead of the
    config field (prompt_tuning_init_text)."""
    try:
        return function(*args, **kwargs)
    except ValueError as err:
        raise ValueError(_worded_as_flags(str(err), method_cli(config.method).options)) from err


def _fit(trainer: AdapterTrainer, progress: LossProgress, resume_from: str | None, checkpoints: str,
         config: TrainConfig, main: bool) -> None:
    """Run the Trainer; on Ctrl-C or a NaN/Inf, say which checkpoint is kept and how to go on."""
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        progress.close()
        last = last_checkpoint(checkpoints)
        hint = f"last checkpoint: {last}; continue with the same command plus --resume" if last else \
            "no checkpoint was written yet"
        _say(main, f"\ninterrupted; {hint}.")
        raise
    except NonFiniteTrainingError as err:
        progress.close()
        last = last_checkpoint(checkpoints)
        kept = f"the last good checkpoint is kept: {last}" if last else "no checkpoint had been written yet"
        raise NonFiniteTrainingError(err.step, f"{err.what}, so no adapter was written; {kept}. Lower --lr (it "
                                     f"is {config.lr:g}), or check the data and the base model.") from None
    finally:
        progress.close()


def _save_initial_adapter(peft_model: Any, peft_config: PeftConfig, checkpoints: str) -> str | None:
    """A PiSSA / OLoRA run's adapter as initialised (beside the checkpoints, removed with them), so that the final
    one is written as a plain LoRA adapter for the original base: the run's base held the residual weights."""
    if base_init(getattr(peft_config, "init_lora_weights", None)) not in ("pissa", "olora"):
        return None
    path = os.path.join(checkpoints, "initial-adapter")
    peft_model.save_pretrained(path)
    return path


def _save_adapter(peft_model: Any, output: str, checkpoints: str, step: int, initial: str | None = None) -> None:
    """Write the final adapter (each file atomically); a NaN/Inf one is refused in one line, checkpoints kept.

    ``initial``: the folder of :func:`_save_initial_adapter`; the adapter is then converted to plain LoRA."""
    bad = non_finite_keys(dict(peft_model.named_parameters()))
    if bad:
        last = last_checkpoint(checkpoints)
        kept = f"; the last checkpoint is kept: {last}" if last else ""
        raise NonFiniteTrainingError(step, f"{len(bad)} trained tensor(s) hold NaN or Inf (first: {bad[0]}), so no "
                                     f"adapter was written{kept}.")
    peft_model.save_pretrained(output, path_initial_model_for_weight_conversion=initial)


def check_adapter_fits(model: torch.nn.Module, config: PeftConfig, bytes_per_value: int = 16) -> None:
    """Refuse an adapter that cannot be trained in this machine's memory, before allocating any of it.

    On Linux a huge allocation does not fail cleanly: memory is overcommitted, so it succeeds, and the kernel
    kills the process when the pages are first written. Each value is held four times in float32 while training
    (weight, gradient, AdamW's two moments). Only methods whose size a flag sets without bound are estimated:
    LoRA (r * (in + out) per layer) and bottleneck adapters (2 * m * hidden per adapter); an (IA)^3 vector is
    as wide as its layer.

    Raises:
        ValueError: the estimate exceeds the memory available now; names the setting and both sizes.
    """
    available = _available_memory()
    if available is None:
        return
    if isinstance(config, LoraConfig):
        setting, fix = f"r={config.r}", "Choose a smaller --r (usually 4-64; a rank above a layer's width adds nothing)"
        names, values = _lora_values(model, config)
    elif isinstance(config, bottleneck.BottleneckConfig):
        setting, names, values = _bottleneck_values(model, config)
        fix = "Choose a smaller --bottleneck-size or a larger --reduction-factor (the default, 16, gives hidden / 16)"
    else:
        return
    needed = values * bytes_per_value
    if needed > available:
        raise ValueError(f"{setting} makes an adapter of {values:,} values over {len(names)} layers; training it "
                         f"needs about {needed / 2**30:,.1f} GiB (weights, gradients and AdamW state in float32), "
                         f"and {available / 2**30:.1f} GiB of memory is available. {fix}.")


def _lora_values(model: torch.nn.Module, config: LoraConfig) -> tuple[list[str], int]:
    """LoRA's adapted layers and its number of values: r * (in + out) per layer."""
    targets = config.target_modules if config.target_modules is not None else _default_targets(model, config)
    names = find_targets(model, targets, exclude_modules=config.exclude_modules)
    return names, sum(config.r * _layer_width(base_of(model.get_submodule(name))) for name in names)


def _bottleneck_values(model: torch.nn.Module, config: bottleneck.BottleneckConfig) -> tuple[str, list[str], int]:
    """(the setting, the adapted modules, the number of values): down and up projection, m * (2 * hidden + 1) + hidden
    per adapter, with hidden the model's width (the adapters' own checks, in attach, see each module's)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int) or hidden <= 0:
        return "", [], 0
    targets = config.target_modules if config.target_modules is not None else _default_targets(model, config)
    names = find_targets(model, targets, layers_to_transform=config.layers_to_transform,
                         layers_pattern=config.layers_pattern)
    if config.bottleneck_size is not None:
        size, setting = config.bottleneck_size, f"bottleneck_size={config.bottleneck_size}"
    else:
        size, setting = int(hidden // config.reduction_factor), f"reduction_factor={config.reduction_factor}"
    return setting, names, len(names) * (size * (2 * hidden + 1) + hidden)


def _default_targets(model: torch.nn.Module, config: PeftConfig) -> Any:
    """The method's own per-architecture default targets (the registry's ``default_targets``)."""
    return method_for(config.peft_type).default_targets(model, config)


def _layer_width(module: torch.nn.Module) -> int:
    """in + out of a layer LoRA adapts (A is r x in, B is out x r), from its attributes or its weight."""
    for fan_in, fan_out in (("in_features", "out_features"), ("num_embeddings", "embedding_dim"),
                            ("in_channels", "out_channels")):
        if hasattr(module, fan_in) and hasattr(module, fan_out):
            return int(getattr(module, fan_in)) + int(getattr(module, fan_out))
    weight = getattr(module, "weight", None)
    return int(sum(weight.shape[:2])) if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else 0


def _available_memory() -> int | None:
    """Bytes of memory available to this process now (psutil), or None when it cannot tell."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _score(enabled: bool, model: Any, tokenizer: Any, prepared: PreparedData, max_new: int, when: str,
           bf16: bool) -> float | None:
    if not enabled or not prepared.eval_examples:
        return None
    tick = time.time()
    result = evaluate(model, tokenizer, prepared.eval_examples, max_new_tokens=max_new, bf16=bf16)
    if result.exact_match is not None:
        print(f"exact match {when}: {100 * result.exact_match:.1f}% on {result.count} held-out examples "
              f"({time.time() - tick:.0f}s)", flush=True)
    return result.exact_match


def _release_memory() -> None:
    """Give freed training buffers back to the OS, so evaluation does not add to training's peak."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _say(main: bool, text: str) -> None:
    if main:
        print(text, flush=True)
