"""Using a trained adapter: load it on its base model, generate, chat, score a file, merge.

The base model is found from the adapter's ``base_model_name_or_path`` (``train`` records the
folder or GGUF file it used, or for the bundled SmolLM2 the hub id it was converted from, which
resolves back to the bundled file offline) unless ``--model`` says otherwise.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ..config import CONFIG_NAME, is_real_number, read_config_dict
from ..formats.models import (
    ModelSource,
    is_default_model,
    load_model,
    load_tokenizer,
    quantize_beside_adapters,
    resolve_model,
    save_full_model,
)
from ..methods import METHODS, method_for
from ..model import PeftModel
from . import data as datamod
from .evaluate import EvalResult, evaluate
from .outputs import check_output
from .report import read_run_info


def base_model_of(adapter: str, model: str | None = None) -> str | None:
    """The base model to load: ``model`` if given, else the one the adapter's config names.

    Raises:
        FileNotFoundError: ``adapter`` is not an adapter folder.
        ValueError: its adapter_config.json is not a JSON object of a PEFT config (names the file).
    """
    config_path = os.path.join(adapter, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{adapter!r} is not an adapter folder (no {CONFIG_NAME}).")
    name = read_config_dict(adapter).get("base_model_name_or_path")
    if model is not None:
        return model
    if name is not None and not isinstance(name, str):
        raise ValueError(f"{config_path}: base_model_name_or_path={name!r} must be a path or hub id (text); "
                         "fix it, or pass --model PATH.")
    return name


def base_source(adapter: str, model: str | None = None) -> ModelSource:
    """Where the base model of ``adapter`` is on this machine (``model`` overrides what the adapter records).

    Raises:
        FileNotFoundError: ``adapter`` is not an adapter folder, or the base it records (a hub id
            other than the bundled SmolLM2's, or a path from another machine) is not here.
    """
    name = base_model_of(adapter, model)
    if model is None and name is not None and not is_default_model(name) \
            and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"the base model of {adapter!r} ({name!r}, its base_model_name_or_path) is not a "
                                "folder or .gguf file on this machine, and deltatune downloads nothing; pass "
                                "--model PATH (an HF model folder or a .gguf file).")
    return resolve_model(name)


def load_adapted(adapter: str, model: str | None = None, tokenizer: Any = None) -> tuple[PeftModel, Any]:
    """Base model + adapter, frozen, in eval mode, and the tokenizer (``tokenizer`` if given: the base's)."""
    source = base_source(adapter, model)
    # an adapter that learned beside a quantized base gets that base rebuilt the same way; a LoftQ adapter's own
    # layers are quantized by LoftQ again from the float weights (as when it was made), then the rest
    quantize = read_run_info(adapter).get("quantize")
    loftq = read_config_dict(adapter).get("init_lora_weights") == "loftq"
    base, tokenizer = load_model(source, quantize=None if loftq else quantize, tokenizer=tokenizer)
    adapted = PeftModel.from_pretrained(base, adapter, is_trainable=False)
    if loftq and quantize:
        quantize_beside_adapters(adapted, quantize)
    return adapted, tokenizer


def build_prompt(tokenizer: Any, history: list[dict[str, str]]) -> list[int]:
    """Token ids for a conversation so far, with the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    example = datamod._alpaca({"instruction": history[-1]["content"], "output": ""}, tokenizer)
    return tokenizer(example.prompt)["input_ids"]


@torch.no_grad()
def reply(model: torch.nn.Module, tokenizer: Any, history: list[dict[str, str]], max_new_tokens: int = 128,
          temperature: float = 0.0) -> str:
    """The model's answer to the last user turn of ``history`` (greedy when temperature is 0)."""
    ids = torch.tensor([build_prompt(tokenizer, history)])
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def check_generation(max_new_tokens: int | None, temperature: float = 0.0) -> None:
    """Refuse generation settings before a model is loaded (a NaN temperature would silently mean greedy).

    Raises:
        ValueError: naming the flag and what it takes.
    """
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool)
                                       or max_new_tokens < 1):
        raise ValueError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}.")
    if not is_real_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}.")


def generate(adapter: str, prompt: str, model: str | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0) -> str:
    """One answer from base + adapter to ``prompt``."""
    check_generation(max_new_tokens, temperature)
    peft_model, tokenizer = load_adapted(adapter, model)
    return reply(peft_model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens, temperature)


def chat(adapter: str, model: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
         read: Any = input, write: Any = print) -> None:
    """Interactive chat with base + adapter; an empty line, "exit" or Ctrl-D ends it."""
    check_generation(max_new_tokens, temperature)
    peft_model, tokenizer = load_adapted(adapter, model)
    history: list[dict[str, str]] = []
    write("chatting with the adapted model; empty line or 'exit' to quit, '/reset' to forget the conversation")
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if text in ("", "exit", "quit"):
            break
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        answer = reply(peft_model, tokenizer, history, max_new_tokens, temperature)
        history.append({"role": "assistant", "content": answer})
        write(f"model> {answer}")


def evaluate_file(adapter: str, data: str, model: str | None = None, data_format: str | None = None,
                  max_length: int = 1024, max_new_tokens: int | None = None) -> EvalResult:
    """Exact match (rows with a reference answer) and mean response-token loss of base + adapter on ``data``.

    Raises:
        FileNotFoundError / ValueError: bad adapter folder or data file, before the model loads.
    """
    check_generation(max_new_tokens)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 8:
        raise ValueError(f"--max-length must be an integer >= 8, got {max_length!r}.")
    source = base_source(adapter, model)
    raw_rows = datamod.read_rows(data)
    fmt = datamod.detect_format(raw_rows, data, data_format)
    tokenizer = load_tokenizer(source)
    examples = datamod.to_examples(raw_rows, fmt, tokenizer, data)
    rows = datamod.tokenize(examples, tokenizer, max_length, data).rows
    peft_model, tokenizer = load_adapted(adapter, model, tokenizer)
    return evaluate(peft_model, tokenizer, examples, rows, max_new_tokens=max_new_tokens)


def merge(adapter: str, output: str, dtype: str = "float32", model: str | None = None,
          overwrite: bool = False) -> str:
    """Fold the adapter into its base model and write a plain transformers model folder.

    The folder (model.safetensors, config.json, tokenizer) loads with
    ``AutoModelForCausalLM.from_pretrained(output)`` and generates what base + adapter generates.
    Merging is safe: every layer's merged weight is checked for NaN/Inf before any is changed, and the
    whole merged state dict once more before anything is written, so no NaN model ever reaches disk.

    Args:
        overwrite: allow ``output`` to hold an adapter or a model already (refused otherwise).

    Raises:
        ValueError: unknown dtype; an adapter of a method that cannot merge (bottleneck, prompt-type); an output
            that is a file, cannot be written, holds an adapter or model (without ``overwrite``), is the adapter
            folder or is in the base model's folder (all checked before loading); a merge that would hold
            NaN/Inf (nothing is written).
    """
    from ..formats.models import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    base_model_of(adapter, model)  # an adapter folder with a readable config, or a clear error
    check_mergeable(adapter)  # the method's own blocker first: a missing base model would only hide it
    source = base_source(adapter, model)
    check_output(output, {source.directory: "the base model's folder"}, overwrite, command="merge")
    if os.path.realpath(output) == os.path.realpath(adapter):
        raise ValueError(f"--output {output!r} is the adapter folder; choose another folder for the merged model.")
    peft_model, tokenizer = load_adapted(adapter, model)
    merged = peft_model.merge_and_unload(safe_merge=True)
    from ..quant import dequantize_model

    dequantize_model(merged, torch.float32)  # a quantized base comes back as floats; never merged into codes
    merged.config.name_or_path = output
    save_full_model(merged, tokenizer, output, dtype)  # checks every tensor for NaN/Inf before writing any file
    return output


def check_mergeable(adapter: str) -> None:
    """Refuse, before any model is loaded or anything written, an adapter whose method cannot be merged.

    The registry says which methods merge: those whose trained change is a change of the base weights (LoRA,
    (IA)^3). A bottleneck adapter adds a small non-linear network, prompt-type methods add inputs; no weights
    of the base model compute either.

    Raises:
        ValueError: the adapter's method does not merge (names it and the methods that do), or its peft_type is
            not a method deltatune knows (names the file).
    """
    peft_type = read_config_dict(adapter).get("peft_type")
    method = method_for(peft_type, os.path.join(adapter, CONFIG_NAME))
    if method.mergeable:
        return
    name = method.cli.name if method.cli is not None else peft_type
    mergeable = ", ".join(m.cli.name if m.cli is not None else key for key, m in METHODS.items() if m.mergeable)
    raise ValueError(f"{adapter} is a {name} adapter ({peft_type}), which cannot be merged into the base model: "
                     "what it adds (a small network beside the layers, or extra inputs) is no change of the base "
                     f"weights. Nothing was written. Use it unmerged (deltatune generate / chat / evaluate --adapter "
                     f"{adapter}). The methods that merge: {mergeable}.")


def requantize_report(merged_dir: str, quantize: str) -> str:
    """What quantizing a merged model folder again would cost, and how to load it so.

    The merged update is not a multiple of the NF4/int8 grid, so re-quantizing rounds part of it
    away; this says how much, over all linear layers, before anyone ships such a model.
    """
    from transformers import AutoModelForCausalLM

    from ..quant import quantize_arguments, requantization_error

    arguments = quantize_arguments(quantize)
    error = requantization_error(AutoModelForCausalLM.from_pretrained(merged_dir), **arguments)
    return (f"re-quantizing to {quantize}: relative RMS error {error['relative_rms_error']:.4f}, "
            f"max abs error {error['max_abs_error']:.4g} over the linear layers; load it so with "
            f"deltatune.quant.load_quantized({merged_dir!r}, bits={arguments['bits']}, "
            f"quant_type={arguments['quant_type']!r})")
