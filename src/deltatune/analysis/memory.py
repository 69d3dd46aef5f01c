"""How much memory a training run will take, from the model's config alone (``deltatune estimate``, issue 12).

The estimate is the peak resident memory (RSS) of a CPU training process, as the sum of five terms::

    total = weights + gradients + optimizer + activations + baseline

* **weights**: every parameter and buffer of the model as it is trained: float32 (``deltatune train`` loads the
  base in float32 and ``--precision bf16`` is autocast, so the weights stay float32), or, for ``qlora``, the NF4
  codes with their double-quantized block scales for the linear layers (the output head stays float, as in
  QLoRA), plus the per-thread scratch the 4-bit layers decode into (8 bytes per weight of the largest layer).
* **gradients**: 4 bytes per trainable parameter (trainable parameters are float32 in every method).
* **optimizer**: AdamW keeps two float32 moments per trainable parameter (8 bytes); plain SGD (no momentum) none.
* **activations**: what autograd keeps between forward and backward, plus the loss's transients (formula below).
* **baseline**: the process itself: the Python interpreter with torch, transformers and deltatune imported, the
  model code and the tokenizer (measured), plus the runtime's growth during the first steps (fitted); see
  ``BASELINE_BYTES``.

Parameters are counted exactly without reading any weight: the model is built from its config on the ``meta``
device (``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``), quantized there for ``qlora``
(``quant.quantize_model`` makes empty shells of the right byte size), and wrapped by ``get_peft_model`` with the
method's config, so ``trainable_params`` is ``get_nb_trainable_parameters()[0]`` of the same setup by construction
(for ``full``: every parameter, the tied embedding counted once).

Activations, per sequence of ``T'`` tokens (``T + num_virtual_tokens`` for prompt and P-tuning, whose virtual
tokens run through every layer; ``T`` for prefix tuning, whose prefix only lengthens the keys and values), with
``h`` hidden size, ``i`` MLP size, ``q = heads * head_dim``, ``kv = kv_heads * head_dim``, ``L`` layers, ``V``
vocabulary and ``s`` bytes per kept element (4 in float32; ``BF16_ELEMENT_BYTES`` under bf16 autocast)::

    per layer and token  a = s * (2h + 3i + 2q + 2kv) + s * extra      (gated MLP; 2i for a plain MLP)
    forward              F = L * a + 2h * s                          (what the forward computes for the layers)
    no checkpointing     activations = B * T' * (F + (KEPT_RSS_FACTOR - 1) * F) + logits
    checkpointing        activations = B * T' * (L * h * s + a + 2h * s + (KEPT_RSS_FACTOR - 1) * F) + logits
    logits               LOGITS_COPIES * B * T' * V * 4  (+ B * T' * V * 2 under bf16 autocast)

``2h + 3i + 2q + 2kv`` is what a Llama decoder layer (transformers 5, SDPA attention) keeps for backward through
*frozen* weights: the inputs of its two RMSNorms, the gate and up outputs and the SiLU output (the product's
operands), the query before and after RoPE, key and value (before GQA repetition). ``extra`` is what the
trainable part adds: a weight that trains keeps its layer's input (full fine-tuning: the q/k/v input, the o
input, the gate/up input and the down input, ``3h + i`` on Llama; shared inputs counted once), a LoRA target
keeps its input for ``lora_A`` plus ``r`` values (with dropout its dropped copy and mask instead of the input;
without dropout and checkpointing, q/k/v, gate/up and down_proj in a block with RMSNorm rebuild their input in
backward instead, ``methods/lora_inputs.py``), an (IA)^3 vector keeps the tensor it scales, a bottleneck adapter
its input and its two small hidden tensors. These counts were read off autograd's saved tensors (on a
SmolLM2-shaped model; now :func:`saved_tensor_bytes`) and agree with them within 8%.
With gradient checkpointing a layer keeps only its input (``h``); backward recomputes one layer at a time, whose
full ``a`` is alive while it runs. ``2h * s`` is the final norm.

``(KEPT_RSS_FACTOR - 1) * F`` (``KEPT_RSS_FACTOR = 1.25``): the process's RSS grows by more than autograd keeps,
because the forward's freed temporaries (matmul outputs, residual sums, norm intermediates, 4-bit dequantized
weights) lie between live tensors in the C allocator's heap and are not given back to the system; backward then
reuses that heap. Measured, not fitted to the peak: RSS growth over one forward divided by the saved tensors'
bytes (logits aside), 1.22-1.29 over LoRA q,v / all-linear, (IA)^3 and QLoRA on SmolLM2-135M at 128 and 512
tokens. With checkpointing the forward computes the same layers and frees them, and the heap it leaves is of the
same order: 0.2-0.4 of ``F`` measured (56 MiB for LoRA all-linear at 128 tokens; 111 MiB (IA)^3, 370-390 MiB LoRA
all-linear and QLoRA at 512), so the same quarter of ``F`` is added (a choice made with the benchmark's
checkpointing cases in view); it varies more with the allocator's history than without checkpointing.

The loss: the float32 logits (``B * T' * V``, 192 KiB per token for SmolLM2's 49,152-token vocabulary) are kept
by ``log_softmax``'s output, and backward adds the gradient of that output and of the logits:
``LOGITS_COPIES = 3`` copies are alive at once (measured: the backward's peak RSS is 2.0 logits sizes above the
RSS after the forward, 48 MiB at 128 tokens and 192 MiB at 512, in every adapter case probed). This, and not the layers'
backward, is the backward's transient peak on a large-vocabulary model: the layers' own backward temporaries reuse
the heap the forward left behind.

Fitted constants: only the runtime part of ``BASELINE_BYTES`` (see there); ``BF16_ELEMENT_BYTES`` was read off saved
tensors and ``KEPT_RSS_FACTOR`` off the RSS of forwards. Everything else is counted or derived from the code. The
sum is an upper bound where gradients and activations do not coexist in full (full fine-tuning at long sequences:
backward frees activations as it fills gradients), so it errs high there (+8% at 512 tokens); at short sequences
full fine-tuning's peak comes ~200 MiB above the counted terms (the backward's gradient writes and AdamW's step
temporaries over the heap the forward left), which is not modelled (-7% at 128 tokens).
Validated against measured peak RSS of real runs of SmolLM2-135M on CPU by ``benchmarks/bench_estimate.py``
(the README's "Memory estimate" table). The estimate assumes one process, batch ``B`` per step (a gradient
accumulation step frees its activations before the next, so ``--grad-accum`` does not change the peak) and the
training loop of ``deltatune train`` (outputs dropped before backward).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from ..dropout import mask_bytes_per_element
from ..methods import METHODS, Method

OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
EXTRA_METHODS = ("full", "qlora")  # besides the registry's --method names
LOGITS_COPIES = 3
# Resident bytes per byte of layer activations autograd keeps: the forward's freed temporaries (matmul outputs,
# residual sums, norm intermediates) lie between the kept tensors in the C allocator's heap, so the process does not
# give them back. Measured, not fitted to the peak: the RSS growth over one forward divided by the saved tensors'
# bytes (both less the logits), on SmolLM2-135M at 128 and 512 tokens: 1.22-1.23 (LoRA all-linear), 1.23 ((IA)^3,
# 512), 1.27-1.29 (LoRA q,v; QLoRA at 512); 1.25 is their median.
KEPT_RSS_FACTOR = 1.25
# Bytes per element kept for backward under bf16 autocast: the matmul outputs are bf16 but the RMSNorm inputs
# and the softmax statistics stay float32; 2.8 is the ratio read off the saved tensors of a SmolLM2-shaped layer
# (bf16 ~0.70x the float32 bytes), not fitted to RSS.
BF16_ELEMENT_BYTES = 2.8
# The process apart from the model's tensors, in two parts. Measured: python + torch + transformers + deltatune
# imported, the model's code and the tokenizer loaded = RSS before the first step minus the weights, 386 MiB for
# SmolLM2-135M (bench_estimate.py's children). Fitted: what the training steps add on top of the five terms
# (autograd engine, oneDNN/OpenMP scratch, allocator slack the other terms do not cover), 49 MiB = the median
# residual (measured peak - weights - gradients - optimizer - activations - 386 MiB) over all 34 cases of
# bench_estimate.py (9 setups x 2 lengths x with/without checkpointing; residuals -7..139 MiB except full
# fine-tuning, -209..250, and QLoRA with checkpointing at 512 tokens, 189; prefix tuning has no checkpointing
# cases). Depends on the machine and library versions, not on the model size.
BASELINE_BYTES = (386 + 49) * 2**20
# LoRA targets whose input (an RMSNorm output, the gated MLP's product) the fused node rebuilds in backward.
REBUILT_INPUTS = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
# Modules that read the same input tensor, so keeping it for one keeps it for all (counted once).
SHARED_INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in",
                 "up_proj": "mlp_in", "w1": "mlp_in", "w3": "mlp_in"}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training run's peak memory, by term (see the module docstring), and what trains.

    ``total_bytes`` is the sum of the five byte terms; ``trainable_params`` equals
    ``get_nb_trainable_parameters()[0]`` of the same setup.
    """

    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    baseline_bytes: int
    total_bytes: int
    trainable_params: int
    all_params: int
    method: str
    batch: int
    seq: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain numbers and text (what ``deltatune estimate --json`` writes)."""
        return dataclasses.asdict(self)


def cli_methods() -> dict[str, Method]:
    """``--method`` name -> registry entry (the methods that declare a command line)."""
    return {m.cli.name: m for m in METHODS.values() if m.cli is not None}


def method_names() -> tuple[str, ...]:
    """What ``estimate_memory(method=...)`` takes: full, qlora and every registered method."""
    return (*EXTRA_METHODS, *cli_methods())


def method_config(method: str, options: dict[str, Any] | None = None) -> PeftConfig | None:
    """The adapter config ``deltatune train --method METHOD`` would use, with ``options`` on top; None for full.

    ``qlora`` is LoRA (on a 4-bit base). ``options`` are keyed by the method's setting names (``r``,
    ``alpha``, ``bottleneck_size``, ...) or config fields, plus ``target_modules``; settings left out take the
    method's run defaults (LoRA: r 8, alpha 16, all-linear).

    Raises:
        ValueError: unknown method, a setting the method does not take, or a value its config refuses.
    """
    if method not in method_names():
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(method_names())}.")
    options = dict(options or {})
    if method == "full":
        if options:
            raise ValueError(f"--method full takes no adapter settings, got {', '.join(sorted(options))}.")
        return None
    entry = cli_methods()["lora" if method == "qlora" else method]
    declared = {opt.key: opt for opt in entry.cli.options}
    fields = {f.name for f in dataclasses.fields(entry.config_class)}
    values = {opt.field: opt.default for opt in entry.cli.options if opt.default is not None}
    if "target_modules" in fields and entry.cli.target_modules is not None:
        values["target_modules"] = entry.cli.target_modules
    for key, value in options.items():
        if value is None:
            continue
        name = declared[key].field if key in declared else key
        if name not in fields or name in ("peft_type", "task_type"):
            takes = ", ".join(sorted(declared) + (["target_modules"] if "target_modules" in fields else []))
            raise ValueError(f"--method {method} has no setting {key!r}; it takes {takes or 'none'}.")
        values[name] = value
    return entry.config_class(task_type="CAUSAL_LM", **values)


def model_config(model: Any = None) -> Any:
    """The transformers config of ``model`` (an HF folder, a .gguf file, None for the bundled default, or a config).

    Reads config.json, or only the metadata of a GGUF file: never a weight.

    Raises:
        FileNotFoundError: no such path, or a folder without config.json.
        ValueError: a config transformers cannot read (naming the file).
    """
    from transformers import AutoConfig, PretrainedConfig

    from ..formats.models import resolve_model

    if isinstance(model, PretrainedConfig):
        return model
    source = resolve_model(model)
    try:
        if source.gguf_file:
            return AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
        return AutoConfig.from_pretrained(source.directory)
    except (ValueError, KeyError, OSError, TypeError) as err:
        what = source.path if source.gguf_file else os.path.join(source.path, "config.json")
        raise ValueError(f"{what}: not a model config transformers can read ({' '.join(str(err).split())})") from err


def _check_numbers(batch: Any, seq: Any, optimizer: str, precision: str) -> None:
    for name, value in (("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}.")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}.")


def build_meta_model(config: Any, method: str, peft_config: PeftConfig | None) -> nn.Module:
    """The training setup on the ``meta`` device: base model, 4-bit shells for qlora, the adapter attached."""
    from transformers import AutoModelForCausalLM

    from ..quant.convert import quantize_model
    from ..tasks import get_peft_model

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as err:
        raise ValueError(f"model_type {getattr(config, 'model_type', None)!r} is not a causal language model "
                         f"transformers can build ({' '.join(str(err).split())})") from err
    if method == "qlora":
        quantize_model(model, bits=4, quant_type="nf4")
    if peft_config is None:
        return model
    return get_peft_model(model, peft_config)


def _count(model: nn.Module, method: str) -> tuple[int, int, int]:
    """(trainable params, all params, weight bytes) of the meta model; tied tensors counted once."""
    if method == "full":
        params = list(model.parameters())
        trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    else:
        trainable, total = model.get_nb_trainable_parameters()
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    if method == "qlora":  # the decode scratch: fp32 values + int64 gather index, sized by the largest layer
        from ..quant.nf4 import Weight4bit

        largest = max((2 * m.packed.numel() for m in model.modules() if isinstance(m, Weight4bit)), default=0)
        weight_bytes += 8 * largest
    return trainable, total, weight_bytes


def _in_out(module: nn.Module) -> tuple[int, int]:
    base = getattr(module, "base_layer", module)
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        out_f, in_f = weight.shape
        return (out_f, in_f) if isinstance(base, nn.Linear) else (in_f, out_f)  # transformers Conv1D: (in, out)
    return getattr(base, "out_features", 0), getattr(base, "in_features", 0)


def _first_layer(model: nn.Module, layers: int) -> nn.Module | None:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers:
            return module[0]
    return None


def _extra_per_token(model: nn.Module, method: str, layers: int, grad_checkpointing: bool) -> float:
    """Elements per token one decoder layer keeps beyond the frozen layer's (the ``extra`` of the docstring)."""
    layer = _first_layer(model, layers)
    if layer is None:
        return 0.0
    # without dropout and checkpointing, a LoRA layer reading an RMSNorm output or the gated MLP's product rebuilds
    # its input in backward from what the block keeps anyway (methods/lora_inputs.py) instead of keeping it
    rmsnorm = any(type(m).__name__.endswith("RMSNorm") for m in layer.modules())
    inputs: dict[str, int] = {}
    extra = 0.0
    for name, module in layer.named_modules():
        short = name.rsplit(".", 1)[-1]
        out_f, in_f = _in_out(module)
        if method == "full" and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            inputs[SHARED_INPUTS.get(short, name)] = in_f
        if not hasattr(module, "base_layer"):
            continue
        if method in ("lora", "qlora"):
            extra += sum(int(p.shape[0]) for n, p in module.named_parameters() if "lora_A" in n)
            dropouts = [d for d in module.modules() if isinstance(d, nn.Dropout) and d.p > 0]
            if dropouts:  # each module's own dropout: its output (4 bytes) and its mask (in units of 4 bytes)
                extra += in_f * (1 + mask_bytes_per_element(dropouts[0]) / 4)
            # with dropout the fused node keeps the dropped copy (counted above) in place of the input
            if not dropouts and (grad_checkpointing or not (rmsnorm and short in REBUILT_INPUTS)):
                inputs[SHARED_INPUTS.get(short, name)] = in_f
        elif method == "ia3":
            feedforward = any(getattr(module, "is_feedforward", {}).values())
            extra += in_f if feedforward else out_f
        elif method == "bottleneck":
            hidden = sum(int(p.shape[0]) for n, p in module.named_parameters() if "adapter_down" in n
                         and n.endswith("weight"))
            extra += out_f + 2 * hidden
    return float(extra + sum(inputs.values()))


def _activations(config: Any, model: nn.Module, method: str, peft_config: PeftConfig | None, batch: int, seq: int,
                 grad_checkpointing: bool, precision: str) -> int:
    """The activations term (module docstring)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    inner = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * h
    gated = any(name.endswith(("gate_proj", "w1", "gate_up_proj")) for name, _ in model.named_modules())
    s = 4.0 if precision == "fp32" else BF16_ELEMENT_BYTES
    tokens = seq + (peft_config.num_virtual_tokens if method in ("prompt", "ptuning") else 0)
    per_layer = s * (2 * h + (3 if gated else 2) * inner + 2 * heads * head_dim + 2 * kv_heads * head_dim
                     + _extra_per_token(model, method, layers, grad_checkpointing))
    computed = layers * per_layer + 2 * h * s  # what the forward allocates for the layers, kept or not
    kept = (layers * h * s + per_layer + 2 * h * s) if grad_checkpointing else computed
    logits = LOGITS_COPIES * vocab * 4 + (2 * vocab if precision == "bf16" else 0)
    total = batch * tokens * (kept + (KEPT_RSS_FACTOR - 1) * computed + logits)
    if method == "prefix":  # the prefix keys and values of every layer, and their gradients
        total += 2 * batch * layers * peft_config.num_virtual_tokens * 2 * kv_heads * head_dim * 4
    if precision == "bf16":  # autocast's bf16 copies of the float linear weights, kept for backward
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        total += 2 * (linear if not grad_checkpointing else linear / layers + vocab * h)
    return int(total)


def estimate_memory(model: Any = None, method: str = "lora", batch: int = 1, seq: int = 512,
                    grad_checkpointing: bool = False, optimizer: str = "adamw", precision: str = "fp32",
                    options: dict[str, Any] | None = None) -> MemoryEstimate:
    """Estimate the peak memory (bytes) of training ``model`` with ``method`` on batches of ``batch`` x ``seq`` tokens.

    Args:
        model: an HF model folder, a .gguf file, None (the bundled SmolLM2-135M-Instruct) or a transformers config.
            Only the config is read.
        method: "full", "qlora" (LoRA on an NF4 base) or a registered method ("lora", "ia3", "bottleneck",
            "prompt", "ptuning", "prefix").
        batch, seq: sequences per step and tokens per sequence (before any virtual tokens).
        grad_checkpointing: recompute each layer in backward (transformers' ``gradient_checkpointing_enable``).
        optimizer: "adamw" (two fp32 moments) or "sgd" (no momentum: no state).
        precision: "fp32" or "bf16" (autocast over float32 weights, as ``deltatune train --precision bf16``).
        options: the method's settings by their ``deltatune train`` names (``r``, ``alpha``, ``target_modules``,
            ``bottleneck_size``, ``num_virtual_tokens``, ...); see :func:`method_config`.

    Returns:
        A :class:`MemoryEstimate`; ``total_bytes = weights + gradients + optimizer + activations + baseline``.

    Raises:
        FileNotFoundError: the model path does not exist or a folder has no config.json.
        ValueError: an unknown method/optimizer/precision, a non-positive batch or seq, a setting the method does
            not take, an unreadable config, or prefix tuning with gradient checkpointing (which it does not support).
    """
    _check_numbers(batch, seq, optimizer, precision)
    peft_config = method_config(method, options)
    if method == "prefix" and grad_checkpointing:
        raise ValueError("prefix tuning does not work with gradient checkpointing (its keys and values enter every "
                         "layer's cache); estimate without it.")
    config = model_config(model)
    meta = build_meta_model(config, method, peft_config)
    trainable, all_params, weights = _count(meta, method)
    gradients = 4 * trainable
    optimizer_bytes = 8 * trainable if optimizer == "adamw" else 0
    activations = _activations(config, meta, method, peft_config, batch, seq, grad_checkpointing, precision)
    total = weights + gradients + optimizer_bytes + activations + BASELINE_BYTES
    return MemoryEstimate(weights, gradients, optimizer_bytes, activations, BASELINE_BYTES, total, trainable,
                          all_params, method, batch, seq)


def format_estimate(estimate: MemoryEstimate) -> str:
    """The estimate as the table ``deltatune estimate`` prints (MiB and GiB)."""
    rows = [("weights", estimate.weights_bytes), ("gradients", estimate.gradients_bytes),
            ("optimizer states", estimate.optimizer_bytes), ("activations", estimate.activations_bytes),
            ("process baseline", estimate.baseline_bytes), ("total", estimate.total_bytes)]
    lines = [f"method {estimate.method}, batch {estimate.batch} x {estimate.seq} tokens",
             f"{'term':<18}{'MiB':>10}{'GiB':>9}"]
    lines += [f"{name:<18}{size / 2**20:>10.1f}{size / 2**30:>9.2f}" for name, size in rows]
    share = 100 * estimate.trainable_params / max(estimate.all_params, 1)
    lines.append(f"trainable params: {estimate.trainable_params:,d} of {estimate.all_params:,d} ({share:.4f}%)")
    return "\n".join(lines)


def saved_tensor_bytes(output: torch.Tensor, exclude: nn.Module | None = None) -> int:
    """Bytes autograd keeps for the backward of ``output``: each distinct storage once, ``exclude``'s parameters and
    buffers left out. Call it after the forward, before ``backward()``.

    Measured, where :func:`estimate_memory` predicts. Read from the graph (every node's ``_saved_*`` tensors, a
    custom Function's ``saved_tensors`` and the tensors on its ctx) rather than with saved-tensor hooks, which change
    what is kept (deltatune's fused LoRA nodes keep their input instead of rebuilding it under such hooks) and also
    see tensors saved by graphs that are dropped at once.
    """
    skip = set() if exclude is None else {t.untyped_storage().data_ptr()
                                          for t in [*exclude.parameters(), *exclude.buffers()]}
    storages: dict[int, int] = {}

    def count(value: object) -> None:
        if isinstance(value, (tuple, list)):
            for item in value:
                count(item)
        elif isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in skip:
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()

    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for name in dir(node):
            if name.startswith("_saved_"):
                count(getattr(node, name))
        if hasattr(node, "saved_tensors") and hasattr(node, "__dict__"):  # a custom autograd Function's ctx
            count(node.saved_tensors)
            count(list(node.__dict__.values()))
        stack.extend(child for child, _ in node.next_functions)
    return sum(storages.values())
