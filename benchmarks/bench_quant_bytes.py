"""Stored bytes of every quantized linear weight in a SmolLM2-135M-shaped model: deltatune NF4 vs bitsandbytes.

Both quantize the same random weights with NF4, blocksize 64 and double quantization. For bitsandbytes every tensor
a 4-bit layer stores is counted (packed weight, absmax, nested absmax, nested code, offset, code), which is what
its state_dict writes; deltatune stores the same codes and scales but shares its two code tables across layers.
Also times dequantize+matmul of one 576x1536 layer against bitsandbytes' CPU path, interleaved.

    python benchmarks/bench_quant_bytes.py
"""

from __future__ import annotations

import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune.quant import Linear4bit, quantize_model


def smollm2_shape() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def bnb_bytes(linear: nn.Linear) -> int:
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(linear.weight.data, blocksize=64, compress_statistics=True, quant_type="nf4")
    tensors = [packed, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


def bytes_report() -> None:
    model = smollm2_shape()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not model.lm_head}
    theirs = sum(bnb_bytes(m) for m in linears.values())
    params = sum(m.weight.numel() for m in linears.values())
    quantize_model(model)
    ours = sum(m.weight.nbytes for m in model.modules() if isinstance(m, Linear4bit))
    print(f"{len(linears)} linear layers, {params:,} weights")
    print(f"deltatune     {ours:>12,} bytes  {8 * ours / params:.4f} bits/weight")
    print(f"bitsandbytes  {theirs:>12,} bytes  {8 * theirs / params:.4f} bits/weight")
    print(f"ratio deltatune/bitsandbytes = {ours / theirs:.4f}")


def timing_report(tokens: int = 512, repeats: int = 30) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=False)
    ours = Linear4bit.from_linear(linear)
    packed, state = F.quantize_4bit(linear.weight.data, blocksize=64, compress_statistics=True, quant_type="nf4")
    x = torch.randn(tokens, 576)
    cases = {
        "deltatune dequantize": lambda: ours.dequantized_weight(),
        "bnb dequantize_4bit": lambda: F.dequantize_4bit(packed, state),
        "deltatune forward": lambda: ours(x),
        "bnb matmul_4bit": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state),
    }
    times = {k: [] for k in cases}
    with torch.no_grad():
        for f in cases.values():
            f()
        for _ in range(repeats):  # interleaved, so load from other processes hits both alike
            for name, f in cases.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    print(f"576x1536 layer, {tokens} tokens, fp32, {torch.get_num_threads()} threads, median of {repeats}:")
    for name, ts in times.items():
        print(f"  {name:22s} {1e3 * sorted(ts)[len(ts) // 2]:.3f} ms")


if __name__ == "__main__":
    bytes_report()
    timing_report()
