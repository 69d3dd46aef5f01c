"""PEFT's per-task wrappers (``PeftModelForCausalLM``, ...) and ``get_peft_model``, which picks one by task_type.

The classes differ only in their ``forward`` signature, which names the inputs the task takes (as
PEFT's do), so tools that read the signature (``transformers.Trainer`` finding ``labels``, a
``remove_unused_columns`` pass) see what they expect. The heads a task trains in full (classifier,
qa_outputs) are added by ``PeftModel.add_adapter`` from ``model.TASK_HEADS``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapter_layer import AdapterLayer
from .config import PeftConfig, TaskType
from .model import DEFAULT_ADAPTER, PeftModel
from .modules_to_save import ModulesToSaveWrapper


def _call(model: PeftModel, named: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """Forward with the named inputs that were given (None means "not given", as in PEFT)."""
    task_ids = named.pop("task_ids", None)
    if task_ids is not None:
        raise ValueError("task_ids is for multitask prompt tuning, which deltatune does not support yet.")
    inputs = {key: value for key, value in named.items() if value is not None}
    return PeftModel.forward(model, **inputs, **kwargs)


class _PeftModelWithLabels(PeftModel):
    """The forward signature PEFT gives causal LM, sequence and token classification alike."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return _call(self, dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                labels=labels, output_attentions=output_attentions,
                                output_hidden_states=output_hidden_states, return_dict=return_dict,
                                task_ids=task_ids), kwargs)


class PeftModelForCausalLM(_PeftModelWithLabels):
    """A decoder-only language model with adapters (``task_type="CAUSAL_LM"``)."""


class PeftModelForSequenceClassification(_PeftModelWithLabels):
    """A sequence classifier with adapters; the classifier head (``classifier``/``score``) trains in full."""


class PeftModelForTokenClassification(_PeftModelWithLabels):
    """A token classifier with adapters; the classifier head (``classifier``/``score``) trains in full."""


class PeftModelForQuestionAnswering(PeftModel):
    """An extractive QA model with adapters; the span head (``qa_outputs``) trains in full."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return _call(self, dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                position_ids=position_ids, inputs_embeds=inputs_embeds,
                                start_positions=start_positions, end_positions=end_positions,
                                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                return_dict=return_dict, task_ids=task_ids), kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    """An encoder-decoder language model (T5, BART, ...) with adapters."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None,
                decoder_inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return _call(self, dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                return_dict=return_dict, task_ids=task_ids), kwargs)


class PeftModelForFeatureExtraction(PeftModel):
    """An encoder producing hidden states (embeddings) with adapters."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return _call(self, dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                return_dict=return_dict, task_ids=task_ids), kwargs)


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}


def peft_model_class(task_type: str | None) -> type[PeftModel]:
    """The wrapper class for ``task_type`` (``PeftModel`` when there is none), as PEFT chooses it."""
    return MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(getattr(task_type, "value", task_type) or "", PeftModel)


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = DEFAULT_ADAPTER,
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config``; only the adapter trains.

    Returns the class for ``peft_config.task_type`` (``PeftModelForCausalLM`` for "CAUSAL_LM", ...),
    or ``PeftModel`` when no task type is set, as PEFT does.

    Args:
        autocast_adapter_dtype: True (PEFT's default) keeps adapter weights in float32 on a bf16/fp16
            base; False makes them the base layer's dtype.
        revision: recorded in the config as the base model's revision.
        mixed: PEFT's PeftMixedModel (different methods at once); not supported yet.

    Raises:
        ValueError: the config targets nothing, a target cannot be adapted, or ``model`` is already
            a PeftModel (use ``add_adapter``). The model is left unchanged.
    """
    if mixed:
        raise ValueError("mixed=True (PEFT's PeftMixedModel) is not supported yet by deltatune.")
    if isinstance(model, PeftModel):
        raise ValueError("This model is already a PeftModel; use model.add_adapter(name, config) to add another.")
    if any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in model.modules()):
        raise ValueError("This model already holds adapter layers; wrap the original model, or call unload() first.")
    if revision is not None:
        peft_config.revision = revision
    cls = peft_model_class(peft_config.task_type)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)
