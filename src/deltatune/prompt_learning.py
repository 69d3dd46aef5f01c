"""The input-hook protocol: how prompt-learning methods (prompt, P-, prefix tuning) meet the wrapper.

Layer-wrapping methods change weights (``adapter_layer.py``); these leave every weight alone and change what
goes in. Each builds one small module, a ``PromptModule``, that the ``PeftModel`` owns as
``prompt_encoder[adapter_name]`` (PEFT's attribute name, so parameter names match PEFT's). It yields either

- ``kind == "embeddings"`` (prompt tuning, P-tuning): P virtual-token embeddings, shape (P, token_dim),
  prepended to the input embeddings; or
- ``kind == "prefix"`` (prefix tuning): a key and a value prefix for every layer, flat as
  (P, num_layers * 2 * token_dim), passed to the model as a pre-filled KV cache.

``prompt_inputs`` rewrites one forward call's keyword arguments; ``generation_hook`` applies it to every forward
call ``generate`` makes. One rule covers both: the model sees P extra tokens before the real ones. The attention
mask gets P ones in front, position ids move up by P (the virtual tokens hold positions 0..P-1), and for a causal
LM or token classifier with prepended embeddings the labels get P times -100. A call that continues a KV cache
already holding the virtual tokens (every generation step after the first) only gets the longer mask and the shifted
positions. Encoder-decoder models are rewritten in ``prompt_learning_seq2seq.py``; how each task runs (forward,
generate, per-token outputs cut to the real tokens) is ``prompt_learning_tasks.py``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from .config import PeftConfig, TaskType

PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"  # the one tensor PEFT writes for a prompt-learning adapter
SUPPORTED_TASKS = tuple(t.value for t in (TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.SEQ_2_SEQ_LM,
                                           TaskType.TOKEN_CLS, TaskType.QUESTION_ANS, TaskType.FEATURE_EXTRACTION))
# The head a task's model must have (PEFT's classifier_module_names / qa_module_names): (what, names, auto class).
TASK_HEADS = {
    TaskType.SEQ_CLS.value: ("a classification head", ("classifier", "score"), "AutoModelForSequenceClassification"),
    TaskType.TOKEN_CLS.value: ("a classification head", ("classifier", "score"), "AutoModelForTokenClassification"),
    TaskType.QUESTION_ANS.value: ("a span head", ("qa_outputs",), "AutoModelForQuestionAnswering"),
}
# Tasks whose labels have one entry per input token: the virtual tokens get -100 (no loss).
PER_TOKEN_LABELS = (TaskType.CAUSAL_LM.value, TaskType.TOKEN_CLS.value)
# Tasks for which PEFT drops token_type_ids with prompt learning.
NO_TOKEN_TYPES = (TaskType.CAUSAL_LM.value, TaskType.FEATURE_EXTRACTION.value)
# Model config attributes that give the context length, in the order they are looked up.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Settings every prompt-learning method shares; names and defaults are PEFT's ``PromptLearningConfig``.

    Attributes:
        num_virtual_tokens: P, the number of virtual tokens (required).
        token_dim: the width of one virtual token; filled in from the model (its hidden size; for prefix
            tuning on a grouped-query model, num_key_value_heads * head_dim, as PEFT does).
        num_transformer_submodules: 1 for decoder-only and encoder models (filled in).
        num_attention_heads: heads of one prefix (filled in; prefix tuning uses the key/value heads).
        num_layers: transformer blocks of the model (filled in).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def validate(self) -> None:
        """num_virtual_tokens a positive int; the model dimensions None (filled in on attach) or positive ints.

        Raises:
            ValueError: naming the field and the value.
        """
        super().validate()
        if not _positive_int(self.num_virtual_tokens):
            raise ValueError(f"num_virtual_tokens={self.num_virtual_tokens!r} must be a positive int, the number of "
                             "virtual tokens, e.g. num_virtual_tokens=20.")
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ValueError(f"{name}={value!r} must be a positive int, or None to take it from the model.")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@runtime_checkable
class PromptModule(Protocol):
    """What a prompt-learning method's module offers the wrapper.

    Attributes:
        kind: "embeddings" (virtual tokens prepended to the input) or "prefix" (key/value prefixes as KV cache).
        num_virtual_tokens: P.
        reparameterized: True while the prompt is computed by a network (P-tuning's MLP/LSTM, prefix tuning's
            projection) rather than held as a plain tensor.
    """

    kind: ClassVar[str]
    num_virtual_tokens: int
    reparameterized: bool

    def prompt(self) -> torch.Tensor:
        """The prompt, differentiable: (P, token_dim) or (P, num_layers * 2 * token_dim); the parameter itself
        when not reparameterized."""
        ...

    def load_prompt_embeddings(self, value: torch.Tensor) -> None:
        """Hold ``value`` (a saved ``prompt_embeddings``) as the plain prompt, dropping any reparameterization."""
        ...


def prompt_embeddings(module: PromptModule) -> torch.Tensor:
    """The tensor saved as ``prompt_embeddings``: the live parameter, or the reparameterization's output folded
    into a plain tensor (computed without dropout; Li & Liang 2021, section 4.3: after training only the prefix
    is kept)."""
    if not module.reparameterized:
        return module.prompt()
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return module.prompt().detach()
    finally:
        module.train(was_training)


# ---- attaching: checks and the dimensions taken from the model -----------------------------------


def word_embeddings(model: nn.Module) -> nn.Module:
    """The model's input token embeddings (PEFT's ``word_embeddings``).

    Raises:
        ValueError: the model has none that deltatune can find.
    """
    getter = getattr(model, "get_input_embeddings", None)
    module = getter() if callable(getter) else None
    if not isinstance(module, nn.Module) or not hasattr(module, "weight"):
        raise ValueError(f"{type(model).__name__} has no input embeddings (get_input_embeddings()); prompt learning "
                         "prepends virtual tokens to them.")
    return module


def check_model(model: nn.Module, config: PromptLearningConfig) -> None:
    """The model can take this prompt-learning adapter: a task type it has, room for the virtual tokens.

    Raises:
        ValueError: naming the value at fault; nothing has been changed.
    """
    method, task = config.peft_type, config.task_type
    if task is None:
        raise ValueError(f"{method} needs task_type, one of {list(SUPPORTED_TASKS)}: it decides how the inputs, "
                         "labels and generation are changed (e.g. task_type='CAUSAL_LM').")
    if task not in SUPPORTED_TASKS:
        raise ValueError(f"task_type={task!r} is not supported with {method} yet; deltatune supports prompt "
                         f"learning for {list(SUPPORTED_TASKS)}.")
    _check_task_head(model, task)
    name, context = type(model).__name__, context_length(model)
    if context is not None and config.num_virtual_tokens > context - 1:
        raise ValueError(f"num_virtual_tokens={config.num_virtual_tokens} does not fit: {name} takes {context} "
                         f"positions, and at least one must be left for the input, so at most {context - 1} "
                         "virtual tokens.")


def _check_task_head(model: nn.Module, task: str) -> None:
    """The model has what ``task`` uses: an LM head (and an encoder-decoder for SEQ_2_SEQ_LM, a decoder-only model
    for CAUSAL_LM), or the classification / span head."""
    name = type(model).__name__
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if task in (TaskType.CAUSAL_LM.value, TaskType.SEQ_2_SEQ_LM.value) and _output_embeddings(model) is None:
        auto = "AutoModelForCausalLM" if task == TaskType.CAUSAL_LM.value else "AutoModelForSeq2SeqLM"
        raise ValueError(f"task_type={task!r} needs a language model head, and {name} has none "
                         f"(get_output_embeddings() is None); load the model with {auto}.")
    if task == TaskType.CAUSAL_LM.value and encoder_decoder:
        raise ValueError(f"task_type='CAUSAL_LM' is for decoder-only models, and {name} is an encoder-decoder model; "
                         "use task_type='SEQ_2_SEQ_LM'.")
    if task == TaskType.SEQ_2_SEQ_LM.value and not encoder_decoder:
        raise ValueError(f"task_type='SEQ_2_SEQ_LM' needs an encoder-decoder model (T5, BART, ...), and {name} is "
                         "not one (config.is_encoder_decoder is False); use task_type='CAUSAL_LM' for a decoder-only "
                         "model.")
    if task not in TASK_HEADS:
        return
    what, heads, auto = TASK_HEADS[task]
    if not any(n.rpartition(".")[2] in heads for n, _ in model.named_modules()):
        raise ValueError(f"task_type={task!r} needs {what} ({' or '.join(map(repr, heads))}), and {name} has none; "
                         f"load the model with {auto}.")


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def context_length(model: nn.Module) -> int | None:
    """The model's context (positions), from its config, or None when the config does not say."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    for key in CONTEXT_KEYS:
        value = getattr(text, key, None)
        if _positive_int(value):
            return value
    return None


def virtual_token_embeddings(model: nn.Module, config: PromptLearningConfig) -> nn.Module:
    """Checks for the methods that prepend virtual tokens (prompt tuning, P-tuning), and the model's word
    embeddings they are made like: validate the config, check the model, fill in its dimensions.

    Raises:
        ValueError: a task type the model lacks, too many virtual tokens, a token_dim that is not the model's.
    """
    config.validate()
    check_model(model, config)
    embeddings = word_embeddings(model)
    width = embeddings.weight.shape[1]
    if config.token_dim not in (None, width):
        raise ValueError(f"token_dim={config.token_dim} does not match the model's embedding width {width}.")
    fill_model_dims(model, config)
    return embeddings


def fill_model_dims(model: nn.Module, config: PromptLearningConfig, kv_heads: bool = False) -> None:
    """Fill num_layers, token_dim, num_attention_heads (and encoder_hidden_size) from the model config, as PEFT's
    ``_prepare_prompt_learning_config`` does; values the config holds already are kept.

    Args:
        kv_heads: prefix tuning: on a grouped-query model token_dim is num_key_value_heads * head_dim and the
            prefix has num_key_value_heads heads.

    Raises:
        ValueError: a dimension the model config does not give (set it in the config).
    """
    model_config = getattr(model, "config", None)
    text = model_config.get_text_config() if callable(getattr(model_config, "get_text_config", None)) else model_config
    values = text.to_dict() if callable(getattr(text, "to_dict", None)) else dict(vars(text or object()))
    if config.num_layers is None:
        config.num_layers = _first(text, values, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers")
    if config.token_dim is None:
        config.token_dim = _first(text, values, ("hidden_size", "n_embd", "d_model"), "token_dim")
        if config.num_attention_heads is None:
            config.num_attention_heads = _first(text, values, ("num_attention_heads", "n_head", "num_heads",
                                                               "encoder_attention_heads"), "num_attention_heads")
        if kv_heads and values.get("num_key_value_heads"):
            head_dim = values.get("head_dim") or config.token_dim // config.num_attention_heads
            config.token_dim = head_dim * values["num_key_value_heads"]
            config.num_attention_heads = values["num_key_value_heads"]
    if config.num_attention_heads is None:
        config.num_attention_heads = _first(text, values, ("num_attention_heads", "n_head", "num_heads"),
                                            "num_attention_heads")
    if config.num_transformer_submodules is None:  # PEFT: an encoder-decoder model's prompt has rows for both
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM.value else 1
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim


def _first(text: Any, values: dict[str, Any], keys: tuple[str, ...], field: str) -> int:
    for key in keys:
        value = getattr(text, key, None) if key == "num_hidden_layers" else values.get(key)
        if _positive_int(value):
            return value
    raise ValueError(f"The model config gives none of {list(keys)}; set {field} in the prompt-learning config.")


def check_combination(existing: list[PeftConfig], new: PeftConfig) -> None:
    """PEFT's rule for adapters on one model: one method; so prompt learning never shares a model with a layer
    method (several adapters of one prompt-learning method are fine, one active at a time).

    Raises:
        ValueError: naming the methods present and the new one.
    """
    if not existing:
        return
    types = {c.peft_type for c in existing}
    prompt = {c.is_prompt_learning for c in existing} | {new.is_prompt_learning}
    if True in prompt and (len(prompt) > 1 or types != {new.peft_type}):
        raise ValueError(f"Prompt-learning adapters cannot share a model with adapters of another method: this model "
                         f"has {sorted(types)}, the new one is {new.peft_type!r} (PEFT refuses this too). Use another "
                         "copy of the base model for it.")
    if types != {new.peft_type}:
        raise ValueError(f"Cannot combine adapters with different peft types: this model has {sorted(types)}, the new "
                         f"one is {new.peft_type!r}. Use another copy of the base model for it.")


def refuse_merge(configs: dict[str, PeftConfig], names: list[str]) -> None:
    """Prompt learning changes the inputs, not a weight: there is nothing to fold into the base model.

    Raises:
        ValueError: when any of ``names`` is a prompt-learning adapter (before anything is merged).
    """
    prompt = [n for n in names if n in configs and configs[n].is_prompt_learning]
    if prompt:
        kinds = ", ".join(sorted({configs[n].peft_type for n in prompt}))
        raise ValueError(f"Adapter {prompt} ({kinds}) cannot be merged: prompt learning adds virtual tokens or "
                         "key/value prefixes to the inputs and changes no weight that could absorb them. Keep the "
                         "PeftModel for inference (save_pretrained / from_pretrained); nothing was changed.")


# ---- running: one forward call's inputs -------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _cache_argument_of(model_class: type) -> str | None:
    params = inspect.signature(model_class.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)  # transformers 5: "cache"


def cache_argument(model: nn.Module) -> str | None:
    """The keyword under which ``model`` takes a KV cache: "cache" (transformers >= 5.x), "past_key_values", or None.

    A task model that passes ``**kwargs`` on to its backbone (BertForSequenceClassification) is asked through
    the backbone (``model.base_model``).
    """
    name = _cache_argument_of(type(model))
    if name is None:
        backbone = getattr(model, "base_model", None)
        if isinstance(backbone, nn.Module) and backbone is not model:
            takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD
                               for p in inspect.signature(model.forward).parameters.values())
            name = _cache_argument_of(type(backbone)) if takes_kwargs else None
    return name


def cached_length(cache: Any) -> int:
    """Positions a KV cache holds (a transformers ``Cache`` or the legacy tuple of (key, value) per layer)."""
    if isinstance(cache, (tuple, list)):
        return cache[0][0].shape[-2] if cache and cache[0] is not None else 0
    return int(cache.get_seq_length())


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def prefix_key_values(module: PromptModule, config: PromptLearningConfig, model: nn.Module,
                      batch: int) -> torch.Tensor:
    """The prefixes as (2L, B, H, P, D), PEFT's layout: the flat prompt (P, L*2*token_dim) viewed as (P, 2L, H, D);
    entry 2i is layer i's key, 2i+1 its value (for a decoder-only or encoder model)."""
    flat = module.prompt().to(_model_dtype(model))
    heads, layers = config.num_attention_heads, config.num_layers
    kv = flat.view(config.num_virtual_tokens, 2 * layers, heads, config.token_dim // heads)
    return kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, H, P, D)


def prefix_cache(module: PromptModule, config: PromptLearningConfig, model: nn.Module, batch: int,
                 into: Any = None) -> Any:
    """The prefixes as a KV cache (a transformers ``DynamicCache``, or ``into`` filled in place when it is an
    empty cache that ``generate`` made).

    Li & Liang 2021, section 4: the activations of the prefix positions are free parameters P_theta; at every
    layer the real tokens attend to them as to keys and values of earlier tokens.
    """
    from transformers import DynamicCache

    kv = prefix_key_values(module, config, model, batch)
    cache = into if into is not None else DynamicCache(config=getattr(model, "config", None))
    for layer in range(config.num_layers):
        cache.update(kv[2 * layer].contiguous(), kv[2 * layer + 1].contiguous(), layer)
    return cache


def _refuse_checkpointed_prefix(model: nn.Module) -> None:
    """Training prefixes through gradient-checkpointed layers fails deep in attention (transformers drops the KV
    cache, which holds the prefixes, inside checkpointed layers; PEFT fails the same way): say so plainly."""
    if model.training and torch.is_grad_enabled() and getattr(model, "is_gradient_checkpointing", False):
        raise ValueError("Prefix tuning cannot train with gradient checkpointing on: its key/value prefixes reach the "
                         "model as a KV cache, which transformers drops in checkpointed layers. Turn it off "
                         "(model.gradient_checkpointing_disable(), or gradient_checkpointing=False / "
                         "activation_checkpointing=False in the trainer's arguments), or use prompt tuning or "
                         "P-tuning.")


def prompt_inputs(kwargs: dict[str, Any], module: PromptModule, config: PromptLearningConfig,
                  model: nn.Module) -> dict[str, Any]:
    """One forward call's keyword arguments, changed so that ``model`` sees the virtual tokens.

    For a decoder-only or encoder model (encoder-decoder models: ``prompt_learning_seq2seq.seq2seq_inputs``).
    Prompt tuning and P-tuning: ``inputs_embeds = [P_e; X_e]`` (Lester et al. 2021, section 2), the mask and
    positions extended (and labels, for a causal LM or token classifier); prefix tuning: the prefixes go in as the
    KV cache, the mask is extended and positions move up by P (as PEFT offsets them). A call whose cache holds the
    virtual tokens already (a later generation step) only gets the mask and positions.

    Raises:
        ValueError: no input_ids nor inputs_embeds, a mask that is not 2D, or (prefix) a model without a KV cache.
    """
    kwargs = dict(kwargs)
    cache = pop_cache(kwargs)
    rows = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if rows is None:
        raise ValueError(f"{config.peft_type} needs input_ids or inputs_embeds to put the virtual tokens in front of.")
    batch, n = rows.shape[0], config.num_virtual_tokens
    fresh_only = kwargs.get("use_cache") is False  # generate(use_cache=False) hands back the cache it got: ignore it
    continuing = cache is not None and not fresh_only and cached_length(cache) > 0
    if cache is not None and fresh_only:
        cache = None
    extend_mask(kwargs, n)
    prepend = module.kind == "embeddings" and not continuing
    _shift_positions(kwargs, n, prepend)
    if module.kind == "prefix" and not continuing:
        _refuse_checkpointed_prefix(model)
        cache = prefix_cache(module, config, model, batch, into=cache if hasattr(cache, "update") else None)
    elif prepend:
        _prepend_prompt(kwargs, module, model, config)
    if module.kind == "prefix" and config.task_type in NO_TOKEN_TYPES:
        _drop_token_type_ids(kwargs, config.task_type)
    if cache is not None:
        pass_cache(kwargs, model, cache, config)
    return kwargs


def pass_cache(kwargs: dict[str, Any], model: nn.Module, cache: Any, config: PromptLearningConfig) -> None:
    """Put ``cache`` in ``kwargs`` under the keyword ``model`` takes it by, or say that the model takes none."""
    name = cache_argument(model)
    if name is None:
        raise ValueError(f"{type(model).__name__}.forward takes no KV cache ('cache' or 'past_key_values'), "
                         f"which {config.peft_type} needs.")
    kwargs[name] = cache


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Take the KV cache out of ``kwargs``, under either name ("cache", or "past_key_values" before transformers 5)."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def extend_mask(kwargs: dict[str, Any], n: int) -> None:
    """Put n ones in front of ``kwargs["attention_mask"]`` (if there is one).

    Raises:
        ValueError: a mask that is not 2D (batch, length).
    """
    mask = kwargs.get("attention_mask")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"prompt learning needs a 2D attention_mask (batch, length); got {shape}.")
    ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
    kwargs["attention_mask"] = torch.cat((ones, mask), dim=1)


def _shift_positions(kwargs: dict[str, Any], n: int, prepend: bool) -> None:
    positions = kwargs.get("position_ids")
    if positions is None:
        return
    shifted = positions + n
    if prepend:  # the virtual tokens take positions 0..n-1
        virtual = torch.arange(n, dtype=positions.dtype, device=positions.device)
        shifted = torch.cat((virtual.expand(*positions.shape[:-1], n), shifted), dim=-1)
    kwargs["position_ids"] = shifted


def _prepend_prompt(kwargs: dict[str, Any], module: PromptModule, model: nn.Module,
                    config: PromptLearningConfig) -> None:
    ids = kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = word_embeddings(model)(ids)
    batch, n = embeds.shape[0], config.num_virtual_tokens
    kwargs["inputs_embeds"] = torch.cat((encoder_prompt(module, config, embeds), embeds), dim=1)
    labels = kwargs.get("labels")
    if labels is not None and config.task_type in PER_TOKEN_LABELS:  # no loss on the virtual tokens
        kwargs["labels"] = torch.cat((labels.new_full((batch, n), -100), labels), dim=1)
    token_types = kwargs.get("token_type_ids")
    if token_types is not None and config.task_type in NO_TOKEN_TYPES:
        _drop_token_type_ids(kwargs, config.task_type)
    elif token_types is not None:
        kwargs["token_type_ids"] = torch.cat((token_types.new_zeros((batch, n)), token_types), dim=1)


def encoder_prompt(module: PromptModule, config: PromptLearningConfig, like: torch.Tensor) -> torch.Tensor:
    """The P virtual tokens in front of the (encoder) input, (B, P, token_dim) in ``like``'s dtype and device.

    An encoder-decoder adapter holds num_transformer_submodules * P rows, as PEFT's does; the first P go in front of
    the encoder input and the others are not used (PEFT's prompt tuning and P-tuning use them nowhere either).
    """
    prompts = module.prompt()[: config.num_virtual_tokens].to(dtype=like.dtype, device=like.device)
    return prompts.unsqueeze(0).expand(like.shape[0], -1, -1)


def _drop_token_type_ids(kwargs: dict[str, Any], task: str | None) -> None:
    if kwargs.pop("token_type_ids", None) is not None:
        warnings.warn(f"token_type_ids are not used with prompt learning for task_type={task!r} (as in PEFT); "
                      "ignoring them.", stacklevel=5)


@contextlib.contextmanager
def generation_hook(model: nn.Module, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> Iterator[None]:
    """While inside, every call of ``model`` (each step ``generate`` takes) has its keyword arguments rewritten.

    A forward pre-hook sees exactly what ``generate`` passes (after beam expansion, cache handling and position
    ids), so the virtual tokens are there on every step: with the KV cache, without it (each step a full
    forward), with left padding and with several beams.
    """
    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if args:  # generate calls the model with keywords; a positional first argument is input_ids
            kwargs = {"input_ids": args[0], **kwargs}
            args = args[1:]
        return args, rewrite(kwargs)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def trainable_tensors(module: PromptModule) -> list[torch.Tensor]:
    """Every parameter of the prompt module (prompt and reparameterization): what trains."""
    return list(module.parameters()) if isinstance(module, nn.Module) else []


__all__ = [
    "PROMPT_EMBEDDINGS_KEY",
    "PromptLearningConfig",
    "PromptModule",
    "cache_argument",
    "cached_length",
    "check_combination",
    "check_model",
    "encoder_prompt",
    "extend_mask",
    "fill_model_dims",
    "generation_hook",
    "pop_cache",
    "prefix_cache",
    "prefix_key_values",
    "prompt_embeddings",
    "prompt_inputs",
    "refuse_merge",
    "word_embeddings",
]
