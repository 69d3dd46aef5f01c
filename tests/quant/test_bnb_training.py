"""QLoRA on a base transformers loaded through bitsandbytes: deltatune trains it as PEFT does, step for step.

The oracle is HF PEFT on the same bitsandbytes model: ``peft.prepare_model_for_kbit_training`` +
``peft.get_peft_model`` against deltatune's, with the adapter's initial weights copied from PEFT's, then a few
AdamW steps on fixed batches. bitsandbytes' CPU backend runs NF4, FP4 and int8 (``load_in_8bit``) here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.quant import quantize_model
from deltatune.quant.kbit import is_bnb_quantized_param, peft_param_count, quantized_param_count

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

VOCAB = 128
# bitsandbytes' 4-bit blocks are 64 values, so every in_features here is a multiple of 64.
CONFIG = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
MODES = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": torch.float32},
    "int8": {"load_in_8bit": True},
    # the 4-bit codes stored as bf16 elements (FSDP's layout): an fp32 upcast of these would destroy them
    "nf4-bf16-storage": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32,
                         "bnb_4bit_quant_storage": torch.bfloat16},
}
STEPS = 5
LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}

# PEFT's counts for this architecture, from peft.get_peft_model(...).get_nb_trainable_parameters() on each mode
# above (checked again live in test_peft_counts_are_the_oracle):
# linear weights per block: q 64*64 + k 64*32 + v 64*32 + o 64*64 + (gate, up, down) 3 * 64*128 = 36864.
PEFT_QUANTIZED = 2 * 36864  # 73728: the weights the quantized layers stand for (PEFT counts a Params4bit * 2)
PEFT_BASE_ALL = PEFT_QUANTIZED + 2 * VOCAB * 64 + 5 * 64  # + embed_tokens, lm_head, 5 RMSNorms = 90432
PEFT_LORA = 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))  # r * (in + out) per adapted layer = 8192
PEFT_COUNTS = (PEFT_LORA, PEFT_BASE_ALL + PEFT_LORA)  # (8192, 98624)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(path)
    return str(path)


def load(path: str, mode: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The saved model through bitsandbytes; bf16 elsewhere, so that preparing it has norms etc. to upcast."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(**MODES[mode]), device_map="cpu", dtype=dtype)


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4, 16), generator=generator) for _ in range(STEPS)]


def train(model: torch.nn.Module) -> list[float]:
    """Plain AdamW on the trainable parameters; the loss of each step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for ids in batches():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def checkpointing(model: torch.nn.Module) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers 5 renamed is_gradient_checkpointing
    return bool(model.is_gradient_checkpointing if flag is None else flag)


def quantized_bytes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().view(torch.uint8).clone() for n, p in model.named_parameters() if is_bnb_quantized_param(p)}


@pytest.mark.parametrize("mode", list(MODES))
def test_prepare_and_train_like_peft(saved_llama, mode):
    ours, theirs = load(saved_llama, mode), load(saved_llama, mode)
    codes = quantized_bytes(ours)
    assert codes and torch.equal(codes[next(iter(codes))], quantized_bytes(theirs)[next(iter(codes))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.prepare_model_for_kbit_training(theirs)
        dt.prepare_model_for_kbit_training(ours)
    # the same casts and freezing as PEFT, parameter by parameter; the codes keep their bytes
    expected = {n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()}
    assert {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()} == expected
    assert ours.model.norm.weight.dtype == ours.lm_head.weight.dtype == torch.float32  # loaded as bf16
    assert all(torch.equal(codes[n], b) for n, b in quantized_bytes(ours).items())
    assert checkpointing(ours) and checkpointing(theirs)

    theirs = peft.get_peft_model(theirs, peft.LoraConfig(**LORA))
    ours = dt.get_peft_model(ours, dt.LoraConfig(**LORA))
    their_adapter = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    our_adapter = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert our_adapter.keys() == their_adapter.keys() and len(our_adapter) == 2 * 2 * 7
    with torch.no_grad():
        for name, param in their_adapter.items():
            our_adapter[name].copy_(param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' int8 matmul: "inputs will be cast to float16"
        their_losses, our_losses = train(theirs), train(ours)
    # measured: equal to the last bit on nf4, fp4, int8 and bf16 storage (both run the same bitsandbytes
    # kernels on the same inputs); 1e-4 leaves room for a kernel that rounds differently
    assert our_losses == pytest.approx(their_losses, rel=1e-4)
    assert their_losses[-1] != their_losses[0]  # the steps changed the adapter
    assert all(p.abs().sum() > 0 for n, p in our_adapter.items() if "lora_B" in n)


@pytest.mark.parametrize("mode", ["nf4", "int8", "nf4-bf16-storage"])
def test_peft_counts_are_the_oracle(saved_llama, mode):
    """PEFT_COUNTS above are what PEFT says, and deltatune says the same on the same bitsandbytes model."""
    theirs = peft.get_peft_model(load(saved_llama, mode), peft.LoraConfig(**LORA))
    assert theirs.get_nb_trainable_parameters() == PEFT_COUNTS
    ours = dt.get_peft_model(load(saved_llama, mode), dt.LoraConfig(**LORA))
    # depends on PeftModel.get_nb_trainable_parameters in model.py (counting a Params4bit as PEFT does)
    assert ours.get_nb_trainable_parameters() == PEFT_COUNTS


@pytest.mark.parametrize("mode", ["nf4", "int8", "nf4-bf16-storage"])
def test_quantized_param_count_on_bitsandbytes_models(saved_llama, mode):
    model = load(saved_llama, mode)
    assert quantized_param_count(model) == PEFT_QUANTIZED
    plain = sum(p.numel() for p in model.parameters() if not is_bnb_quantized_param(p))
    assert plain + quantized_param_count(model) == PEFT_BASE_ALL
    assert sum(peft_param_count(p) for p in model.parameters()) == PEFT_BASE_ALL  # PEFT's own rule, summed


@pytest.mark.parametrize(("bits", "quant_type"), [(4, "nf4"), (4, "fp4"), (8, "nf4")])
def test_quantized_param_count_on_deltatune_quantized_models(bits, quant_type):
    """deltatune's layers hold codes in buffers; counted, they give PEFT's numbers for the bitsandbytes model."""
    torch.manual_seed(0)
    model = quantize_model(LlamaForCausalLM(LlamaConfig(**CONFIG)), bits=bits, quant_type=quant_type)
    assert not any(p.numel() == 64 * 128 and p.dim() == 2 for n, p in model.named_parameters() if "mlp" in n)
    assert quantized_param_count(model) == PEFT_QUANTIZED
    assert sum(p.numel() for p in model.parameters()) + quantized_param_count(model) == PEFT_BASE_ALL
    peft_model = dt.get_peft_model(model, dt.LoraConfig(**LORA))
    # depends on PeftModel.get_nb_trainable_parameters in model.py (adding quantized_param_count's weights)
    assert peft_model.get_nb_trainable_parameters() == PEFT_COUNTS


def test_peft_param_count_of_a_4bit_weight_follows_its_storage():
    """Two codes per byte: a Params4bit of n bf16 elements holds 4 n weights (PEFT: numel * 2 * itemsize)."""
    layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4", quant_storage=torch.bfloat16)
    layer.load_state_dict(torch.nn.Linear(64, 32).state_dict())
    layer = layer.to("cpu")  # quantizes
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.numel() == 64 * 32 // 4
    assert peft_param_count(layer.weight) == 64 * 32 and quantized_param_count(layer) == 64 * 32
    assert peft_param_count(layer.bias) == 32


def test_prepare_leaves_a_float_model_without_checkpointing_like_peft():
    """PEFT turns checkpointing on only for quantized models; a float model is frozen and upcast, nothing more."""
    theirs, ours = (LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16) for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.prepare_model_for_kbit_training(theirs)
        dt.prepare_model_for_kbit_training(ours)
    assert not checkpointing(theirs) and not checkpointing(ours)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ours.parameters())
