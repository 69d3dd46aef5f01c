"""PiSSA, OLoRA and LoftQ initialisation, and PiSSA / OLoRA adapters converted back to plain LoRA.

Oracles: PEFT 0.21.2 itself for PiSSA and OLoRA (same A, B and residual base, bit for bit, also for the
randomised ``pissa_niter_K`` under the same seed); for LoftQ, PEFT's own algorithm (``peft.utils.loftq_utils``
needs CUDA, so its 15-line loop runs here on bitsandbytes' CPU quantizers and PEFT's ``_low_rank_decomposition``).
"""

from __future__ import annotations

import math

import bitsandbytes as bnb
import peft
import pytest
import torch
from peft.utils.loftq_utils import _low_rank_decomposition
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.methods.lora_init import loftq_factors
from deltatune.quant import Linear4bit, Linear8bit, quantize_model
from tests.conftest import assert_unchanged, logits, make_model, model_inputs, perturb, quiet, snapshot

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["k_proj", "o_proj", "up_proj"],
           "gpt2": ["c_attn", "c_fc"]}


def both(kind: str, seed: int = 5, **config):
    """The same base wrapped by PEFT and by deltatune with the same config and the same random state."""
    base = make_model(kind)
    torch.manual_seed(seed)
    theirs = quiet(peft.get_peft_model, make_model(kind), peft.LoraConfig(**config))
    torch.manual_seed(seed)
    ours = quiet(dt.get_peft_model, make_model(kind), dt.LoraConfig(**config))
    return base, theirs, ours


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


# ---- PiSSA and OLoRA against PEFT -----------------------------------------------------------------------------------

CASES = [(kind, mode, alpha, rslora) for kind in ("llama", "qwen2", "gpt2")
         for mode in ("pissa", "pissa_niter_2", "olora") for alpha, rslora in ((8, False), (3, True))
         if not (kind == "gpt2" and mode == "olora")]


@pytest.mark.parametrize("kind,mode,alpha,rslora", CASES)
def test_base_changing_init_equals_peft_and_keeps_the_base_output(kind, mode, alpha, rslora):
    base, theirs, ours = both(kind, r=4, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS[kind],
                              init_lora_weights=mode)
    state_theirs, state_ours = lora_state(theirs), lora_state(ours)
    assert state_theirs.keys() == state_ours.keys()
    for key, value in state_theirs.items():  # A, B and the residual base weights
        assert torch.equal(value, state_ours[key]), key
    inputs = model_inputs(kind)
    assert torch.allclose(logits(ours, inputs), logits(base, inputs), atol=1e-5)  # the model is the base at step 0
    a = ours.get_base_model().get_submodule(_first_target(ours)).lora_A["default"].weight
    assert a.abs().sum() > 0  # (and A, B are not a plain init that would trivially keep the output)


def _first_target(model: dt.PeftModel) -> str:
    return next(n for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_A"))


def test_olora_on_gpt2_conv1d_decomposes_the_out_in_weight():
    """PEFT takes the QR of Conv1D's stored (in, out) matrix and fails (c_attn) or builds a wrong base (c_proj)."""
    base = make_model("gpt2")
    ours = quiet(dt.get_peft_model, make_model("gpt2"), dt.LoraConfig(r=4, target_modules=["c_attn", "c_proj"],
                                                                    init_lora_weights="olora"))
    layer = ours.base_model.model.transformer.h[0].attn.c_attn
    w = base.transformer.h[0].attn.c_attn.weight.t()
    q, r = torch.linalg.qr(w)
    assert torch.allclose(layer.lora_B["default"].weight, q[:, :4]) and torch.allclose(layer.lora_A["default"].weight,
                                                                                      r[:4])
    inputs = model_inputs("gpt2")
    assert torch.allclose(logits(ours, inputs), logits(base, inputs), atol=1e-5)


def test_pissa_with_dora_and_an_embedding_target_equals_peft():
    """DoRA's magnitude is taken from the residual base plus B A; an embedding takes the plain init (as PEFT)."""
    base, theirs, ours = both("llama", r=4, lora_alpha=8, use_dora=True, init_lora_weights="pissa",
                              target_modules=["q_proj", "gate_proj"])
    for key, value in lora_state(theirs).items():  # (the magnitude's norm is summed in another order)
        close = torch.allclose(value, lora_state(ours)[key], rtol=1e-6, atol=0) if "magnitude" in key else \
            torch.equal(value, lora_state(ours)[key])
        assert close, key
    inputs = model_inputs("llama")
    assert torch.allclose(logits(ours, inputs), logits(base, inputs), atol=1e-5)
    base, theirs, ours = both("llama", r=4, init_lora_weights="pissa", target_modules=["embed_tokens", "q_proj"])
    emb = ours.base_model.model.model.embed_tokens
    assert torch.equal(emb.lora_embedding_A["default"], torch.zeros_like(emb.lora_embedding_A["default"]))
    assert torch.equal(emb.base_layer.weight, base.model.embed_tokens.weight)


def test_pissa_singular_values_are_the_top_r_and_niter_approaches_them():
    torch.manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(48, 32), full_matrices=False)
    w = u @ torch.diag(0.7 ** torch.arange(32.0)) @ vh  # a decaying spectrum, as trained weights have
    ours = {}
    for mode in ("pissa", "pissa_niter_8"):
        layer = nn.Sequential(nn.Linear(32, 48))
        layer[0].weight.data = w.clone()
        ours[mode] = dt.get_peft_model(layer, dt.LoraConfig(r=4, lora_alpha=4, target_modules=["0"],
                                                            init_lora_weights=mode)).base_model.model[0]
    top = torch.linalg.svdvals(w)[:4]
    for mode, layer in ours.items():
        update = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        tol = 1e-4 if mode == "pissa" else 2e-2
        assert torch.allclose(torch.linalg.svdvals(update)[:4], top, rtol=tol), mode
        assert torch.allclose(layer.base_layer.weight + update, w, atol=1e-5)


# ---- LoftQ ---------------------------------------------------------------------------------------------------------


def peft_loftq(weight: torch.Tensor, bits: int, r: int, iters: int):
    """PEFT's ``loftq_init`` loop on bitsandbytes' CPU quantizers (PEFT's own function moves to CUDA)."""
    weight = weight.float()
    residual = weight.clone()
    for i in range(iters):
        if bits == 4:
            packed, state = bnb.functional.quantize_4bit(residual, blocksize=64, compress_statistics=False,
                                                         quant_type="nf4")
            dequantized = bnb.functional.dequantize_4bit(packed, state)
        else:
            codes, scales, _ = bnb.functional.int8_vectorwise_quant(residual)
            dequantized = bnb.functional.int8_vectorwise_dequant(codes, scales)
        parts = _low_rank_decomposition(weight - dequantized, reduced_rank=r)
        if i + 1 == iters:
            break
        residual = weight - parts["L"] @ parts["R"]
    return dequantized, parts["R"], parts["L"]


def loftq_model(bits: int = 4, iters: int = 1, alpha: float = 4, **extra) -> tuple[nn.Module, dt.PeftModel]:
    # rows of 64 and 128 values: bitsandbytes 0.50's CPU dequantize mis-assigns blocks that straddle rows
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    torch.manual_seed(0)
    copy = LlamaForCausalLM(config).eval()
    ours = dt.get_peft_model(copy, dt.LoraConfig(
        r=4, lora_alpha=alpha, target_modules=["q_proj", "down_proj"], init_lora_weights="loftq",
        loftq_config=dt.LoftQConfig(loftq_bits=bits, loftq_iter=iters), **extra))
    return base, ours


@pytest.mark.parametrize("bits,iters", [(4, 1), (4, 3), (8, 1), (8, 2)])
def test_loftq_equals_peft_algorithm_and_quantizes_the_base(bits, iters):
    base, ours = loftq_model(bits, iters)
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        layer = ours.base_model.model.model.layers[0].get_submodule(name)
        assert isinstance(layer.base_layer, Linear4bit if bits == 4 else Linear8bit)
        w = base.model.layers[0].get_submodule(name).weight.detach()
        dequantized, a, b = peft_loftq(w, bits, 4, iters)
        assert torch.equal(layer.base_layer.dequantized_weight(torch.float32), dequantized)
        assert torch.equal(layer.lora_A["default"].weight, a) and torch.equal(layer.lora_B["default"].weight, b)


def test_loftq_scales_by_alpha_over_r_and_fits_the_quantization_error():
    """s B A is the low-rank residual whatever lora_alpha is; it halves the error of the quantized base here."""
    base, ours = loftq_model(alpha=16)
    layer = ours.base_model.model.model.layers[0].mlp.down_proj
    w = base.model.layers[0].mlp.down_proj.weight.detach()
    dequantized, a, b = peft_loftq(w, 4, 4, 1)
    update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert layer.scaling["default"] == 4
    assert torch.allclose(update, b @ a, atol=1e-6)
    plain = (w - dequantized).norm()
    assert (w - dequantized - update).norm() < 0.95 * plain
    a5, b5, q5 = loftq_factors(w, 4, 1.0, 4, 5)  # more rounds fit closer than one
    assert (w - q5.dequantize(torch.float32) - b5 @ a5).norm() < (w - dequantized - b @ a).norm()


def test_loftq_adapter_reloads_on_the_float_base_with_equal_logits(tmp_path):
    base, ours = loftq_model(bits=4, iters=2)
    perturb(ours)
    inputs = {"input_ids": torch.randint(0, 64, (2, 6))}
    want = logits(ours, inputs)
    ours.save_pretrained(tmp_path)
    again = dt.PeftModel.from_pretrained(base, tmp_path)  # LoftQ runs again on the float weights, then the file
    assert isinstance(again.base_model.model.model.layers[0].mlp.down_proj.base_layer, Linear4bit)
    assert torch.equal(logits(again, inputs), want)


# ---- files: PEFT's PiSSA files, and the conversion to plain LoRA -----------------------------------------------------


@pytest.mark.parametrize("maker", ["peft", "deltatune"])
@pytest.mark.parametrize("mode", ["pissa", "olora"])
def test_unconverted_file_loads_both_ways_with_equal_logits(tmp_path, maker, mode):
    """A PiSSA / OLoRA file keeps its mode; loading it runs the init on the given base again (PEFT's rule)."""
    base, theirs, ours = both("llama", r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=mode)
    made = theirs if maker == "peft" else ours
    perturb(made)
    inputs = model_inputs("llama")
    want = logits(made, inputs)
    made.save_pretrained(tmp_path)
    for loader in (dt.PeftModel, peft.PeftModel):
        loaded = quiet(loader.from_pretrained, make_model("llama"), tmp_path)
        assert torch.allclose(logits(loaded, inputs), want, atol=1e-6), loader


@pytest.mark.parametrize("maker", ["peft", "deltatune"])
@pytest.mark.parametrize("mode", ["pissa", "pissa_niter_3", "olora"])
def test_converted_adapter_is_plain_lora_for_the_original_base(tmp_path, maker, mode):
    base, theirs, ours = both("llama", r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=mode)
    made = theirs if maker == "peft" else ours
    made.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial copy
    made.save_pretrained(tmp_path / "initial")
    made.peft_config["default"].init_lora_weights = mode
    perturb(made)
    inputs = model_inputs("llama")
    want = logits(made, inputs)
    quiet(made.save_pretrained, tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    config = dt.LoraConfig.from_pretrained(tmp_path / "plain")
    assert config.init_lora_weights is True and config.r == 8 and config.lora_alpha == 16
    for loader in (dt.PeftModel, peft.PeftModel):
        loaded = quiet(loader.from_pretrained, make_model("llama"), tmp_path / "plain")
        assert torch.allclose(logits(loaded, inputs), want, atol=1e-5), loader
        assert torch.equal(loaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight,
                           base.model.layers[0].self_attn.q_proj.weight)


def test_conversion_keeps_rslora_and_rank_pattern_scaling(tmp_path):
    """PEFT refuses rsLoRA with rank_pattern here; the scaling alpha / sqrt(r) is kept by alpha x sqrt(2)."""
    config = dict(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3},
                  target_modules=TARGETS["llama"], init_lora_weights="pissa")
    ours = quiet(dt.get_peft_model, make_model("llama"), dt.LoraConfig(**config))
    ours.save_pretrained(tmp_path / "initial")
    perturb(ours)
    inputs = model_inputs("llama")
    want = logits(ours, inputs)
    ours.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    saved = dt.LoraConfig.from_pretrained(tmp_path / "plain")
    assert saved.rank_pattern == {"v_proj": 4} and math.isclose(saved.lora_alpha, 6 * math.sqrt(2))
    for loader in (dt.PeftModel, peft.PeftModel):
        loaded = quiet(loader.from_pretrained, make_model("llama"), tmp_path / "plain")
        assert torch.allclose(logits(loaded, inputs), want, atol=1e-5), loader
    assert ours.peft_config["default"].r == 4  # the live adapter keeps its settings


def test_conversion_refuses_the_initial_state_of_another_adapter(tmp_path):
    ours = quiet(dt.get_peft_model, make_model("llama"), dt.LoraConfig(r=4, target_modules=["q_proj"],
                                                                     init_lora_weights="pissa"))
    other = quiet(dt.get_peft_model, make_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="initial state of another adapter"):
        ours.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="is not a folder"):
        ours.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "none"))
    assert not (tmp_path / "out").exists()


# ---- bad input: a clear error, the model unchanged ----------------------------------------------------------------


def _quantized_llama() -> nn.Module:
    model = make_model("llama")
    quantize_model(model)
    return model


BAD = [
    ("loftq without config", make_model, dict(init_lora_weights="loftq"), "needs loftq_config"),
    ("loftq 2 bits", make_model, dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 2, "loftq_iter": 1}),
     "4 \\(NF4\\) or 8"),
    ("loftq zero rounds", make_model, dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 0}),
     "loftq_iter must be a positive"),
    ("niter typo", make_model, dict(init_lora_weights="pissa_niter_x"), "pissa_niter_K"),
    ("loftq on a quantized base", _quantized_llama, dict(init_lora_weights="loftq",
                                                         loftq_config={"loftq_bits": 4}), "load the model unquantized"),
    ("pissa on a quantized base", _quantized_llama, dict(init_lora_weights="pissa"), "quantize the residual"),
    ("rank above the width", make_model, dict(init_lora_weights="pissa", r=40), "Choose r <= 32"),
]


@pytest.mark.parametrize("what,maker,config,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_before_any_change(what, maker, config, message):
    model = maker("llama") if maker is make_model else maker()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        dt.get_peft_model(model, dt.LoraConfig(**{"target_modules": ["q_proj", "v_proj"], **config}))
    assert_unchanged(model, before)


def test_conv_target_and_loftq_beside_another_adapter_are_refused_unchanged():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3))
    before = snapshot(conv)
    with pytest.raises(ValueError, match="works on linear layers"):
        dt.get_peft_model(conv, dt.LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa"))
    assert_unchanged(conv, before)
    model = dt.get_peft_model(make_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="add the LoftQ adapter first"):
        model.add_adapter("loftq", dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="loftq",
                                                 loftq_config={"loftq_bits": 4}))
    assert_unchanged(model, before)


def test_a_failure_half_way_gives_the_residual_bases_their_weights_back(monkeypatch):
    from deltatune.methods import lora as lora_module

    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    real = lora_module.LoraLayer.add_adapter

    def fail_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lora_module.LoraLayer, "add_adapter", fail_third)
    with pytest.raises(RuntimeError, match="simulated"):
        dt.get_peft_model(model, dt.LoraConfig(r=4, target_modules=TARGETS["llama"], init_lora_weights="pissa"))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.allclose(after[k], before[k], atol=1e-6) for k in before)
