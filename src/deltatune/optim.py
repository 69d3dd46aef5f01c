"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", section 3): train B with a
learning rate ``loraplus_lr_ratio`` times A's.

With A and B at one learning rate, the update B A learns features inefficiently when the width is large; a
larger rate for B (the paper suggests a ratio around 16) fixes that at no cost. ``create_loraplus_optimizer`` is
PEFT's function of the same name: the same four parameter groups, learning rates and weight decays.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

# Adam variants of bitsandbytes whose embedding weights PEFT keeps at 32-bit optimizer state
_EIGHT_BIT_OPTIMIZERS = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[Optimizer], lr: float, loraplus_lr_ratio: float,
                              **kwargs: Any) -> Optimizer:
    """An optimizer with LoRA+'s parameter groups, over the model's trainable parameters.

    The groups (PEFT's, in this order):

    1. A matrices and any other trainable weight of two or more dimensions: ``lr``, weight decay
       ``loraplus_weight_decay``;
    2. everything of an adapted embedding layer (its LoRA A and B): ``loraplus_lr_embedding``, same decay;
    3. B matrices and one-dimensional parameters (biases, norms, DoRA magnitudes) that take weight decay:
       ``lr * loraplus_lr_ratio``, same decay;
    4. those that take no weight decay (names containing "bias", parameters of LayerNorm modules):
       ``lr * loraplus_lr_ratio``, decay 0.

    Args:
        model: the model to train (a ``PeftModel`` with LoRA adapters); frozen parameters are left out.
        optimizer_cls: the optimizer class, e.g. ``torch.optim.AdamW``.
        lr: learning rate of A (eta_A).
        loraplus_lr_ratio: eta_B / eta_A, usually >= 1 (the paper uses 2 to 2^4).
        **kwargs: ``loraplus_weight_decay`` (default 0.0), ``loraplus_lr_embedding`` (default 1e-6); the rest goes to
            ``optimizer_cls``.

    Returns:
        ``optimizer_cls(groups, lr=lr, **kwargs)``.

    Raises:
        ValueError: a learning rate or ratio that is not a positive finite number.
    """
    for name, value in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    no_decay = _no_decay_names(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # an adapter tensor lives in a dict below its layer (<layer>.lora_embedding_A.<adapter>): two names up
        owner = name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""
        if owner and _is_lora_embedding(model.get_submodule(owner)):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(param)
        else:
            groups["A"].append(param)
    optimizer = optimizer_cls([
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ], lr=lr, **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT_OPTIMIZERS:
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def _is_lora_embedding(module: nn.Module) -> bool:
    return getattr(module, "kind", None) == "embedding" and hasattr(module, "lora_embedding_A")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that take no weight decay, by transformers' Trainer rule (which PEFT follows): a name containing
    "bias", or a parameter inside a LayerNorm."""
    norms = [f"{name}." for name, module in model.named_modules(remove_duplicate=False)
             if isinstance(module, nn.LayerNorm) and name]
    return {name for name, _ in model.named_parameters(remove_duplicate=False)
            if "bias" in name or name.startswith(tuple(norms))}
