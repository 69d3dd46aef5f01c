"""Reading an adapter folder with PEFT's keyword arguments, before any model is touched.

``PeftModel.from_pretrained`` and ``load_adapter`` take the keyword arguments PEFT takes. Each one is
honoured, or has no effect and says so (Hub download options on a local folder), or is refused with
an error that says why: none is ignored silently. Everything is checked before any model is touched,
and an adapter name is kept to one plain path component, so neither a name nor a file can reach outside
its place.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .config import CONFIG_NAME, HUB_DOWNLOAD_KWARGS, PeftConfig, local_adapter_folder, read_config_dict
from .formats.peft import read_adapter_weights
from .methods import config_from_dict


@dataclass
class AdapterFiles:
    """An adapter read from disk and checked, plus how to place it."""

    config: PeftConfig
    weights: dict[str, torch.Tensor]
    source: str
    device: torch.device | None = None
    ignore_mismatched_sizes: bool = False


def check_adapter_name(adapter_name: str) -> None:
    """An adapter name becomes a module key and a sub-folder name: keep it to one plain path component."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}.")
    if adapter_name == "__base__" or any(c in adapter_name for c in "./\\\0") or os.path.isabs(adapter_name):
        raise ValueError(f"{adapter_name!r} cannot name an adapter: it must not be '__base__' nor contain "
                         "'.', '/', '\\' or NUL (it becomes a module key and a folder name).")


def adapter_directory(save_directory: str | os.PathLike, adapter_name: str, default_name: str) -> str:
    """The folder ``save_pretrained`` writes one adapter to: ``save_directory`` itself for the default adapter,
    else its sub-folder named after the adapter, and never anywhere outside ``save_directory``.

    Raises:
        ValueError: a name that could reach outside (``check_adapter_name``), even one put into
            ``peft_config`` by hand.
    """
    root = os.fspath(save_directory)
    if adapter_name == default_name:
        return root
    check_adapter_name(adapter_name)
    directory = os.path.join(root, adapter_name)
    if os.path.dirname(os.path.normpath(directory)) != os.path.normpath(root):
        raise ValueError(f"adapter {adapter_name!r} would be saved outside {root!r}; rename it.")
    return directory


def read_adapter(
    model_id: str | os.PathLike,
    config: PeftConfig | None,
    is_trainable: bool,
    *,
    torch_device: str | torch.device | None = None,
    ephemeral_gpu_offload: bool = False,
    key_mapping: dict[str, str] | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    ignore_mismatched_sizes: bool = False,
    **kwargs: Any,
) -> AdapterFiles:
    """Read and check an adapter folder's config and weights without touching any model.

    Args:
        subfolder: the adapter lies in this sub-folder of ``model_id``.
        revision: only None (or "main") is possible: a local folder has no revisions.
        torch_device: the adapter's tensors are placed there.
        key_mapping: {regex: replacement} applied to every tensor name in the file (PEFT's argument for
            checkpoints whose module names changed).
        ignore_mismatched_sizes: tensors whose shape does not fit are skipped with a warning instead of
            refused.
        kwargs: Hub download options (``token``, ``cache_dir``, ...): no effect on a local folder (warned).

    Raises:
        TypeError: a keyword argument PEFT does not take either.
        ValueError / FileNotFoundError: an option deltatune cannot honour, or a bad folder.
    """
    unknown = sorted(set(kwargs) - HUB_DOWNLOAD_KWARGS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown} for loading an adapter.")
    device = _device(torch_device)
    _check_key_mapping(key_mapping)
    if ephemeral_gpu_offload:
        raise ValueError("ephemeral_gpu_offload=True is not supported yet by deltatune; load the adapter "
                         "onto the device the model is on (torch_device=...).")
    directory = local_adapter_folder(model_id, subfolder, revision)
    given = [k for k in kwargs if kwargs[k] not in (None, False)]
    if given:
        warnings.warn(f"{given} only apply to downloads from the Hub and have no effect on the local folder "
                      f"{directory!r}.", stacklevel=3)
    if config is None:
        config = config_from_dict(read_config_dict(directory), source=os.path.join(directory, CONFIG_NAME))
    config.inference_mode = not is_trainable
    weights = read_adapter_weights(directory)
    if key_mapping:
        try:
            weights = {_mapped(key, key_mapping): value for key, value in weights.items()}
        except re.error as err:  # a replacement naming a group its pattern lacks
            raise ValueError(f"key_mapping could not be applied to {directory!r}: {err}.") from err
    return AdapterFiles(config, weights, directory, device, ignore_mismatched_sizes)


def _device(torch_device: str | torch.device | None) -> torch.device | None:
    """``torch_device`` as a device this machine can put tensors on, checked before anything is read or changed."""
    if torch_device is None:
        return None
    try:
        device = torch.device(torch_device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError, ValueError) as err:
        raise ValueError(f"torch_device={torch_device!r} is not a device this machine can use ({err}); pass e.g. "
                         "'cpu', or the device the model is on.") from err
    return device


def _check_key_mapping(key_mapping: Any) -> None:
    """key_mapping: {regex: replacement}, each regex valid (a bad one must not surface as re.error mid-load)."""
    if key_mapping is None:
        return
    if not isinstance(key_mapping, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in key_mapping.items()):
        raise ValueError(f"key_mapping must be a dict {{regex: replacement}} of strings, got {key_mapping!r}.")
    for pattern in key_mapping:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"key_mapping pattern {pattern!r} is not a valid regular expression ({err}).") from err


def _mapped(key: str, key_mapping: dict[str, str]) -> str:
    """PEFT's rule: the patterns see the key without its ``base_model.model.`` prefix; the first that matches wins."""
    prefix = "base_model.model." if key.startswith("base_model.model.") else \
        "base_model." if key.startswith("base_model.") else ""
    rest = key.removeprefix(prefix)
    for pattern, replacement in key_mapping.items():
        rest, count = re.subn(pattern, replacement, rest)
        if count:
            break
    return prefix + rest
