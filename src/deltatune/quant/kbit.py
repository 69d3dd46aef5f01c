"""Get a model with quantized linear layers ready for adapter training (PEFT's function of the same name)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Freeze the model, upcast fp16/bf16 parameters to fp32, and turn on input grads and gradient checkpointing.

    What PEFT's ``prepare_model_for_kbit_training`` does, for models quantized by :mod:`deltatune.quant`:

    * every parameter gets ``requires_grad=False``; the adapter added afterwards brings its own trainable ones;
    * every fp16/bf16 *parameter* becomes fp32 (norms, biases, embeddings, the output head), which keeps layer norm
      and the loss numerically stable; the quantized weights are buffers and keep their bytes;
    * ``model.enable_input_require_grads()``, so checkpointed blocks whose inputs come from the frozen
      embedding still have something to differentiate;
    * ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, ...})``.

    Args:
        model: a transformers ``PreTrainedModel`` (any ``nn.Module`` when ``use_gradient_checkpointing=False``).
        use_gradient_checkpointing: recompute activations in backward to save memory.
        gradient_checkpointing_kwargs: passed on; ``use_reentrant`` defaults to False.

    Returns:
        ``model``, changed in place.

    Raises:
        ValueError: checkpointing is asked for on a model without ``gradient_checkpointing_enable``.
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if not use_gradient_checkpointing:
        return model
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                         "pass use_gradient_checkpointing=False")
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
