"""PEFT's ``AutoPeftModel*`` classes: load the base model an adapter names, then the adapter on it.

``AutoPeftModelForCausalLM.from_pretrained(ADAPTER_DIR)`` reads ``base_model_name_or_path`` from the
adapter's config and loads that model with the matching ``transformers`` Auto class. A local model
folder, a ``.gguf`` file and the bundled SmolLM2 (by its Hub id) are found offline; any other name
goes to ``transformers`` as it is (which works when it is in the local Hugging Face cache).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .config import CONFIG_NAME, PeftConfig, read_config_dict
from .methods import config_from_dict
from .model import DEFAULT_ADAPTER, PeftModel
from .tasks import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)


def _load_base(name_or_path: str, auto_class_name: str, **kwargs: Any) -> nn.Module:
    """The base model through ``transformers.<auto_class_name>``; GGUF files and the bundled model offline."""
    import transformers

    from .formats.models import resolve_model

    auto_class = getattr(transformers, auto_class_name)
    try:
        source = resolve_model(name_or_path)
    except FileNotFoundError:
        return auto_class.from_pretrained(name_or_path, **kwargs)  # a Hub id: transformers' cache decides
    if source.gguf_file:
        kwargs.setdefault("gguf_file", source.gguf_file)
    return auto_class.from_pretrained(source.directory, **kwargs)


class _AutoPeftModel:
    """Shared ``from_pretrained``; subclasses name the transformers Auto class and the wrapper class."""

    auto_class_name = "AutoModel"
    peft_model_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is made with {type(self).__name__}.from_pretrained(adapter_folder).")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the adapter folder's base model, then the adapter on it.

        Args:
            pretrained_model_name_or_path: the adapter folder (local; no Hub download).
            revision: the base model's revision, passed to transformers.
            import_allowlist: PEFT's limit on the modules a custom base class may be imported from;
                deltatune imports no class named in a file (it uses the transformers Auto class), so
                every allowlist is kept.
            kwargs: passed to the transformers ``from_pretrained`` of the base model (``dtype``,
                ``device_map``, ``quantization_config``, ...).
        """
        folder = os.fspath(pretrained_model_name_or_path)
        if config is None:
            config = config_from_dict(read_config_dict(folder), source=os.path.join(folder, CONFIG_NAME))
        base = config.base_model_name_or_path
        if not base:
            raise ValueError(f"{os.path.join(folder, CONFIG_NAME)} has no base_model_name_or_path; load the base "
                             "model yourself and use PeftModel.from_pretrained(model, folder).")
        if revision is not None or config.revision is not None:
            kwargs["revision"] = revision or config.revision
        model = _load_base(base, cls.auto_class_name, **kwargs)
        return cls.peft_model_class.from_pretrained(model, folder, adapter_name=adapter_name,
                                                    is_trainable=is_trainable, config=config)


class AutoPeftModel(_AutoPeftModel):
    auto_class_name = "AutoModel"
    peft_model_class = PeftModel


class AutoPeftModelForCausalLM(_AutoPeftModel):
    auto_class_name = "AutoModelForCausalLM"
    peft_model_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    auto_class_name = "AutoModelForSeq2SeqLM"
    peft_model_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    auto_class_name = "AutoModelForSequenceClassification"
    peft_model_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    auto_class_name = "AutoModelForTokenClassification"
    peft_model_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    auto_class_name = "AutoModelForQuestionAnswering"
    peft_model_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    auto_class_name = "AutoModel"
    peft_model_class = PeftModelForFeatureExtraction
