"""How each task type runs with a prompt-learning adapter: the forward and generate calls ``PeftModel`` makes.

- CAUSAL_LM, SEQ_CLS: ``prompt_learning.prompt_inputs`` (virtual tokens in front, or prefixes as the KV cache).
- SEQ_2_SEQ_LM: ``prompt_learning_seq2seq`` (encoder input, or the decoder's self-attention cache).
- TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION with prompt tuning / P-tuning: as PEFT, the model runs on
  [virtual tokens; input]; unlike PEFT, the per-token outputs are for the real tokens only. PEFT 0.21 returns
  (B, P + n, ...) for them: its token-classification labels (B, n) then fail with a batch-size mismatch, and its span
  positions are not moved by P, so the QA loss is computed against the wrong tokens. Here ``logits``,
  ``start_logits``, ``end_logits``, ``last_hidden_state`` and each ``hidden_states`` entry lose the P virtual-token
  positions (they equal PEFT's ``[:, P:]``); labels and span positions index the real tokens. ``attentions`` and
  ``pooler_output`` (BERT pools the first position, a virtual token) are PEFT's. Prefix tuning adds no positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .config import TaskType
from .prompt_learning import PromptLearningConfig, PromptModule, generation_hook, prompt_inputs
from .prompt_learning_seq2seq import seq2seq_generate_inputs, seq2seq_inputs

# Tasks whose outputs have one position per input token: the virtual-token positions are cut off.
PER_TOKEN_TASKS = (TaskType.TOKEN_CLS.value, TaskType.QUESTION_ANS.value, TaskType.FEATURE_EXTRACTION.value)
PER_TOKEN_OUTPUTS = ("logits", "start_logits", "end_logits", "last_hidden_state")


def prompted_forward(call: Callable[..., Any], kwargs: dict[str, Any], module: PromptModule,
                     config: PromptLearningConfig, model: nn.Module) -> Any:
    """``call`` (the model's forward) with the virtual tokens or prefixes put in, for ``config.task_type``.

    Raises:
        ValueError: inputs the task cannot take (see ``prompt_inputs``, ``seq2seq_inputs``), labels that are not
            one per input token (TOKEN_CLS).
    """
    task = config.task_type
    if task == TaskType.SEQ_2_SEQ_LM.value:
        return call(**seq2seq_inputs(kwargs, module, config, model))
    if module.kind == "embeddings" and task in PER_TOKEN_TASKS:
        return _real_token_forward(call, kwargs, module, config, model)
    return call(**prompt_inputs(kwargs, module, config, model))


def prompted_generate(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], module: PromptModule,
                      config: PromptLearningConfig) -> Any:
    """``model.generate`` with the virtual tokens or prefixes seen by every forward call it makes.

    Decoder-only models and prefix tuning on encoder-decoder models: a hook rewrites each call (with and without the
    KV cache, any padding, any number of beams). Prompt tuning / P-tuning on an encoder-decoder model: the encoder
    input is rewritten once, since generate runs the encoder once.
    """
    if config.task_type == TaskType.SEQ_2_SEQ_LM.value and module.kind == "embeddings":
        if args:  # generate's first positional argument is ``inputs``
            kwargs = {"inputs": args[0], **kwargs}
            args = args[1:]
        return model.generate(*args, **seq2seq_generate_inputs(kwargs, module, config, model))
    rewrite = seq2seq_inputs if config.task_type == TaskType.SEQ_2_SEQ_LM.value else prompt_inputs
    with generation_hook(model, lambda call_kwargs: rewrite(call_kwargs, module, config, model)):
        return model.generate(*args, **kwargs)


def _real_token_forward(call: Callable[..., Any], kwargs: dict[str, Any], module: PromptModule,
                        config: PromptLearningConfig, model: nn.Module) -> Any:
    """Forward on [virtual tokens; input], per-token outputs cut to the input's n positions; a QA loss from the cut
    span logits (the virtual tokens are no candidate positions)."""
    kwargs = dict(kwargs)
    rows = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if rows is None:
        raise ValueError(f"{config.peft_type} needs input_ids or inputs_embeds to put the virtual tokens in front of.")
    length, n = rows.shape[1], config.num_virtual_tokens
    labels = kwargs.get("labels")
    if config.task_type == TaskType.TOKEN_CLS.value and labels is not None and labels.shape[-1] != length:
        raise ValueError(f"labels have {labels.shape[-1]} entries per row and the input has {length} tokens: give one "
                         f"label per input token (-100 for none); the {n} virtual tokens get -100 here.")
    spans = {key: kwargs.pop(key, None) for key in ("start_positions", "end_positions")}
    as_tuple = kwargs.get("return_dict") is False
    if as_tuple:
        kwargs["return_dict"] = True  # cut by name, hand back a tuple at the end
    out = call(**prompt_inputs(kwargs, module, config, model))
    if isinstance(out, torch.Tensor):
        return out[:, n:] if out.dim() >= 2 and out.shape[1] == n + length else out
    if not isinstance(out, Mapping):
        raise ValueError(f"{type(model).__name__} returned {type(out).__name__}; deltatune cuts the virtual tokens "
                         "from per-token outputs by name and needs a transformers ModelOutput (return_dict=True).")
    values = {key: _cut(key, value, n, n + length) for key, value in out.items()}
    if spans["start_positions"] is not None and spans["end_positions"] is not None:
        values["loss"] = span_loss(values["start_logits"], values["end_logits"], **spans)
    out = type(out)(**values)
    return out.to_tuple() if as_tuple else out


def _cut(key: str, value: Any, n: int, total: int) -> Any:
    if key == "hidden_states" and isinstance(value, tuple):
        return tuple(_cut("last_hidden_state", v, n, total) for v in value)
    if key in PER_TOKEN_OUTPUTS and isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == total:
        return value[:, n:]
    return value


def span_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
              end_positions: torch.Tensor) -> torch.Tensor:
    """Extractive QA loss, as transformers' ``*ForQuestionAnswering`` computes it: the mean of the start and end
    cross-entropies over the n positions; a position outside 0..n-1 is clamped to n and ignored."""
    ignored = start_logits.shape[1]
    loss = nn.CrossEntropyLoss(ignore_index=ignored)
    start = (start_positions.squeeze(-1) if start_positions.dim() > 1 else start_positions).clamp(0, ignored)
    end = (end_positions.squeeze(-1) if end_positions.dim() > 1 else end_positions).clamp(0, ignored)
    return (loss(start_logits, start) + loss(end_logits, end)) / 2


__all__ = ["prompted_forward", "prompted_generate", "span_loss"]
