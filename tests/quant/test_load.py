"""Loading an HF safetensors folder straight into 4 bits: same result as quantizing in memory, bounded peak memory.

Memory is measured as the peak resident set size of a fresh process (Linux VmHWM, reset through
/proc/self/clear_refs right before the load) minus its resident size at that moment. The loader reads tensors
with plain reads, not a memory map, so file pages do not inflate the figure. glibc's mmap threshold is pinned at
128 KiB in that process: by default it rises after each large free and then keeps freed blocks resident, so RSS
would count memory the loader no longer holds. Everything else (Python objects, code tables, scratch) counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune.quant import Linear4bit, load_quantized, quantize_model
from deltatune.quant.load import iter_safetensors
from tests.conftest import logits, make_model, model_inputs


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("tie", [False, True])
def test_streamed_load_equals_quantizing_in_memory(tmp_path, tie, quant_type):
    model = make_model("llama")
    if tie:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = load_quantized(tmp_path, quant_type=quant_type)
    reference = quantize_model(model, quant_type=quant_type)
    assert sum(isinstance(m, Linear4bit) for m in loaded.modules()) == 14
    for (name, a), (_, b) in zip(loaded.named_modules(), reference.named_modules(), strict=True):
        if isinstance(a, Linear4bit):
            assert torch.equal(a.dequantized_weight(), b.dequantized_weight()), name
    inputs = model_inputs("llama")
    assert torch.equal(logits(loaded, inputs), logits(reference, inputs))
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_reader_matches_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(7),
               "d": torch.zeros(0)}
    save_file(tensors, tmp_path / "x.safetensors")
    ours = dict(iter_safetensors(tmp_path / "x.safetensors"))
    for k, v in load_file(tmp_path / "x.safetensors").items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_quantized(tmp_path)
    model = make_model("llama")
    model.save_pretrained(tmp_path)
    model.config.intermediate_size = 64
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="shape"):
        load_quantized(tmp_path)


PROBE = textwrap.dedent("""
    import json, sys, torch
    import transformers, deltatune.quant as q
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    # warm up on a tiny checkpoint of the same architecture: transformers imports the model code lazily
    # (~100 MB of modules) and the first call of each torch kernel pages its machine code in; neither is
    # the load's memory, and the code paged in differs between CPUs
    q.load_quantized(sys.argv[2])
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    base = rss("VmRSS")
    model = q.load_quantized(sys.argv[1])
    peak = rss("VmHWM")
    final = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps({"base": base, "peak": peak, "final": final}))
""")


def test_peak_memory_stays_near_the_quantized_size(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8)
    with torch.device("meta"):  # only for the names and shapes; random values are cheaper than HF's init
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    save_file({k: torch.randn(s) * 0.02 for k, s in shapes.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # ~310 MB of fp32, 97% in linear layers
    config.save_pretrained(tmp_path)
    make_model("llama").save_pretrained(tmp_path / "tiny")
    largest = max(t.numel() * t.element_size() for _, t in iter_safetensors(tmp_path / "model.safetensors"))
    result = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), str(tmp_path / "tiny")], capture_output=True,
                            text=True, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    m = json.loads(result.stdout.strip().splitlines()[-1])
    used = m["peak"] - m["base"]
    print(f"peak {used / 2**20:.1f} MiB, final {m['final'] / 2**20:.1f} MiB, largest {largest / 2**20:.1f} MiB")
    assert used <= 1.3 * m["final"] + largest
    assert used < 0.3 * sum(t.numel() * 4 for _, t in iter_safetensors(tmp_path / "model.safetensors"))
