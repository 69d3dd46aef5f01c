"""LoRA: a frozen weight W0 plus a trained low-rank update, h = W0 x + (alpha / r) B A x.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", section 4.1. A is
initialised randomly and B at zero, so the adapted model starts out equal to the base model.
rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) instead, which keeps the update's size
stable as r grows.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter_layer import BASE_ADAPTER, check_batch_size, inside_adapter_layer, replace_module, rows_by_adapter
from ..config import PeftConfig
from ..targets import (
    default_target_modules,
    find_targets,
    gpt2_conv1d_class,
    is_linear_like,
    is_quantized,
    resolve_pattern,
)

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian")


@dataclass
class LoraConfig(PeftConfig):
    """LoRA settings; field names and defaults are HF PEFT's.

    Attributes:
        r: rank of the update B A.
        target_modules: module names (list: equal or dotted suffix), a full-match regex (str), or
            "all-linear". None picks the architecture's default (e.g. q_proj, v_proj for Llama).
        exclude_modules: names (same rules) never to adapt.
        lora_alpha: the update is scaled by lora_alpha / r (or / sqrt(r) with use_rslora).
        lora_dropout: dropout on the input of A.
        fan_in_fan_out: the base weight is stored (in, out), as in GPT-2's Conv1D.
        bias: "none", "all" (train every bias) or "lora_only" (biases of adapted layers).
        use_rslora: scale by alpha / sqrt(r).
        init_lora_weights: True (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r), B zero),
            or False (both random: the adapter changes the output from the start; for tests).
        layers_to_transform: only adapt blocks with these indices.
        layers_pattern: name of the block container ("layers", "h", ...) for layers_to_transform.
        rank_pattern: {name regex: r} overrides per module.
        alpha_pattern: {name regex: alpha} overrides per module.
    """

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.peft_type = "LORA"
        super().__post_init__()
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer (the LoRA rank), got {self.r!r}.")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}.")
        if self.init_lora_weights not in INIT_MODES:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True, False or 'gaussian'."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform needs target_modules as a list of names (a regex can select layers itself); "
                "PEFT refuses this combination too, so such an adapter could not be shared."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only has a meaning together with layers_to_transform.")


def _kind(base: nn.Module) -> str:
    """'linear', 'conv' or 'embedding': how LoRA attaches to this base layer."""
    if is_linear_like(base):
        return "linear"
    if isinstance(base, nn.Embedding):
        return "embedding"
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if base.groups != 1:
            raise ValueError(f"LoRA on a grouped convolution (groups={base.groups}) is not supported.")
        return "conv"
    raise ValueError(
        f"LoRA cannot wrap a {type(base).__name__}; supported layers are nn.Linear, nn.Embedding, "
        "nn.Conv1d/2d/3d and transformers' Conv1D. Choose target_modules that name such layers."
    )


def _features(base: nn.Module, kind: str) -> tuple[int, int]:
    """(in, out) sizes: features, channels, or (num_embeddings, embedding_dim)."""
    if kind == "embedding":
        return base.num_embeddings, base.embedding_dim
    if kind == "conv":
        return base.in_channels, base.out_channels
    if isinstance(base, nn.Linear) or is_quantized(base):
        return base.in_features, base.out_features
    return base.weight.shape[0], base.weight.shape[1]  # GPT-2 Conv1D stores (in, out)


def _adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters train in the base dtype when it is fp32/fp64, otherwise in fp32 (as PEFT does)."""
    weight = getattr(base, "weight", None)
    if weight is not None and weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32


def _frozen_weight_and_state(base: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For a forward: the (out, in) weight of a frozen nn.Linear in ``dtype``, or a quantized layer's weight rebuilt,
    with what the backward's :func:`_frozen_weight` may reuse (a quantized layer's block scales)."""
    if isinstance(base, nn.Linear):
        return base.weight.to(dtype), None
    return base.transient_weight_and_state(dtype)


def _frozen_weight(base: nn.Module, dtype: torch.dtype, state: torch.Tensor | None) -> torch.Tensor:
    """For a backward: the same weight again (a quantized layer's copy is safe to keep under create_graph)."""
    if isinstance(base, nn.Linear):
        return base.weight.to(dtype)
    return base.transient_weight(dtype, state)


def _runs_plain(module: nn.Module) -> bool:
    """No hook and no replaced ``forward`` on ``module`` (nor global module hooks): calling around it changes nothing.

    accelerate's offloading, for one, swaps a module's ``forward`` to bring its weights in; the fused path must
    then not read the weights behind its back.
    """
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


class _FusedLoraLinear(torch.autograd.Function):
    """``base(x) + scaling * B A dropout(x)`` as one autograd node, for a frozen nn.Linear or quantized base.

    Why: as separate modules, a training step pays per layer for four graph nodes, a copy of the base output to add
    the update to, and a second gradient for x (base and LoRA parts) that autograd then adds together. Here the
    update is added inside the GEMM (``addmm_``) in both directions, and a quantized base rebuilds its weight in
    backward from block scales kept from forward. On the step benchmarks (SmolLM2-135M shape, all linear layers,
    CPU) this took QLoRA from 1.003 to 0.968 of PEFT + bitsandbytes' time and LoRA from 0.991 to 0.95 of PEFT's.

    ``x_lora`` is ``dropout(x)`` when dropout is on, else None (then x feeds both paths and gets one summed
    gradient); dropout stays outside so autograd takes its mask into account. ``dtype`` is what every product runs
    in: the input's, or autocast's (bf16), which then casts the input, weights and adapter the way autocast would.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_lora: torch.Tensor | None, lora_a: torch.Tensor,  # noqa: ANN001
                lora_b: torch.Tensor, base: nn.Module, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        weight, state = _frozen_weight_and_state(base, dtype)
        flat_x = x.reshape(-1, x.shape[-1]).to(dtype)
        lora_in = flat_x if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1]).to(dtype)
        lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        out = F.linear(flat_x, weight, bias)
        # A x^T as (r, tokens): with r this small, MKL is 1.5-3x faster in this layout than x A^T (and for B's
        # gradient below), measured on the SmolLM2 shapes
        after_a_t = lora_a @ lora_in.t()
        out.addmm_(after_a_t.t(), lora_b.t(), alpha=scaling)
        ctx.save_for_backward(lora_in, lora_a, lora_b, after_a_t)
        ctx.base, ctx.state, ctx.scaling, ctx.separate_lora_input = base, state, scaling, x_lora is not None
        ctx.input_dtypes = (x.dtype, None if x_lora is None else x_lora.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        lora_in, lora_a, lora_b, after_a_t = ctx.saved_tensors  # all in the products' dtype
        needs_x, needs_x_lora, needs_a, needs_b = ctx.needs_input_grad[:4]
        x_dtype, x_lora_dtype = ctx.input_dtypes
        flat_grad = grad.reshape(-1, grad.shape[-1]).to(lora_in.dtype)
        grad_after_a = (flat_grad @ lora_b).mul_(ctx.scaling)  # (tokens, r), already scaled
        grad_a = grad_after_a.t() @ lora_in if needs_a else None
        grad_b = (after_a_t @ flat_grad).mul_(ctx.scaling).t() if needs_b else None
        grad_x = grad_x_lora = None
        if needs_x:
            grad_x = flat_grad @ _frozen_weight(ctx.base, lora_in.dtype, ctx.state)
            if not ctx.separate_lora_input:
                grad_x.addmm_(grad_after_a, lora_a)
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1]).to(x_dtype)
        if ctx.separate_lora_input and needs_x_lora:
            grad_x_lora = (grad_after_a @ lora_a).view(*grad.shape[:-1], lora_a.shape[-1]).to(x_lora_dtype)
        return grad_x, grad_x_lora, grad_a, grad_b, None, None, None


class LoraLayer(nn.Module):
    """Wraps one Linear, Conv1D, ConvNd or Embedding and adds any number of named LoRA adapters."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = _kind(base_layer)
        # whether the base layer's output is a fresh tensor its backward does not need (see _add_lora)
        conv1d = gpt2_conv1d_class()
        self._result_is_scratch = type(base_layer) is nn.Linear or (conv1d is not None and type(base_layer) is conv1d)
        # whether training steps may take `_FusedLoraLinear` (see `_fused_call` for the per-call conditions)
        self._fusable = type(base_layer) is nn.Linear or callable(
            getattr(base_layer, "transient_weight_and_state", None))
        self.in_features, self.out_features = _features(base_layer, self.kind)
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.batch_adapter_names: list[str] | None = None

    # Read-through so code that inspects q_proj.weight keeps working on a wrapped model.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_names(self) -> list[str]:
        return list(self.r)

    def add_adapter(
        self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True, use_rslora: bool = False,
    ) -> None:
        """Create adapter ``name`` with rank ``r``; it is not activated here."""
        if name in self.r:
            raise ValueError(f"This layer already has an adapter named {name!r}.")
        base_weight = self.base_layer.weight
        factory = {"device": base_weight.device, "dtype": _adapter_dtype(self.base_layer)}
        if self.kind == "embedding":
            self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, self.in_features, **factory))
            self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, r, **factory))
        elif self.kind == "conv":
            conv = type(self.base_layer)
            base = self.base_layer
            self.lora_A[name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                     base.dilation, bias=False, **factory)
            self.lora_B[name] = conv(r, self.out_features, 1, 1, bias=False, **factory)
        else:
            self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
            self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.reset_lora_parameters(name, init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, name: str, init_lora_weights: bool | str) -> None:
        """B = 0 so the adapter starts as a no-op (embeddings swap roles: A = 0, B ~ N(0, 1))."""
        if init_lora_weights is False:
            return
        if self.kind == "embedding":
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged; unmerge it before deleting it.")
        for store in (self.lora_A, self.lora_B, self.lora_embedding_A, self.lora_embedding_B, self.lora_dropout):
            if adapter_name in store:
                del store[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name not in self.r:
            return {}
        if self.kind == "embedding":
            return {"lora_embedding_A": self.lora_embedding_A[adapter_name],
                    "lora_embedding_B": self.lora_embedding_B[adapter_name]}
        return {"lora_A.weight": self.lora_A[adapter_name].weight, "lora_B.weight": self.lora_B[adapter_name].weight}

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A, shaped like the base weight."""
        if self.kind == "embedding":
            delta = (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T  # (num_embeddings, dim)
        else:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])  # B is 1x1 for convs
            if self.fan_in_fan_out:
                delta = delta.T
        return delta * self.scaling[name]

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight as floats (dequantized when the base is quantized)."""
        if is_quantized(self.base_layer):
            return self.base_layer.dequantized_weight(torch.float32)
        return self.base_layer.weight.detach()

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weight: W0 <- W0 + scaling B A (no extra inference cost)."""
        if is_quantized(self.base_layer):
            raise ValueError(
                "The base layer is quantized; adding the update to its 4/8-bit codes would round it away. "
                "Use merge_and_unload(), which returns a dequantized layer with the update added."
            )
        weight = self.base_layer.weight
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name not in self.r or name in self.merged_adapters:
                continue
            delta = self.delta_weight(name).to(weight.dtype)
            if safe_merge:
                merged = weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"Merging adapter {name!r} would put NaN/Inf into the weight; nothing merged.")
                weight.data.copy_(merged)
            else:
                weight.data += delta
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged adapters again, newest first (exact up to float rounding)."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data -= self.delta_weight(name).to(weight.dtype)

    @torch.no_grad()
    def unwrapped(self, merge: bool) -> nn.Module:
        """The module that replaces this layer on unload; merged, a quantized base becomes a float Linear."""
        if not merge:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer
        if not is_quantized(self.base_layer):
            self.merge()
            return self.base_layer
        deltas = [self.delta_weight(name) for name in self.active_adapters if name in self.r]
        return self.base_layer.to_linear(getattr(self.base_layer, "compute_dtype", None) or torch.float32, deltas)

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """scaling * B A dropout(x), the adapter's contribution to the output."""
        if self.kind == "embedding":
            base = self.base_layer
            after_a = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm,
                                  base.norm_type, base.scale_grad_by_freq, base.sparse)  # (..., r)
            return (after_a * self.scaling[name]) @ self.lora_embedding_B[name].T
        lora_a = self.lora_A[name]
        x = x.to(lora_a.weight.dtype)
        # Scale the r-wide intermediate rather than the out-wide result: same value, fewer flops.
        return self.lora_B[name](lora_a(self.lora_dropout[name](x)) * self.scaling[name])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            if self.merged_adapters:
                raise ValueError("A mixed batch (adapter_names=...) cannot run on merged adapters; unmerge first.")
            return self._mixed_batch_forward(x, *args, **kwargs)
        fused = None if args or kwargs else self._fused_call(x)
        if fused is not None:
            name, dtype = fused
            dropout = self.lora_dropout[name]
            x_lora = None if isinstance(dropout, nn.Identity) else dropout(x)
            return _FusedLoraLinear.apply(x, x_lora, self.lora_A[name].weight, self.lora_B[name].weight,
                                          self.base_layer, self.scaling[name], dtype)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged_adapters:
            return result
        for name in self.active_adapters:
            if name in self.r:
                result = self._add_lora(name, x, result)
        return result

    def _fused_call(self, x: torch.Tensor) -> tuple[str, torch.dtype] | None:
        """The adapter to run through `_FusedLoraLinear` in this call and the dtype of its products, or None for the
        module-by-module path.

        Fused: a training forward (grad enabled) of a frozen nn.Linear or quantized base with exactly one active,
        unmerged adapter, where the input, the adapter and the base's matmul share a dtype, or autocast (bf16/fp16)
        decides it for all of them, as it would cast each matmul.
        """
        if not self._fusable or not torch.is_grad_enabled() or len(self.active_adapters) != 1 or self.merged_adapters:
            return None
        name = self.active_adapters[0]
        if name not in self.r:
            return None
        base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
        device = x.device.type
        if torch.is_autocast_enabled(device):
            if not x.is_floating_point():
                return None
            dtype = torch.get_autocast_dtype(device)
        else:
            dtype = x.dtype
            matmul_dtype = base.weight.dtype if isinstance(base, nn.Linear) else base.compute_dtype or dtype
            if not (dtype == matmul_dtype == lora_a.weight.dtype == lora_b.weight.dtype):
                return None
        # the base's own weight and bias (a quantized weight is buffers in a submodule, never trainable)
        if any(p is not None and p.requires_grad for p in base._parameters.values()):
            return None
        if not (_runs_plain(base) and _runs_plain(lora_a) and _runs_plain(lora_b)):
            return None
        return name, dtype

    def _add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + scaling * B A dropout(x).

        For linear layers the final matmul and the addition are one ``addmm`` (the add happens
        inside the GEMM), which saves a pass over the out-wide result in forward and backward.
        The base output of nn.Linear / Conv1D is not kept for their backward, so the add may write
        into it in place (autograd's version check would raise, not mislead, if that ever changed).
        """
        lora_a = self.lora_A[name] if self.kind == "linear" else None
        if lora_a is None or result.dtype != lora_a.weight.dtype or result.dim() < 2:
            return result + self.lora_output(name, x).to(result.dtype)
        after_a = lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))  # (..., r)
        after_a = after_a.reshape(-1, after_a.shape[-1])  # (tokens, r)
        up = self.lora_B[name].weight.t()  # (r, out)
        if self._result_is_scratch and result.is_contiguous() and not result._is_view():
            result.view(-1, result.shape[-1]).addmm_(after_a, up, alpha=self.scaling[name])
            return result
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), after_a, up, alpha=self.scaling[name])
        return flat.view(result.shape)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each batch row gets its own adapter (or none, for '__base__')."""
        result = self.base_layer(x, *args, **kwargs)
        check_batch_size(self.batch_adapter_names, x.shape[0])
        for name, rows in rows_by_adapter(self.batch_adapter_names, x.device).items():
            if name == BASE_ADAPTER or name not in self.r:
                continue
            result = result.index_add(0, rows, self.lora_output(name, x[rows]).to(result.dtype))
        return result

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling}"


def _fan_in_fan_out_for(base: nn.Module, config: LoraConfig, name: str) -> bool:
    """GPT-2's Conv1D stores its weight transposed; PEFT corrects a wrong flag with a warning."""
    conv1d = gpt2_conv1d_class()
    if conv1d is not None and isinstance(base, conv1d):
        if not config.fan_in_fan_out:
            warnings.warn(f"{name} is a Conv1D (weight stored in x out); setting fan_in_fan_out=True.", stacklevel=3)
            config.fan_in_fan_out = True
        return True
    if config.fan_in_fan_out and isinstance(base, nn.Linear):
        warnings.warn(f"{name} is an nn.Linear; fan_in_fan_out=True does not apply and is set to False.", stacklevel=3)
        config.fan_in_fan_out = False
    return False


def attach(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Add LoRA adapter ``adapter_name`` to every module ``config`` targets; returns their names.

    Every target is checked before the first layer is swapped, so a bad config leaves the model as it was.
    """
    if config.target_modules is None:
        config.target_modules = default_target_modules(model)
    names = find_targets(
        model, config.target_modules, exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
        skip_inside=inside_adapter_layer(model), skip=config.modules_to_save or (),
    )
    plans = []
    for name in names:
        module = model.get_submodule(name)
        existing = module if isinstance(module, LoraLayer) else None
        base = existing.base_layer if existing else module
        _kind(base)  # raises for unsupported layer types, naming them
        if existing and adapter_name in existing.r:
            raise ValueError(f"{name} already has an adapter named {adapter_name!r}; pick another name.")
        plans.append((name, existing, base))
    for name, existing, base in plans:
        layer = existing or LoraLayer(base, fan_in_fan_out=_fan_in_fan_out_for(base, config, name))
        layer.add_adapter(
            adapter_name,
            r=resolve_pattern(config.rank_pattern, name, config.r),
            lora_alpha=resolve_pattern(config.alpha_pattern, name, config.lora_alpha),
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
            use_rslora=config.use_rslora,
        )
        if existing is None:
            replace_module(model, name, layer)
    return names
