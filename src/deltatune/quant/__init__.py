"""NF4, FP4 and int8 weights, their Linear modules, and loading models straight into them; pure PyTorch.

Nothing here knows about adapters: LoRA and friends wrap a `Linear4bit` / `Linear8bit` as they wrap an
`nn.Linear`, through ``in_features``, ``out_features``, ``bias``, ``compute_dtype`` and ``dequantized_weight()``.
"""

from .bnb import from_bnb, to_bnb, weight_from_bnb_state_dict, weight_from_quant_state
from .convert import QUANTIZE_NAMES, dequantize_model, quantize_arguments, quantize_model, requantization_error
from .gguf import load_gguf_quantized
from .int8 import Int8Weight, quantize_int8
from .kbit import prepare_model_for_kbit_training
from .linear import Linear4bit, Linear8bit
from .load import load_quantized
from .nf4 import Weight4bit, quantize_4bit, quantize_fp4, quantize_nf4

__all__ = [
    "QUANTIZE_NAMES", "Int8Weight", "Linear4bit", "Linear8bit", "Weight4bit", "dequantize_model", "from_bnb",
    "load_gguf_quantized", "load_quantized", "prepare_model_for_kbit_training", "quantize_4bit", "quantize_arguments",
    "quantize_fp4", "quantize_int8", "quantize_model", "quantize_nf4", "requantization_error", "to_bnb",
    "weight_from_bnb_state_dict",
    "weight_from_quant_state",
]  # fmt: skip
