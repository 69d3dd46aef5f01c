"""Prompt learning on an encoder-decoder model (T5, BART, ...: ``task_type="SEQ_2_SEQ_LM"``), as PEFT does it.

- Prompt tuning and P-tuning: the P virtual tokens go in front of the encoder input, and the encoder attention mask
  gets P ones in front (so cross-attention sees them too). The decoder, its mask and the labels are untouched. The
  adapter holds 2P rows (PEFT's ``num_transformer_submodules=2``); only the first P are used.
- Prefix tuning: the prefixes go into the decoder's self-attention cache, and a decoder attention mask gets P ones.
  The encoder and the cross-attention see no prefix: PEFT (0.21 with transformers >= 4.56) builds an
  ``EncoderDecoderCache`` whose cross-attention part is empty, so its cross-attention prefixes are dropped.

PEFT's layout of the flat prefix (P, L*2*token_dim) for two submodules: viewed as (P, 2L, H, D), the 2L entries are
repeated once (4L entries) and cut into L groups of four (self key, self value, cross key, cross value). So layer i's
self-attention key and value are entries 4i and 4i+1 taken modulo 2L: with L = 2, both layers get entries 0 and 1,
and entries 2 and 3 are used by no layer. deltatune builds the same cache, so PEFT's adapters give the same outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .prompt_learning import (
    PromptLearningConfig,
    PromptModule,
    cached_length,
    encoder_prompt,
    extend_mask,
    pass_cache,
    pop_cache,
    prefix_key_values,
    word_embeddings,
)

# Where the batch size can be read from, decoder side first (generate's calls carry only decoder inputs).
BATCH_SOURCES = ("decoder_input_ids", "decoder_inputs_embeds", "labels", "input_ids", "inputs_embeds")


def seq2seq_prefix_cache(module: PromptModule, config: PromptLearningConfig, model: nn.Module, batch: int,
                         into: Any = None) -> Any:
    """The prefixes as an ``EncoderDecoderCache`` whose self-attention part holds them (PEFT's layout, see the module
    docstring) and whose cross-attention part is empty; ``into``, an empty cache ``generate`` made, is filled in
    place instead."""
    from transformers import DynamicCache, EncoderDecoderCache

    kv = prefix_key_values(module, config, model, batch)  # (2L, B, H, P, D)
    entries = kv.shape[0]
    cache = into if into is not None else EncoderDecoderCache(DynamicCache(), DynamicCache())
    for layer in range(config.num_layers):
        key, value = kv[(4 * layer) % entries], kv[(4 * layer + 1) % entries]
        cache.self_attention_cache.update(key.contiguous(), value.contiguous(), layer)
    return cache


def seq2seq_inputs(kwargs: dict[str, Any], module: PromptModule, config: PromptLearningConfig,
                   model: nn.Module) -> dict[str, Any]:
    """One forward call's keyword arguments for an encoder-decoder model, changed so that it sees the virtual tokens.

    Prompt tuning / P-tuning: ``inputs_embeds = [P_e; X_e]`` for the encoder and its mask extended. With
    ``encoder_outputs`` given the encoder does not run: they are taken to hold the virtual tokens already (they came
    from this model, e.g. a decoding loop reusing ``output.encoder_last_hidden_state``) and only the mask is extended,
    as in PEFT. Prefix tuning: the decoder's self-attention cache starts with the prefixes (unless the cache passed
    in holds them already, i.e. a later decoding step), ``decoder_attention_mask`` gets P ones.

    Raises:
        ValueError: no inputs to read the batch size from, a mask that is not 2D, a model without a KV cache.
    """
    kwargs = dict(kwargs)
    n = config.num_virtual_tokens
    if module.kind == "embeddings":
        if kwargs.get("encoder_outputs") is None:
            if kwargs.get("input_ids") is None and kwargs.get("inputs_embeds") is None:
                raise ValueError(f"{config.peft_type} needs input_ids or inputs_embeds (the encoder input) to put the "
                                 "virtual tokens in front of.")
            ids = kwargs.pop("input_ids", None)
            embeds = kwargs.get("inputs_embeds")
            embeds = word_embeddings(model)(ids) if embeds is None else embeds
            kwargs["inputs_embeds"] = torch.cat((encoder_prompt(module, config, embeds), embeds), dim=1)
        extend_mask(kwargs, n)
        return kwargs
    cache = pop_cache(kwargs)
    rows = next((kwargs[k] for k in BATCH_SOURCES if kwargs.get(k) is not None), None)
    if rows is None:
        raise ValueError(f"{config.peft_type} needs decoder_input_ids, labels or input_ids to size the prefixes by.")
    if cache is not None and kwargs.get("use_cache") is False:  # generate(use_cache=False) hands back its cache
        cache = None
    if cache is None or cached_length(cache) == 0:
        into = cache if hasattr(cache, "self_attention_cache") else None
        cache = seq2seq_prefix_cache(module, config, model, rows.shape[0], into=into)
    decoder_mask = {"attention_mask": kwargs.get("decoder_attention_mask")}
    extend_mask(decoder_mask, n)
    if decoder_mask["attention_mask"] is not None:
        kwargs["decoder_attention_mask"] = decoder_mask["attention_mask"]
    pass_cache(kwargs, model, cache, config)
    return kwargs


def seq2seq_generate_inputs(kwargs: dict[str, Any], module: PromptModule, config: PromptLearningConfig,
                            model: nn.Module) -> dict[str, Any]:
    """``generate``'s keyword arguments for prompt tuning / P-tuning: the encoder input with the virtual tokens, as
    ``inputs_embeds``, and its mask extended (PEFT's way); generate runs the encoder once and every decoding step
    attends to its output, virtual tokens included.

    Raises:
        ValueError: ``encoder_outputs`` given (the encoder must see the virtual tokens), or no input_ids.
    """
    kwargs = dict(kwargs)
    if kwargs.get("encoder_outputs") is not None:
        raise ValueError(f"generate(encoder_outputs=...) does not work with {config.peft_type}: the encoder must run "
                         "on the virtual tokens and the input, so pass input_ids (and attention_mask) instead.")
    ids = kwargs.pop("inputs", None)
    ids = kwargs.pop("input_ids", None) if ids is None else ids
    if ids is None and kwargs.get("inputs_embeds") is None:
        raise ValueError(f"generate with {config.peft_type} needs input_ids, the encoder input.")
    if ids is not None:
        kwargs["input_ids"] = ids
    return seq2seq_inputs(kwargs, module, config, model)


__all__ = ["seq2seq_generate_inputs", "seq2seq_inputs", "seq2seq_prefix_cache"]
