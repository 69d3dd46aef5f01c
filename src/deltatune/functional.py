"""PEFT's free functions: adapter state dicts in and out, and adapters injected into a plain model.

``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` move one adapter's tensors under PEFT's
file names (no adapter name in the key). ``inject_adapter_in_model`` adds adapter layers to a model
in place without wrapping it in a ``PeftModel``. Each works on a ``PeftModel`` and on a model that
``inject_adapter_in_model`` changed (it keeps the configs in ``model.peft_config``, as PEFT does).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .adapter_layer import adapter_layers, replace_module
from .config import PeftConfig
from .formats.peft import adapter_tensors, load_adapter_tensors
from .loading import check_adapter_name
from .methods import method_for
from .modules_to_save import wrap_modules_to_save

# Embedding names for save_embedding_layers="auto" (PEFT's EMBEDDING_LAYER_NAMES).
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _config_of(model: nn.Module, adapter_name: str) -> PeftConfig:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        known = sorted(configs) if isinstance(configs, dict) else []
        raise ValueError(f"The model has no adapter named {adapter_name!r} (adapters: {known}); pass a PeftModel "
                         "or a model changed by inject_adapter_in_model.")
    return configs[adapter_name]


def _base_of(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """One adapter's tensors, detached, under the names PEFT writes to adapter_model.safetensors.

    Args:
        state_dict: take the values from this full state dict of ``model`` (e.g. gathered under FSDP)
            instead of the live parameters.
        unwrap_compiled: look through ``torch.compile``'s wrapper.
        save_embedding_layers: also the full embedding matrices of targeted embedding layers; "auto" as
            PEFT (see :func:`resolve_save_embedding_layers`).
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    config = _config_of(model, adapter_name)
    embeddings = resolve_save_embedding_layers(save_embedding_layers, config, _base_of(model))
    tensors = adapter_tensors(model, config, adapter_name, save_embedding_layers=embeddings)
    if state_dict is not None:
        tensors = values_from_state_dict(model, tensors, state_dict)
    return {key: tensor.detach() for key, tensor in tensors.items()}


def values_from_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor],
                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same file keys, with values from a full state dict (matched through the tensors' own names)."""
    name_of = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    out = {}
    for key, tensor in tensors.items():
        model_name = name_of.get(id(tensor))
        out[key] = state_dict.get(model_name, tensor)
    return out


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Copy tensors named as in an adapter file into the adapter ``adapter_name`` of ``model``.

    Returns:
        ``(missing_keys, unexpected_keys)``: adapter tensors the dict lacks, and keys the model has no
        place for. (PEFT's missing_keys also lists every base-model weight; ours only the adapter's.)

    Raises:
        ValueError: a shape does not fit (unless ``ignore_mismatched_sizes``); nothing is copied then.
    """
    config = _config_of(model, adapter_name)
    missing, unexpected = load_adapter_tensors(model, config, adapter_name, peft_model_state_dict,
                                               skip_mismatched=ignore_mismatched_sizes)
    return _IncompatibleKeys(missing, unexpected)


def _targets_from_state_dict(state_dict: dict[str, torch.Tensor], peft_type: str) -> str:
    """The modules that hold the method's tensors in a state dict (PEFT's ``state_dict=`` for
    inject_adapter_in_model), as a full-match regex of their names: the part of each key before one of the
    method's markers (``.lora_`` for LoRA).

    A regex rather than a list of names, because a list of full names would no longer contain the short names of
    (IA)^3's ``feedforward_modules`` (PEFT's subset rule), while a regex leaves them to match as they did.
    """
    markers = method_for(peft_type).state_dict_markers
    names = set()
    for key in state_dict:
        for marker in markers:
            if marker in key:
                names.add(key.split(marker)[0].removeprefix("base_model.model."))
    if not names:
        raise ValueError(f"state_dict holds no {peft_type} adapter tensors (a key with one of {list(markers)}); "
                         "cannot tell which modules to adapt.")
    return "|".join(re.escape(name) for name in sorted(names))


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Add the adapter layers ``peft_config`` describes to ``model`` in place, with no PeftModel around it.

    Only the adapter's parameters stay trainable; the configs are kept in ``model.peft_config``.

    Args:
        state_dict: when given, the adapted modules are the ones its keys name (its values are not used).

    Returns:
        ``model`` itself.
    """
    if peft_config.is_prompt_learning:
        raise ValueError("inject_adapter_in_model does not take prompt-learning methods; use get_peft_model.")
    check_adapter_name(adapter_name)
    method = method_for(peft_config.peft_type)
    if state_dict is not None:
        peft_config.target_modules = _targets_from_state_dict(state_dict, peft_config.peft_type)
    method.attach(model, peft_config, adapter_name)  # takes back its own layers when it fails
    try:
        if peft_config.modules_to_save:
            wrap_modules_to_save(model, peft_config.modules_to_save, adapter_name)
    except BaseException:
        remove_adapter_layers(model, adapter_name)
        raise
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in adapter_layers(model):
        if adapter_name in layer.adapter_names() and adapter_name not in layer.active_adapters:
            layer.active_adapters = [*layer.active_adapters, adapter_name]
    for tensor in adapter_tensors(model, peft_config, adapter_name).values():
        if tensor.is_floating_point() and not peft_config.inference_mode:
            tensor.requires_grad_(True)
    configs = getattr(model, "peft_config", None)
    model.peft_config = {**(configs if isinstance(configs, dict) else {}), adapter_name: peft_config}
    return model


def remove_adapter_layers(model: nn.Module, adapter_name: str) -> None:
    """Drop one adapter's weights from every layer; layers left with none go back to the module they wrapped
    (the same module object, so the model's tree is as it was before the adapter came)."""
    for name, layer in list(adapter_layers(model)):
        layer.delete_adapter(adapter_name)
        if not layer.adapter_names():
            replace_module(model, name, layer.original_module if hasattr(layer, "original_module")
                           else layer.unwrapped(merge=False))


def resolve_save_embedding_layers(value: bool | str, config: PeftConfig, model: nn.Module) -> bool:
    """PEFT's "auto": save the embeddings when they are named targets or the vocabulary was resized.

    PEFT also asks the Hub for the base model's config.json; deltatune is offline and reads only a
    local base model folder.
    """
    if value != "auto":
        if not isinstance(value, bool):
            raise ValueError(f"save_embedding_layers must be True, False or 'auto', got {value!r}.")
        return value
    targets: Any = getattr(config, "target_modules", None) or []
    if not isinstance(targets, str) and any(name in targets for name in EMBEDDING_LAYER_NAMES):
        warnings.warn("Setting save_embedding_layers=True: embedding layers are in target_modules.", stacklevel=3)
        return True
    base = config.base_model_name_or_path
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not (base and vocab and os.path.isfile(os.path.join(base, "config.json"))):
        return False
    with open(os.path.join(base, "config.json"), encoding="utf-8") as fh:
        base_vocab = json.load(fh).get("vocab_size")
    if base_vocab is not None and base_vocab != vocab:
        warnings.warn("Setting save_embedding_layers=True: the vocabulary was resized during fine-tuning.",
                      stacklevel=3)
        return True
    return False
