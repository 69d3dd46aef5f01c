"""LoRA on slices of a fused q/k/v layer: loralib's MergedLinear, and enable_lora in get_peft_model.

Oracle: the LoRA paper's own formula (microsoft/LoRA loralib/layers.py ``MergedLinear.merge_AB``): the update is
a grouped 1-d convolution of A by B, zero-padded into the disabled slices' rows.
"""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from transformers import Phi3Config, Phi3ForCausalLM

import deltatune as dt
from deltatune import loralib as lora
from tests.conftest import assert_unchanged, logits, make_model, model_inputs, quiet, snapshot


def loralib_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, enable: list[bool], out: int, scaling: float):
    """loralib's merge_AB: conv1d(A, B, groups=enabled), zero-padded to all slices' rows; (out, in)."""
    delta = F.conv1d(lora_a.unsqueeze(0), lora_b.unsqueeze(-1), groups=sum(enable)).squeeze(0)
    rows = torch.zeros(out, dtype=torch.bool).view(len(enable), -1)
    rows[torch.tensor(enable), :] = True
    padded = delta.new_zeros(out, delta.shape[1])
    padded[rows.view(-1)] = delta
    return padded * scaling


@pytest.mark.parametrize("enable", [[True, False, True], [True, True, True], [False, True, False], [True, False]])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_linear_follows_loralib(enable, fan_in_fan_out):
    torch.manual_seed(0)
    layer = lora.MergedLinear(16, 24, r=2, lora_alpha=4, enable_lora=enable, fan_in_fan_out=fan_in_fan_out)
    with torch.no_grad():
        layer.lora_B.normal_()
    k = sum(enable)
    assert {n: tuple(p.shape) for n, p in layer.state_dict().items()} == {
        "weight": (16, 24) if fan_in_fan_out else (24, 16), "bias": (24,), "lora_A": (2 * k, 16),
        "lora_B": (24 // len(enable) * k, 2)}
    x = torch.randn(3, 5, 16)
    weight = layer.weight.t() if fan_in_fan_out else layer.weight
    want = F.linear(x, weight + loralib_delta(layer.lora_A, layer.lora_B, enable, 24, 2.0), layer.bias)
    assert torch.allclose(layer(x), want, atol=1e-5)
    layer.merge()
    assert torch.allclose(layer(x), want, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer.weight.t() if fan_in_fan_out else layer.weight, weight, atol=1e-6)


def test_merged_linear_trains_only_lora_and_saves_loralib_names():
    model = torch.nn.Sequential(lora.MergedLinear(8, 12, r=2, enable_lora=[True, False, True]))
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B", "0.bias"}
    assert set(lora.lora_state_dict(model, bias="lora_only")) == {"0.lora_A", "0.lora_B", "0.bias"}
    fresh = torch.nn.Sequential(lora.MergedLinear(8, 12, r=2, enable_lora=[True, False, True]))
    fresh.load_state_dict(model.state_dict())  # a loralib checkpoint's names and shapes
    x = torch.randn(2, 8)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("enable,message", [(None, "at least one True"), ([False, False, False], "at least one"),
                                            ([True, True, False, True, True], "divides")])
def test_merged_linear_refuses_bad_slices(enable, message):
    with pytest.raises(ValueError, match=message):
        lora.MergedLinear(8, 12, r=2, enable_lora=enable)


# ---- enable_lora in get_peft_model ---------------------------------------------------------------------------------


def sliced_gpt2(enable=(True, False, True), **config):
    return quiet(dt.get_peft_model, make_model("gpt2"), dt.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], enable_lora=list(enable), init_lora_weights=False, **config))


def test_gpt2_q_v_slices_equal_loralibs_merged_linear():
    """The same A and B in deltatune.loralib.MergedLinear (loralib's layout) give the same logits."""
    model = sliced_gpt2()
    reference = make_model("gpt2")
    for block, ref_block in zip(model.base_model.model.transformer.h, reference.transformer.h, strict=True):
        layer = block.attn.c_attn
        b = layer.lora_B["default"].weight  # (96, 4), block-diagonal over q (rows 0-31) and v (rows 64-95)
        assert torch.equal(b[32:64], torch.zeros_like(b[32:64])) and torch.equal(b[:32, 2:], torch.zeros(32, 2))
        merged = lora.MergedLinear(32, 96, r=2, lora_alpha=4, enable_lora=[True, False, True], fan_in_fan_out=True)
        with torch.no_grad():
            merged.weight.copy_(ref_block.attn.c_attn.weight)
            merged.bias.copy_(ref_block.attn.c_attn.bias)
            merged.lora_A.copy_(layer.lora_A["default"].weight)
            merged.lora_B.copy_(torch.cat([b[:32, :2], b[64:, 2:]]))
        assert torch.allclose(layer.delta_weight("default").t(), merged.delta_weight(), atol=1e-6) or \
            torch.allclose(layer.delta_weight("default"), merged.delta_weight(), atol=1e-6)
        ref_block.attn.c_attn = merged
    inputs = model_inputs("gpt2")
    assert torch.allclose(logits(model, inputs), logits(reference, inputs), atol=1e-5)


def test_training_keeps_the_k_slice_untouched():
    model = sliced_gpt2()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        ids = torch.randint(2, 96, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    b = layer.lora_B["default"].weight
    assert torch.equal(b[32:64], torch.zeros_like(b[32:64]))  # k rows
    assert torch.equal(b[:32, 2:], torch.zeros(32, 2)) and torch.equal(b[64:, :2], torch.zeros(32, 2))
    assert b[:32, :2].abs().sum() > 0 and b[64:, 2:].abs().sum() > 0
    assert layer.scaling["default"] == 2.0  # alpha / r of each slice, not alpha / (2 r)


def test_sliced_adapter_file_loads_in_peft_and_deltatune_with_equal_logits(tmp_path):
    model = sliced_gpt2(enable=(True, True, False), rank_pattern={"h.1.attn.c_attn": 3})
    inputs = model_inputs("gpt2")
    want = logits(model, inputs)
    model.save_pretrained(tmp_path)
    written = dt.LoraConfig.from_pretrained(tmp_path)
    assert written.enable_lora is None and written.rank_pattern[r"transformer\.h\.1\.attn\.c_attn"] == 6
    for loader in (peft.PeftModel, dt.PeftModel):
        loaded = quiet(loader.from_pretrained, make_model("gpt2"), tmp_path)
        assert torch.allclose(logits(loaded, inputs), want, atol=1e-5), loader
    assert model.peft_config["default"].enable_lora == [True, True, False]  # the live config is kept


def tiny_phi3() -> Phi3ForCausalLM:
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return Phi3ForCausalLM(config).eval()


def test_phi3_qkv_proj_slices_follow_grouped_query_attention(tmp_path):
    """q has 4 heads of 8, k and v 2 heads each: rows 0-31 (q), 32-47 (k), 48-63 (v)."""
    model = quiet(dt.get_peft_model, tiny_phi3(), dt.LoraConfig(r=2, target_modules=["qkv_proj"],
                                                               enable_lora=[True, False, True],
                                                               init_lora_weights=False))
    delta = model.base_model.model.model.layers[0].self_attn.qkv_proj.delta_weight("default")
    assert delta.shape == (64, 32)
    assert torch.equal(delta[32:48], torch.zeros(16, 32)) and delta[:32].abs().sum() > 0 and delta[48:].abs().sum() > 0
    ids = {"input_ids": torch.randint(2, 96, (2, 7))}
    want = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = quiet(peft.PeftModel.from_pretrained, tiny_phi3(), tmp_path)
    assert torch.allclose(logits(loaded, ids), want, atol=1e-5)


@pytest.mark.parametrize("kind,config,message", [
    ("llama", dict(target_modules=["q_proj"], enable_lora=[True, False, True]), "layout deltatune knows"),
    ("gpt2", dict(target_modules=["c_attn"], enable_lora=[True, False]), "3 values"),
    ("gpt2", dict(target_modules=["c_attn"], enable_lora=[False, False, False]), "enables no slice"),
    ("gpt2", dict(target_modules=["c_attn"], enable_lora=[True, False, True], use_dora=True), "cannot be combined"),
])
def test_bad_enable_lora_is_refused_before_any_change(kind, config, message):
    model = make_model(kind)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        dt.get_peft_model(model, dt.LoraConfig(r=2, **config))
    assert_unchanged(model, before)
