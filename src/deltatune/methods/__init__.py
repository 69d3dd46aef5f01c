"""The registry of methods: peft_type -> its config class and its attach function.

Adding a method is adding a file in this folder and one line to ``METHODS``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from . import bottleneck, ia3, lora, p_tuning, prefix_tuning, prompt_tuning
from .options import MethodCli


@dataclass(frozen=True)
class Method:
    """How the wrapper meets a method: build its config, attach it to a model.

    ``kind`` says how: "layers" methods wrap modules (``attach`` swaps in ``AdapterLayer``s and returns their
    names); "inputs" methods change the model's inputs (``attach`` leaves the model alone and returns the
    ``prompt_learning.PromptModule`` the wrapper owns and calls in forward and generate).
    ``mergeable`` says whether the trained change folds into the base weights (``deltatune merge`` refuses the
    others before loading anything). ``cli`` is how ``deltatune train --method NAME`` offers the method (its flags
    and run defaults, declared next to its Config); None keeps it off the command line.

    The file: a "layers" method's tensors are what its layers' ``adapter_state_dict`` returns; ``state_dict_markers``
    are the parts of those keys that say "this module holds an adapter" (how ``inject_adapter_in_model(state_dict=)``
    finds the modules to adapt), and ``base_tensors_in_file(root, layers, config, adapter_name,
    save_embedding_layers)`` adds the base-model tensors the method's files carry (LoRA's biases and embeddings).
    An "inputs" method's file holds PEFT's one ``prompt_embeddings`` tensor. ``default_targets(model, config)``
    is the method's per-architecture choice of modules when ``target_modules`` is None.
    """

    config_class: type[PeftConfig]
    attach: Callable[[nn.Module, Any, str], Any]
    kind: str = "layers"
    mergeable: bool = False
    cli: MethodCli | None = None
    default_targets: Callable[[nn.Module, Any], Any] | None = None
    state_dict_markers: tuple[str, ...] = ()
    base_tensors_in_file: Callable[..., dict[str, torch.Tensor]] | None = None


METHODS: dict[str, Method] = {
    "LORA": Method(lora.LoraConfig, lora.attach, mergeable=True, cli=lora.CLI,
                   default_targets=lora.default_target_modules, state_dict_markers=(".lora_",),
                   base_tensors_in_file=lora.base_tensors_in_file),
    "BOTTLENECK": Method(bottleneck.BottleneckConfig, bottleneck.attach, cli=bottleneck.CLI,
                         default_targets=bottleneck.default_target_modules,
                         state_dict_markers=(".adapter_down.", ".adapter_up.")),
    "IA3": Method(ia3.IA3Config, ia3.attach, mergeable=True, cli=ia3.CLI, default_targets=ia3.default_target_modules,
                  state_dict_markers=(".ia3_l",)),
    "PROMPT_TUNING": Method(prompt_tuning.PromptTuningConfig, prompt_tuning.attach, kind="inputs",
                            cli=prompt_tuning.CLI),
    "P_TUNING": Method(p_tuning.PromptEncoderConfig, p_tuning.attach, kind="inputs", cli=p_tuning.CLI),
    "PREFIX_TUNING": Method(prefix_tuning.PrefixTuningConfig, prefix_tuning.attach, kind="inputs",
                            cli=prefix_tuning.CLI),
}


# PEFT's enum of method names (``PeftType.LORA == "LORA"``), made from the registry: adding a method is one line above.
PeftType = enum.Enum("PeftType", {name: name for name in METHODS}, type=str, module=__name__)


def method_for(peft_type: str | None, source: str = "config") -> Method:
    """The registered method for ``peft_type``, or an error naming the known ones."""
    key = getattr(peft_type, "value", peft_type)
    if not isinstance(key, str) or key not in METHODS:
        raise ValueError(
            f"{source}: peft_type={peft_type!r} is not a method deltatune knows; known: {sorted(METHODS)}."
        )
    return METHODS[key]


def config_from_dict(data: dict[str, Any], source: str = "config") -> PeftConfig:
    """Turn a parsed adapter_config.json into the right config dataclass."""
    return method_for(data.get("peft_type"), source).config_class.from_dict(data, source=source)
