"""deltatune: parameter-efficient fine-tuning of PyTorch models, with HF PEFT's API and files.

The names are PEFT's, so switching is one import: ``from peft import X`` -> ``from deltatune import X``.
"""

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig, TaskType
from .dropout import SparseDropout, sparse_dropout
from .functional import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from .integrations import install as _install_integrations
from .loss import causal_lm_loss
from .methods import PeftType
from .methods.bottleneck import BottleneckConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig, set_fused_training
from .methods.lora_config import LoftQConfig
from .methods.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .methods.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit, init_prompt_from_text
from .model import PeftModel
from .optim import create_loraplus_optimizer
from .prompt_learning import PromptLearningConfig
from .quant.kbit import prepare_model_for_kbit_training
from .tasks import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)

__version__ = "0.1.0"

_install_integrations()  # for trainers imported before deltatune; objects made later install again

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BottleneckConfig",
    "IA3Config",
    "LoftQConfig",
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "SparseDropout",
    "TaskType",
    "__version__",
    "causal_lm_loss",
    "create_loraplus_optimizer",
    "get_peft_model",
    "get_peft_model_state_dict",
    "init_prompt_from_text",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "set_fused_training",
    "set_peft_model_state_dict",
    "sparse_dropout",
]
