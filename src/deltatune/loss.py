"""The causal-LM loss from hidden states, at labelled positions only and in chunks: ``causal_lm_loss``.

Why: a language model's head turns every position into ``vocab`` fp32 logits (SmolLM2: 49,152 per token), and
autograd keeps them and their softmax for backward: for a batch of 8 x 128 tokens that is ~0.4 GB, often the
largest tensors of a LoRA step, and the head's matmul is a fifth of a small model's compute. Fine-tuning on
instructions only scores the answer tokens, so here the head runs on the positions that have a label, a chunk of
them at a time, and backward recomputes each chunk's logits instead of keeping them: no (tokens x vocab) tensor
ever exists whole. The value is transformers' ``ForCausalLMLoss`` (shifted labels, ``ignore_index=-100``, mean
over labelled tokens, or sum / ``num_items_in_batch``), checked against it in tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .func_transforms import func_transform_active

IGNORE_INDEX = -100


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight^T (+ bias), targets), computed and differentiated in chunks."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # noqa: ANN001
                targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.loss_dtype = loss_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 (fp64 for fp64)
        total = hidden.new_zeros((), dtype=loss_dtype)
        cast = _autocast_weight(weight, *ctx.autocast)
        for start in range(0, hidden.shape[0], chunk_size):
            logits = F.linear(hidden[start:start + chunk_size], cast, bias).to(loss_dtype)
            total += F.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        device, enabled, dtype = ctx.autocast  # the logits again as forward computed them (bf16 under autocast)
        with torch.autocast(device, dtype, enabled=enabled):
            return _ChunkedCrossEntropy._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        hidden, weight, bias, targets = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        loss_dtype = ctx.loss_dtype
        grad_weight = torch.zeros_like(weight, dtype=loss_dtype) if needs_weight else None
        grad_bias = torch.zeros_like(bias, dtype=loss_dtype) if needs_bias and bias is not None else None
        cast = _autocast_weight(weight, *ctx.autocast)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            part = hidden[start:start + ctx.chunk_size]
            # d(sum CE)/d logits = softmax - one_hot, times the incoming gradient
            probs = torch.softmax(F.linear(part, cast, bias).to(loss_dtype), dim=-1)
            probs[torch.arange(part.shape[0], device=probs.device), targets[start:start + ctx.chunk_size]] -= 1
            probs.mul_(grad)
            d_logits = probs.to(part.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + part.shape[0]] = d_logits @ (cast if cast is not weight
                                                                      else weight.to(part.dtype))
            if grad_weight is not None:
                grad_weight.addmm_(probs.t(), part.to(loss_dtype))
            if grad_bias is not None:
                grad_bias += probs.sum(0)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _autocast_weight(weight: torch.Tensor, device: str, enabled: bool, dtype: torch.dtype) -> torch.Tensor:
    """The head's weight as autocast would cast it for each matmul, cast once: autocast keeps no copy of a frozen
    weight (its cache holds trainable leaves only), and the head is the largest matrix of a small model."""
    if enabled and weight.is_floating_point() and not weight.requires_grad:
        return weight.to(dtype)
    return weight


def causal_lm_loss(hidden_states: torch.Tensor, head: torch.nn.Module | torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: int | torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM from its last hidden states, equal to transformers' loss.

    Args:
        hidden_states: (batch, seq, hidden), what the backbone (e.g. ``model.model``) returns, after its final norm.
        head: the output layer (``model.get_output_embeddings()``, an ``nn.Linear``) or its (vocab, hidden) weight.
        labels: (batch, seq) token ids, ``-100`` where no loss is taken (prompt, padding); shifted here, as
            transformers does: position t predicts label t + 1.
        num_items_in_batch: divide the summed loss by this (Trainer's count over gradient-accumulation steps)
            instead of by the number of labelled tokens here.
        chunk_size: labelled positions per head matmul; memory holds ``chunk_size x vocab`` fp32 logits at a time.

    Returns:
        The scalar loss (fp32). With no labelled token it is 0 (transformers gives NaN), so a batch of prompts
        without answers cannot turn a run into NaN.

    Raises:
        ValueError: shapes that do not fit, or a ``chunk_size`` below 1.
    """
    weight = head if isinstance(head, torch.Tensor) else head.weight
    bias = None if isinstance(head, torch.Tensor) else getattr(head, "bias", None)
    if hidden_states.dim() != 3 or labels.shape != hidden_states.shape[:2]:
        raise ValueError(f"hidden_states must be (batch, seq, hidden) and labels (batch, seq); got "
                         f"{tuple(hidden_states.shape)} and {tuple(labels.shape)}.")
    if weight.dim() != 2 or weight.shape[1] != hidden_states.shape[-1]:
        raise ValueError(f"the head's weight must be (vocab, {hidden_states.shape[-1]}), got {tuple(weight.shape)}.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    positions = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])[keep]
    if not func_transform_active():
        total = _ChunkedCrossEntropy.apply(positions, weight, bias, targets[keep], chunk_size)
    else:  # torch.func / forward AD: the same sum from plain ops, all logits at once
        logits = F.linear(positions, weight, bias).to(torch.promote_types(positions.dtype, torch.float32))
        total = F.cross_entropy(logits, targets[keep], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count if int(count) > 0 else total


# causal LMs whose forward is exactly ``get_output_embeddings()(backbone(...).last_hidden_state)``: no logit
# soft-capping or scaling (Gemma 2, Granite and Cohere have one, so they take the model's own loss)
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "gpt2", "olmo", "olmo2",
                          "stablelm", "gemma")


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(backbone, head) of a causal LM (or a layer-adapter ``PeftModel`` around one) whose loss
    :func:`causal_lm_loss` can compute from the backbone's hidden states; None when it cannot say so safely
    (another architecture, an active prompt-learning adapter, which changes the forward, or no linear head)."""
    configs = getattr(model, "peft_config", None)
    if configs is not None:
        active = getattr(model, "active_adapters", [])
        if any(getattr(configs.get(name), "is_prompt_learning", True) for name in active):
            return None
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if backbone is None or backbone is model or type(head) is not torch.nn.Linear:
        return None
    return backbone, head
