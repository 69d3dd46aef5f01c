"""deltatune: parameter-efficient fine-tuning of PyTorch models, with HF PEFT's API and files."""

from .config import PeftConfig, PeftType, TaskType
from .methods.lora import LoraConfig
from .model import PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = ["LoraConfig", "PeftConfig", "PeftModel", "PeftType", "TaskType", "get_peft_model", "__version__"]
