"""Get a model with quantized linear layers ready for adapter training (PEFT's function of the same name).

Works on models quantized by :mod:`deltatune.quant` and on models transformers loaded through bitsandbytes
(``BitsAndBytesConfig(load_in_4bit=True)`` / ``load_in_8bit=True``), and changes exactly what PEFT's
``prepare_model_for_kbit_training`` changes, so a training run started from either library takes the same steps.
bitsandbytes is never imported here: its weights are recognised by class name, as PEFT does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..targets import is_quantized  # deltatune's Linear4bit / Linear8bit: codes held as buffers

# quantization_method values for which PEFT leaves every parameter's dtype alone (their kernels want them as is)
KEEP_DTYPE_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")
# bitsandbytes' parameter classes that hold codes, not weights
BNB_4BIT_PARAM = "Params4bit"
BNB_8BIT_PARAM = "Int8Params"


def is_bnb_4bit_param(param: torch.Tensor) -> bool:
    """A bitsandbytes ``Params4bit``: two 4-bit codes per byte, stored in any dtype (``bnb_4bit_quant_storage``)."""
    return type(param).__name__ == BNB_4BIT_PARAM


def is_bnb_quantized_param(param: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit or 8-bit weight: its elements are codes, not the weights they stand for."""
    return type(param).__name__ in (BNB_4BIT_PARAM, BNB_8BIT_PARAM)


def peft_param_count(param: torch.Tensor) -> int:
    """How many parameters PEFT's ``get_nb_trainable_parameters`` counts for ``param``.

    A ``Params4bit`` packs two weights per byte whatever dtype stores the bytes, so PEFT counts
    ``numel * 2 * itemsize`` (for ``uint8`` storage: ``in_features * out_features``, rounded up to even);
    every other tensor, an 8-bit ``Int8Params`` included (one weight per int8), counts ``numel``.
    """
    if is_bnb_4bit_param(param):
        return param.numel() * 2 * param.element_size()
    return param.numel()


def quantized_param_count(model: nn.Module) -> int:
    """How many parameters the quantized (code-holding) weights of ``model`` stand for.

    Why: deltatune's own quantized layers keep their codes in buffers, which ``model.parameters()`` never shows,
    and a bitsandbytes ``Params4bit`` shows half as many elements as it holds weights. Counted here, each layer
    gives what PEFT's count gives for the same architecture loaded through bitsandbytes:

    * a deltatune Linear4bit / Linear8bit: ``in_features * out_features``;
    * a bitsandbytes ``Params4bit``: ``numel * 2 * itemsize`` (PEFT's rule, see :func:`peft_param_count`);
    * a bitsandbytes ``Int8Params``: ``numel`` (= ``in_features * out_features``).

    A parameter count as PEFT's is then ``quantized_param_count(model)`` plus ``numel`` of every parameter
    for which :func:`is_bnb_quantized_param` is False.
    """
    own = sum(m.in_features * m.out_features for m in model.modules() if is_quantized(m))
    return own + sum(peft_param_count(p) for p in model.parameters() if is_bnb_quantized_param(p))


def is_quantized_model(model: nn.Module) -> bool:
    """Whether PEFT would treat ``model`` as quantized (and so turn on checkpointing for it).

    Yes for transformers' flags (``is_loaded_in_4bit`` / ``is_loaded_in_8bit``, or a ``quantization_method`` PEFT
    knows), and for a model holding deltatune's quantized layers or bitsandbytes weights, whichever way it was made.
    """
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    if getattr(model, "quantization_method", None) in KEEP_DTYPE_METHODS or getattr(model, "hqq_quantized", False):
        return True
    return any(is_quantized(m) for m in model.modules()) or any(
        is_bnb_quantized_param(p) for p in model.parameters())


def _keeps_dtypes(model: nn.Module) -> bool:
    """GPTQ, AQLM, EETQ, HQQ and torchao models: PEFT leaves their parameter dtypes as they are."""
    return getattr(model, "quantization_method", None) in KEEP_DTYPE_METHODS or getattr(model, "hqq_quantized", False)


def _empty_accelerator_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        xpu.empty_cache()


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """Freeze the model, upcast fp16/bf16 parameters to fp32, and turn on input grads and gradient checkpointing.

    What PEFT's ``prepare_model_for_kbit_training`` does, for models quantized by :mod:`deltatune.quant` or loaded
    through bitsandbytes:

    * every parameter gets ``requires_grad=False``; the adapter added afterwards brings its own trainable ones;
    * every fp16/bf16 *parameter* becomes fp32 (norms, biases, embeddings, the output head), which keeps layer norm
      and the loss numerically stable. Quantized weights keep their bytes: deltatune's are buffers, a bitsandbytes
      ``Params4bit`` is skipped by class (with ``bnb_4bit_quant_storage=torch.bfloat16`` its bytes *are* bf16, and
      casting them would destroy the codes), an ``Int8Params`` is int8. GPTQ/AQLM/EETQ/HQQ/torchao models keep
      every dtype, as in PEFT;
    * on a quantized model only (see :func:`is_quantized_model`; PEFT leaves a float model's checkpointing alone):
      ``model.enable_input_require_grads()``, so checkpointed blocks whose inputs come from the frozen
      embedding still have something to differentiate, and
      ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, ...})``.
      deltatune defaults ``use_reentrant`` to False (PEFT leaves it to transformers); it changes memory and
      speed, not the gradients.

    Args:
        model: a transformers ``PreTrainedModel`` (any ``nn.Module`` when ``use_gradient_checkpointing=False``).
        use_gradient_checkpointing: recompute activations in backward to save memory.
        gradient_checkpointing_kwargs: passed on; ``use_reentrant`` defaults to False.
        auto_clear_cache: after the casts, give the accelerator's cached blocks back (``torch.cuda.empty_cache()``
            / ``torch.xpu.empty_cache()`` where present), as PEFT does: the fp16 copies just freed would otherwise
            stay reserved, which hurts where host and accelerator share memory.

    Returns:
        ``model``, changed in place.

    Raises:
        ValueError: checkpointing is asked for on a quantized model without ``gradient_checkpointing_enable``.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if not _keeps_dtypes(model):
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and not is_bnb_4bit_param(param):
                param.data = param.data.float()
        if auto_clear_cache:
            _empty_accelerator_cache()
    if not use_gradient_checkpointing or not is_quantized_model(model):
        return model
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                         "pass use_gradient_checkpointing=False")
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
