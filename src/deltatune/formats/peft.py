"""HF PEFT's adapter folder: adapter_config.json + adapter_model.safetensors.

Tensor names are PEFT's: the wrapped model's state-dict key with the adapter name left out,
e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; a modules_to_save copy is
stored under the plain module key (``base_model.model.classifier.weight``). A prompt-learning adapter is
one tensor, ``prompt_embeddings`` (the virtual tokens or the flat prefixes, any reparameterization folded
in), and its modules_to_save copies go under ``base_model.<module>`` (PEFT wraps no ``.model`` there).
Adapters other than "default" go to a sub-folder named after them. Nothing is ever unpickled.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..adapter_layer import adapter_layers
from ..config import PeftConfig, write_atomically
from ..finite import all_finite
from ..methods import method_for
from ..prompt_learning import PROMPT_EMBEDDINGS_KEY, PromptModule, prompt_embeddings

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def adapter_tensors(
    root: nn.Module, config: PeftConfig, adapter_name: str, save_embedding_layers: bool = False
) -> dict[str, torch.Tensor]:
    """The live tensors that make up one adapter, under the names PEFT writes.

    Args:
        root: the ``PeftModel`` (its parameter names start with ``base_model.model.``).
        config: the adapter's config; its method may add base-model tensors to the file (LoRA's biases for
            ``bias="all"/"lora_only"``, see ``Method.base_tensors_in_file``).
        save_embedding_layers: also include the full input/output embedding weights of adapted embedding
            layers (PEFT does this by default when an embedding is targeted; we do it only when asked, since
            the file then holds a second copy of the vocabulary matrix).
    """
    if config.is_prompt_learning:
        return _prompt_learning_tensors(root, adapter_name)
    out: dict[str, torch.Tensor] = {}
    layers = dict(adapter_layers(root))
    for path, layer in layers.items():
        for key, tensor in layer.adapter_state_dict(adapter_name).items():
            out[f"{path}.{key}"] = tensor
    base_tensors = method_for(config.peft_type).base_tensors_in_file
    if base_tensors is not None:
        out.update(base_tensors(root, layers, config, adapter_name, save_embedding_layers))
    return out


def prompt_module(root: nn.Module, adapter_name: str) -> PromptModule | None:
    """The prompt-learning module of ``adapter_name`` that a PeftModel owns (``prompt_encoder[name]``), if any."""
    modules = getattr(root, "_modules", {}).get("prompt_encoder")
    return modules[adapter_name] if modules is not None and adapter_name in modules else None


def _prompt_learning_tensors(root: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``prompt_embeddings`` plus modules_to_save copies under PEFT's prompt-learning keys (``base_model.<module>``:
    PEFT's prompt-learning wrapper holds the model itself as ``base_model``)."""
    out: dict[str, torch.Tensor] = {}
    module = prompt_module(root, adapter_name)
    if module is not None:
        out[PROMPT_EMBEDDINGS_KEY] = prompt_embeddings(module)
    for path, layer in adapter_layers(root):
        for key, tensor in layer.adapter_state_dict(adapter_name).items():
            name = f"{path}.{key}"
            out["base_model." + name.removeprefix("base_model.model.") if name.startswith("base_model.model.")
                else name] = tensor
    return out


def non_finite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys whose (floating-point) tensor holds a NaN or an infinity (one reduction per tensor)."""
    return [key for key, tensor in tensors.items()
            if not all_finite(tensor)]


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse tensors with NaN/Inf before they are written: such an adapter only ever computes NaN.

    Raises:
        ValueError: naming every such tensor.
    """
    bad = non_finite_keys(tensors)
    if bad:
        raise ValueError(f"{what}: these tensors hold NaN or Inf values, so the adapter is not written: {bad}. "
                         "Training diverged (lower the learning rate, check the data), or the adapter was "
                         "loaded from a broken file.")


def write_adapter(
    directory: str | os.PathLike, config: PeftConfig, tensors: dict[str, torch.Tensor], extra_config: dict[str, Any]
) -> None:
    """Write one adapter folder: the config JSON and the tensors as safetensors.

    Everything is checked first (finite values, a config that is valid JSON), and each file is written to a
    temporary name and renamed, so a failure leaves the folder as it was and a crash never a torn file.

    Raises:
        ValueError: a tensor or config value is NaN/Inf (named), or the config cannot be written as JSON.
    """
    check_finite(tensors, f"adapter for {os.fspath(directory)!r}")
    if callable(getattr(config, "to_json_string", None)):  # (a PEFT config object passed in is written as it is)
        config.to_json_string(**extra_config)  # raises on a value JSON cannot hold, before anything is written
    os.makedirs(directory, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_atomically(os.path.join(directory, WEIGHTS_NAME),
                     lambda path: save_file(plain, path, metadata={"format": "pt"}))
    config.save_pretrained(directory, **extra_config)


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of an adapter folder: safetensors, or a legacy .bin read with weights_only=True."""
    directory = os.fspath(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            with safe_open(path, framework="pt", device="cpu") as fh:
                return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open is no dict
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            weights = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses anything but plain tensors
            raise ValueError(f"{legacy} could not be read as plain tensors (weights_only=True): {err}") from err
        if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in weights.items()):
            raise ValueError(f"{legacy} does not hold a dict of named tensors.")
        return weights
    raise FileNotFoundError(f"{directory!r} holds no {WEIGHTS_NAME} (nor a legacy {LEGACY_WEIGHTS_NAME}).")


def _model_tensor_for(key: str, model_tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """A base tensor the file names directly, also under the older name without ``base_layer``."""
    if key in model_tensors:
        return model_tensors[key]
    path, _, leaf = key.rpartition(".")
    return model_tensors.get(f"{path}.base_layer.{leaf}")


def _embedding_tensor_ids(root: nn.Module) -> set[int]:
    """The tensors of the model's embedding layers (input, output, any nn.Embedding), which PEFT saves in an
    adapter file with ``save_embedding_layers``."""
    base = root.get_base_model() if callable(getattr(root, "get_base_model", None)) else root
    modules = [m for m in base.modules() if isinstance(m, nn.Embedding)]
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(base, getter)() if callable(getattr(base, getter, None)) else None
        except (NotImplementedError, AttributeError):
            module = None
        if isinstance(module, nn.Module):
            modules.append(module)
    return {id(p) for m in modules for p in m.parameters()}


def _peft_writes(key: str, tensor: torch.Tensor, embedding_ids: set[int]) -> bool:
    """Base-model tensors that PEFT puts in adapter files: biases (bias="all"/"lora_only") and embedding weights
    (save_embedding_layers). A file naming any other base weight did not come from PEFT or deltatune."""
    return key.rpartition(".")[2] == "bias" or id(tensor) in embedding_ids


def _plan_load(root: nn.Module, config: PeftConfig, adapter_name: str, weights: dict[str, torch.Tensor]
               ) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor]], list[str], list[str], list[str]]:
    """Match file keys to the model's tensors without changing anything.

    Returns:
        (plan, unexpected, refused, mismatched): ``(key, target, value)`` to copy; keys the model has no place
        for; keys naming base weights PEFT never saves; "key: why" for tensors that do not fit.
    """
    expected = adapter_tensors(root, config, adapter_name)
    model_tensors = dict(root.named_parameters(remove_duplicate=False))
    embedding_ids = _embedding_tensor_ids(root)
    plan, unexpected, refused, mismatched = [], [], [], []
    for key, value in weights.items():
        target = expected.get(key)
        if target is None:
            target = _model_tensor_for(key, model_tensors)
            if target is not None and not _peft_writes(key, target, embedding_ids):
                refused.append(key)
                continue
        if target is None:
            unexpected.append(key)
        elif not isinstance(value, torch.Tensor):
            mismatched.append(f"{key}: file holds a {type(value).__name__}, not a tensor")
        elif target.shape != value.shape:
            mismatched.append(f"{key}: file has {tuple(value.shape)}, model has {tuple(target.shape)}")
        elif target.is_floating_point() and not value.is_floating_point():
            mismatched.append(f"{key}: file has dtype {value.dtype}, model needs floating point")
        else:
            plan.append((key, target, value))
    return plan, unexpected, refused, mismatched


def _adapter_owned_ids(root: nn.Module, adapter_name: str) -> set[int]:
    """The adapter's own tensors (LoRA weights, modules_to_save copies): loading into these changes no base weight."""
    return {id(t) for _, layer in adapter_layers(root) for t in layer.adapter_state_dict(adapter_name).values()}


@torch.no_grad()
def load_adapter_tensors(
    root: nn.Module, config: PeftConfig, adapter_name: str, weights: dict[str, torch.Tensor],
    skip_mismatched: bool = False, source: str | None = None,
) -> tuple[list[str], list[str]]:
    """Copy file tensors into the adapter ``adapter_name`` already attached to ``root``.

    Keys that are not adapter tensors but name a tensor of the model are loaded too when PEFT writes such keys
    (biases for bias="all"/"lora_only", embedding weights saved with save_embedding_layers), as PEFT does, with
    a warning that lists the base weights whose values change (unload() does not bring those back). Keys naming
    any other base weight are not loaded (warned): no adapter file PEFT writes holds them. Values with NaN/Inf
    are loaded, with a warning that names them.

    Args:
        skip_mismatched: tensors whose shape does not fit are left out with a warning (PEFT's
            ``ignore_mismatched_sizes``) instead of refused.
        source: where the tensors come from (the folder), for messages.

    Returns:
        (missing, unexpected): adapter keys the file lacks; file keys the model has no place for.

    Raises:
        ValueError: a shape or dtype does not fit; names the key and both. Nothing is copied then.
    """
    where = f"{source}: " if source else ""
    plan, unexpected, refused, mismatched = _plan_load(root, config, adapter_name, weights)
    if mismatched and skip_mismatched:
        warnings.warn(f"{where}skipping adapter tensors whose shape does not fit (ignore_mismatched_sizes=True):\n  "
                      + "\n  ".join(mismatched), stacklevel=3)
    elif mismatched:
        raise ValueError(
            f"{where}the adapter's tensors do not fit this model (was it trained on another base model or rank?):\n  "
            + "\n  ".join(mismatched)
        )
    if refused:
        warnings.warn(f"{where}not loading tensors that would overwrite base model weights (PEFT never saves these "
                      f"in an adapter): {refused}", stacklevel=3)
    non_finite = non_finite_keys({key: value for key, _, value in plan})
    if non_finite:
        warnings.warn(f"{where}these adapter tensors hold NaN or Inf values, so the model's outputs will too: "
                      f"{non_finite}", stacklevel=3)
    own = _adapter_owned_ids(root, adapter_name)
    replaced = [key for key, target, value in plan if id(target) not in own and key != PROMPT_EMBEDDINGS_KEY
                and not torch.equal(target, value.to(device=target.device, dtype=target.dtype))]
    if replaced:
        warnings.warn(f"{where}this adapter file replaces base model weights (as PEFT loads them; unload() and "
                      f"disable_adapter() do not bring the old values back): {replaced}", stacklevel=3)
    for key, target, value in plan:
        module = prompt_module(root, adapter_name) if key == PROMPT_EMBEDDINGS_KEY else None
        if module is not None:  # may be the output of a reparameterization: the module folds it in
            module.load_prompt_embeddings(value)
        else:
            target.data.copy_(value.to(device=target.device, dtype=target.dtype))
    expected = adapter_tensors(root, config, adapter_name)
    missing = [k for k in expected if k not in weights]
    return missing, unexpected
