"""LoRA on a bitsandbytes-quantized base (transformers' BitsAndBytesConfig): merging folds the adapter into the
quantized weight exactly as PEFT does (dequantize, add scaling * B A, quantize again), never drops it."""

from __future__ import annotations

import subprocess
import sys
import warnings

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.quant.bnb import bnb_dequantized_weight, bnb_weight_kind

bnb = pytest.importorskip("bitsandbytes")

QUANT = {
    "int8": {"load_in_8bit": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": torch.float32},
}
TARGETS = ["q_proj", "v_proj", "down_proj"]
LORA = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False}
IDS = torch.randint(2, 96, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama on disk; 64 wide, as bitsandbytes' CPU 4-bit kernel needs whole blocks of 64 inputs."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_llama_64")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _load(folder, quant: str, dtype: torch.dtype = torch.float32):
    config = dict(QUANT[quant])
    if dtype != torch.float32 and "bnb_4bit_compute_dtype" in config:
        config["bnb_4bit_compute_dtype"] = dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**config),
                                                    device_map="cpu", dtype=dtype)


def _logits(model) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # bitsandbytes: inputs cast to fp16 for the int8 matmul
        return model(input_ids=IDS).logits.float()


def _targets(model) -> list[torch.nn.Module]:
    layer = model.model.layers[0]
    return [layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj]


def _codes(layer) -> list[torch.Tensor]:
    """The stored bytes of a bitsandbytes layer's weight (and, for 4 bits, its absmax)."""
    weight = layer.weight
    if bnb_weight_kind(layer) == "4bit":
        return [weight.data, weight.quant_state.absmax]
    return [weight.data]


def _both(folder, quant, tmp_path, dtype=torch.float32):
    """The same random adapter on two copies of the quantized base: deltatune's and PEFT's (read from our file)."""
    torch.manual_seed(3)
    ours = dt.get_peft_model(_load(folder, quant, dtype), dt.LoraConfig(**LORA))
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_load(folder, quant, dtype), tmp_path)
    return ours, theirs


@pytest.mark.parametrize("quant", QUANT)
def test_merge_and_unload_matches_peft(quant, folder, tmp_path):
    ours, theirs = _both(folder, quant, tmp_path)
    unmerged = _logits(dt.PeftModel.from_pretrained(_load(folder, quant), tmp_path))
    base = _logits(_load(folder, quant))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "may get different generations due to rounding errors"
        theirs_merged = theirs.merge_and_unload()  # before any forward: see the CPU-layout test below
        ours_merged = ours.merge_and_unload()
    for mine, peft_layer in zip(_targets(ours_merged), _targets(theirs_merged), strict=True):
        assert bnb_weight_kind(mine) == bnb_weight_kind(peft_layer) is not None  # still quantized, as in PEFT
        for got, expected in zip(_codes(mine), _codes(peft_layer), strict=True):
            assert torch.equal(got, expected)
    merged = _logits(ours_merged)
    assert torch.equal(merged, _logits(theirs_merged))
    effect = (unmerged - base).abs().max()
    assert effect > 0.3  # the adapter changes the output ...
    assert (merged - unmerged).abs().max() < 0.2 * effect  # ... and merging keeps it, up to quantization rounding


@pytest.mark.parametrize("quant", QUANT)
def test_merge_adapter_and_unmerge_adapter_match_peft(quant, folder, tmp_path):
    ours, theirs = _both(folder, quant, tmp_path)
    layers, peft_layers = _targets(ours.get_base_model()), _targets(theirs.get_base_model())
    original = [bnb_dequantized_weight(layer.base_layer).clone() for layer in layers]
    deltas = [layer.delta_weight("default").detach() for layer in layers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.merge_adapter()
        ours.merge_adapter()
        for mine, peft_layer in zip(layers, peft_layers, strict=True):
            assert mine.merged_adapters == ["default"]
            assert all(torch.equal(a, b) for a, b in zip(_codes(mine.base_layer), _codes(peft_layer.base_layer),
                                                         strict=True))
        # in train mode bitsandbytes keeps the standard 4-bit layout, which PEFT's unmerge reads (see below)
        assert torch.equal(_logits(ours.train()), _logits(theirs.train()))
        theirs.unmerge_adapter()
        ours.unmerge_adapter()
    for mine, peft_layer, before, delta in zip(layers, peft_layers, original, deltas, strict=True):
        assert not mine.merged_adapters
        assert all(torch.equal(a, b) for a, b in zip(_codes(mine.base_layer), _codes(peft_layer.base_layer),
                                                     strict=True))
        # back to W0 up to two roundings, far closer to it than the update is large
        assert (bnb_dequantized_weight(mine.base_layer) - before).abs().mean() < 0.2 * delta.abs().mean()


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_safe_merge_refuses_nan_and_leaves_every_layer_as_it_was(quant, folder, tmp_path):
    ours, _ = _both(folder, quant, tmp_path)
    layers = _targets(ours.get_base_model())
    with torch.no_grad():
        layers[-1].lora_B["default"].weight[0, 0] = float("nan")
    before = [[t.clone() for t in _codes(layer.base_layer)] for layer in layers]
    with pytest.raises(ValueError, match="NaN/Inf"):
        ours.merge_adapter(safe_merge=True)
    with pytest.raises(ValueError, match="NaN/Inf"):
        layers[-1].merge(safe_merge=True)
    for layer, codes in zip(layers, before, strict=True):
        assert not layer.merged_adapters
        assert all(torch.equal(a, b) for a, b in zip(_codes(layer.base_layer), codes, strict=True))


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_merge_after_an_inference_forward_reads_the_cpu_layout(quant, folder, tmp_path):
    """On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit codes in place at the first inference forward (absmax to
    bf16); merging must decode that layout, not read it as the standard one."""
    ours, theirs = _both(folder, quant, tmp_path)
    unmerged = _logits(ours)  # may repack the codes
    first = _targets(ours.get_base_model())[0].base_layer
    assert getattr(first.weight.quant_state, "packing_format_for_cpu", False) == first.support_avx512bf16_for_cpu
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _logits(theirs.merge_and_unload())  # merged before any forward
        merged = _logits(ours.merge_and_unload())
    assert (merged - reference).abs().max() < 0.02
    assert (merged - unmerged).abs().max() < 0.2 * (unmerged - _logits(_load(folder, quant))).abs().max()


def test_bf16_base_stays_bf16_and_matches_peft_within_rounding(folder, tmp_path):
    """PEFT requantizes the float32 sum (the layer then dequantizes to float32); deltatune keeps the layer's dtype."""
    ours, theirs = _both(folder, "nf4", tmp_path, dtype=torch.bfloat16)
    unmerged = _logits(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _logits(theirs.merge_and_unload())
        ours_merged = ours.merge_and_unload()
    assert all(layer.weight.quant_state.dtype == torch.bfloat16 for layer in _targets(ours_merged))
    merged = _logits(ours_merged)
    effect = (unmerged - _logits(_load(folder, "nf4", torch.bfloat16))).abs().max()
    assert (merged - reference).abs().max() < 0.05 * effect
    assert (merged - unmerged).abs().max() < 0.2 * effect


def test_layer_built_by_hand_merges_without_dropping_the_adapter():
    """An 8-bit layer made by replacing an nn.Linear (no transformers): the merged weight is W0 + scaling B A,
    quantized (before, the update was cast to int8 zeros and silently lost)."""
    from deltatune.methods.lora import LoraLayer

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    quantized = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    quantized.load_state_dict(linear.state_dict())
    quantized = quantized.to("cpu")  # quantizes
    layer = LoraLayer(quantized)
    layer.add_adapter("a", r=4, lora_alpha=8, init_lora_weights=False)
    layer.active_adapters = ["a"]
    w0 = bnb_dequantized_weight(quantized).clone()
    delta = layer.delta_weight("a").detach()
    layer.merge()
    merged = bnb_dequantized_weight(layer.base_layer)
    step = (w0 + delta).abs().amax(dim=1, keepdim=True) / 127
    assert ((merged - (w0 + delta)).abs() <= step).all() and (merged - w0).abs().max() > 10 * step.max()


def test_core_does_not_import_bitsandbytes():
    code = ("import sys, deltatune, deltatune.methods.lora, deltatune.quant, deltatune.quant.bnb; "
            "print('bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
