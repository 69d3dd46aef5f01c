"""LoRA: a frozen weight W0 plus a trained low-rank update, h = W0 x + (alpha / r) B A x.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", section 4.1. A is
initialised randomly and B at zero, so the adapted model starts out equal to the base model.
rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) instead, which keeps the update's size
stable as r grows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter_layer import (
    BASE_ADAPTER,
    WeightedLayer,
    check_batch_size,
    inside_adapter_layer,
    replace_module,
    rows_by_adapter,
)
from ..dropout import SparseDropout
from ..func_transforms import func_transform_active
from ..quant.bnb import bnb_add_to_weight, bnb_dequantized_weight, bnb_weight_kind, call_base_layer
from ..targets import (
    fan_in_fan_out_for,
    find_targets,
    gpt2_conv1d_class,
    is_gpt2_conv1d,
    is_linear_like,
    is_quantized,
    resolve_pattern,
)
from . import lora_dora, lora_init, lora_slices
from .lora_config import (  # noqa: F401 - re-exported: LoRA's config is part of this method's API
    BIAS_MODES,
    INIT_MODES,
    PEFT_ONLY_INIT_MODES,
    UNSUPPORTED_FIELDS,
    LoraConfig,
    LoraRuntimeConfig,
    default_target_modules,
)
from .lora_fused import FusedLoraLinear, runs_plain
from .options import CliOption, MethodCli


def _kind(base: nn.Module) -> str:
    """'linear', 'conv' or 'embedding': how LoRA attaches to this base layer."""
    if is_linear_like(base):
        return "linear"
    if isinstance(base, nn.Embedding):
        return "embedding"
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    raise ValueError(
        f"LoRA cannot wrap a {type(base).__name__}; supported layers are nn.Linear, nn.Embedding, "
        "nn.Conv1d/2d/3d and transformers' Conv1D. Choose target_modules that name such layers."
    )


def _check_adapter_fits(base: nn.Module, r: int, init_lora_weights: bool | str, where: str,
                        use_dora: bool = False, has_adapters: bool = False) -> None:
    """Refuse, before anything changes, an adapter this layer cannot hold (PEFT refuses the same ones).

    A grouped convolution's B is grouped too (each group of outputs reads r / groups of A's channels), so r
    must be a multiple of ``groups`` (and DoRA is refused there, see ``lora_dora.check_dora_fits``). Orthogonal
    init pairs rows of one r x r orthogonal matrix: linear layers only, even r.
    """
    kind = _kind(base)
    if use_dora:
        lora_dora.check_dora_fits(base, where)
    lora_init.check_base_init_fits(base, kind, r, init_lora_weights, where, has_adapters)
    groups = getattr(base, "groups", 1) if kind == "conv" else 1
    if r % groups:
        raise ValueError(
            f"{where}: a {type(base).__name__} with groups={groups} needs a LoRA rank divisible by {groups}, "
            f"got r={r}. Choose such a rank (rank_pattern can set it for this layer) or do not target it."
        )
    if init_lora_weights == "orthogonal" and kind != "embedding":
        if kind != "linear":
            raise ValueError(f"{where}: init_lora_weights='orthogonal' works on linear layers only, not on a "
                             f"{type(base).__name__}; use True or 'gaussian'.")
        if r % 2:
            raise ValueError(f"{where}: init_lora_weights='orthogonal' needs an even rank, got r={r}.")


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


class LoraLayer(WeightedLayer):
    """Wraps one Linear, Conv1D, ConvNd or Embedding and adds any number of named LoRA adapters."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.kind = _kind(base_layer)
        self._hold_base(base_layer)
        self.in_features, self.out_features = _features(base_layer, self.kind)
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters' m (lora_dora.Magnitude)
        self.lora_slices: dict[str, torch.Tensor] = {}  # enable_lora: B's block mask (lora_slices.py)
        self.dora_norms: dict[str, torch.Tensor] = {}  # ||W0 + s B A|| of each merged DoRA adapter, for unmerge
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.batch_adapter_names: list[str] | None = None
        self.fused_training = True  # False: training forwards take the module-by-module path (set_fused_training)

    def adapter_names(self) -> list[str]:
        return list(self.r)

    def add_adapter(
        self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False,
        loftq_config: Any = None,
    ) -> None:
        """Create adapter ``name`` with rank ``r``; it is not activated here.

        Tensor shapes are PEFT's, so files move both ways: for a convolution A is a convolution with the base's
        kernel, stride and padding into r channels, and B a 1x1 convolution with the base's ``groups``.
        ``use_dora`` adds DoRA's magnitude vector, ``||W + s B A||`` per output (``lora_dora.py``). PiSSA, OLoRA
        and LoftQ (``init_lora_weights``) change the base weight, or the base layer, to match (``lora_init.py``).
        """
        if name in self.r:
            raise ValueError(f"This layer already has an adapter named {name!r}.")
        _check_adapter_fits(self.base_layer, r, init_lora_weights, type(self.base_layer).__name__, use_dora,
                            has_adapters=bool(self.r))
        if lora_init.base_init(init_lora_weights) == "loftq":
            loftq_config = lora_init.check_loftq_config(loftq_config)
        try:
            self._create_adapter(name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)
            if lora_init.base_init(init_lora_weights):
                lora_init.initialize(self, name, init_lora_weights, loftq_config)
            if use_dora:
                lora_dora.init_magnitude(self, name)
        except (RuntimeError, MemoryError) as err:  # what torch raises when the allocation fails
            self.delete_adapter(name)  # whatever was made before the failure
            raise ValueError(
                f"Could not allocate a rank-{r} LoRA adapter for a {type(self.base_layer).__name__} "
                f"({self.in_features} -> {self.out_features}) (torch: {str(err).splitlines()[0]}). Choose a smaller r "
                "(usually 4-64; ranks above the layer's width add nothing)."
            ) from err

    def _create_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float,
                        init_lora_weights: bool | str, use_rslora: bool) -> None:
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
            self.lora_B[name] = conv(r, self.out_features, 1, 1, groups=base.groups, bias=False, **factory)
        else:
            self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
            self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        # nn.Dropout's masks, drawn as gaps between dropped positions: ~8x faster at p=0.05 (see dropout.py)
        self.lora_dropout[name] = SparseDropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.reset_lora_parameters(name, init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, name: str, init_lora_weights: bool | str) -> None:
        """B = 0 so the adapter starts as a no-op (embeddings swap roles: A = 0, B ~ N(0, 1)).

        "orthogonal" (linear layers): A's rows and B's columns come from the odd and even rows of one random
        r x r orthogonal matrix, each times a Gaussian and / 10, so B A = 0 while neither is zero (PEFT's
        ``orthogonal_init``, https://datta0.github.io/posts/rethink-lora-init/).
        """
        if init_lora_weights is False or (lora_init.base_init(init_lora_weights) and self.kind != "embedding"):
            return  # (lora_init sets both from the base weight, without drawing random numbers, as PEFT)
        if self.kind == "embedding":
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])
            return
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        if init_lora_weights == "orthogonal":
            rank = self.r[name]
            q, _ = torch.linalg.qr(torch.randn(rank, rank))
            lora_a.copy_((torch.randn(self.in_features, rank // 2) @ q[0::2]).T / 10.0)  # (r, in)
            lora_b.copy_(torch.randn(rank // 2, self.out_features).T @ q[1::2] / 10.0)  # (out, r)
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(lora_a, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        nn.init.zeros_(lora_b)

    def swap_base(self, base_layer: nn.Module) -> None:
        """Hold ``base_layer`` (LoftQ's quantized layer) instead of the current base, of the same sizes."""
        if _features(base_layer, _kind(base_layer)) != (self.in_features, self.out_features):
            raise ValueError(f"{type(base_layer).__name__} does not have the sizes of the base it would replace.")
        self._hold_base(base_layer)
        self.fan_in_fan_out = is_gpt2_conv1d(base_layer)

    def _hold_base(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        # whether the base layer's output is a fresh tensor its backward does not need (see _add_lora)
        conv1d = gpt2_conv1d_class()
        self._result_is_scratch = type(base_layer) is nn.Linear or (conv1d is not None and type(base_layer) is conv1d)
        self._plain_linear = type(base_layer) is nn.Linear  # `_inference_call` may run its matmul itself
        # whether training steps may take `FusedLoraLinear` (see `_fused_call` for the per-call conditions)
        self._fusable = type(base_layer) is nn.Linear or callable(
            getattr(base_layer, "transient_weight_and_state", None))

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged; unmerge it before deleting it.")
        for store in (self.lora_A, self.lora_B, self.lora_embedding_A, self.lora_embedding_B, self.lora_dropout,
                      self.lora_magnitude_vector):
            if adapter_name in store:
                del store[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_slices):
            table.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name not in self.r:
            return {}
        if self.kind == "embedding":
            out = {"lora_embedding_A": self.lora_embedding_A[adapter_name],
                   "lora_embedding_B": self.lora_embedding_B[adapter_name]}
        else:
            out = {"lora_A.weight": self.lora_A[adapter_name].weight, "lora_B.weight": self.lora_B[adapter_name].weight}
        if adapter_name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[adapter_name].weight
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A, shaped like the base weight.

        Raises:
            ValueError: for a grouped convolution, whose update cannot be written as a weight of its shape.
        """
        self.check_mergeable()
        if self.kind == "embedding":
            delta = (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T  # (num_embeddings, dim)
        else:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])  # B is 1x1 for convs
            if self.fan_in_fan_out:
                delta = delta.T
        return delta * self.scaling[name]

    def merged_weight(self, name: str) -> torch.Tensor:
        """The fp32 weight merging ``name`` would write, without writing it: W + s B A, or DoRA's m / ||W + s B A||
        times that (what safe_merge checks for NaN/Inf before anything is merged)."""
        return lora_dora.merged_weight(self, [name])

    def check_mergeable(self) -> None:
        """A grouped convolution's update cannot be merged (PEFT refuses too): raise saying why and what to do.

        Its weight (out, in / groups, *kernel) lets each output channel see only its group's inputs, while B A
        reaches every input through A, which is not grouped.
        """
        groups = getattr(self.base_layer, "groups", 1) if self.kind == "conv" else 1
        if groups > 1:
            raise ValueError(
                f"Cannot merge LoRA into a {type(self.base_layer).__name__} with groups={groups}: the update mixes "
                "all input channels, which a grouped weight cannot hold. Keep the adapter unmerged (it runs "
                "beside the layer), or use unload() to drop it."
            )

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight as floats (dequantized when the base is quantized)."""
        if is_quantized(self.base_layer):
            return self.base_layer.dequantized_weight(torch.float32)
        if bnb_weight_kind(self.base_layer):
            return bnb_dequantized_weight(self.base_layer)
        return self.base_layer.weight.detach()

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weight: W0 <- W0 + scaling B A (no extra inference cost); a DoRA adapter
        W <- m / ||W0 + s B A|| * (W + s B A), its norm taken of the unmerged weight W0 as forward takes it.

        A bitsandbytes 4-bit / 8-bit base is dequantized, added to and quantized again, as PEFT does: the
        merged layer stays quantized, and its outputs differ from the unmerged ones by that rounding.
        """
        if is_quantized(self.base_layer):
            raise ValueError(
                "The base layer is quantized; adding the update to its 4/8-bit codes would round it away. "
                "Use merge_and_unload(), which returns a dequantized layer with the update added."
            )
        names = [n for n in (adapter_names if adapter_names is not None else self.active_adapters)
                 if n in self.r and n not in self.merged_adapters]
        if names:
            self.check_mergeable()
        if self.merged_adapters and any(n in self.lora_magnitude_vector for n in names):
            names = self.merged_adapters + names  # DoRA needs W0: take the merged ones out, merge them all again
            self.unmerge()
        norms = {n: lora_dora.weight_norm(self, n) for n in names if n in self.lora_magnitude_vector}  # of W0
        weight = self.base_layer.weight
        for name in names:
            if name in norms:
                lora_dora.merge_one(self, name, norms[name], safe_merge)
            elif bnb_weight_kind(self.base_layer):
                bnb_add_to_weight(self.base_layer, self.delta_weight(name).detach(), safe_merge, f"adapter {name!r}")
            elif safe_merge:
                merged = weight.data + self.delta_weight(name).to(weight.dtype)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"Merging adapter {name!r} would put NaN/Inf into the weight; nothing merged.")
                weight.data.copy_(merged)
            else:
                weight.data += self.delta_weight(name).to(weight.dtype)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged adapters again, newest first (exact up to float rounding; a bitsandbytes base is
        quantized again, so it comes back only to within that rounding)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_magnitude_vector:
                lora_dora.unmerge_one(self, name)
            elif bnb_weight_kind(self.base_layer):
                bnb_add_to_weight(self.base_layer, -self.delta_weight(name).detach())
            else:
                weight = self.base_layer.weight
                weight.data -= self.delta_weight(name).to(weight.dtype)

    @torch.no_grad()
    def unwrapped(self, merge: bool) -> nn.Module:
        """The module that replaces this layer on unload; merged, a deltatune-quantized base becomes a float Linear
        and a bitsandbytes base stays a bitsandbytes layer holding the merged weight (as in PEFT)."""
        if not merge:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer
        if not is_quantized(self.base_layer):
            self.merge()
            return self.base_layer
        names = [name for name in self.active_adapters if name in self.r]
        if any(name in self.lora_magnitude_vector for name in names):
            deltas = [lora_dora.merged_weight(self, names) - self.base_weight().float()]
        else:
            deltas = [self.delta_weight(name) for name in names]
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
            return call_base_layer(self.base_layer, x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            if self.merged_adapters:
                raise ValueError("A mixed batch (adapter_names=...) cannot run on merged adapters; unmerge first.")
            return self._mixed_batch_forward(x, *args, **kwargs)
        if not (args or kwargs or torch.is_grad_enabled()):
            quick = self._inference_call(x)
            if quick is not None:
                return quick
        fused = None if args or kwargs else self._fused_call(x)
        if fused is not None:
            name, dtype = fused
            if name in self.lora_magnitude_vector:
                return lora_dora.dora_fused(self, name, x, dtype)
            dropout = self.lora_dropout[name]
            x_lora = None if isinstance(dropout, nn.Identity) else dropout(x)
            return FusedLoraLinear.apply(x, x_lora, self.lora_A[name].weight, self.lora_B[name].weight,
                                          self.base_layer, self.scaling[name], dtype)
        result = call_base_layer(self.base_layer, x, *args, **kwargs)
        if self.merged_adapters:
            return result
        for name in self.active_adapters:
            if name in self.lora_magnitude_vector:
                result = lora_dora.dora_forward(self, name, x, result)
            elif name in self.r:
                result = self._add_lora(name, x, result)
        return result

    def _inference_call(self, x: torch.Tensor) -> torch.Tensor | None:
        """The common inference case in three matmuls, or None for the general path.

        Why: decoding one token per row is bound by per-module overhead, not by the matmuls; the general path pays
        for two submodule calls, a dropout call, a separate scaling and the dispatch between LoRA, DoRA and mixed
        batches. Here the base GEMM runs as ``F.linear`` does and ``scaling * (A x) B^T`` is added into its output by
        one ``addmm_``. The order differs from training's (``low_rank_then_base``, the base GEMM adding into the
        rank-r product): at a few rows MKL is slower both when the base GEMM accumulates into an existing output and
        with ``A x`` as (r, tokens) (4 rows, 576 -> 1536: +64 us over the bare GEMM that way, +21 us this way; equal at
        512 tokens). Taken for a no-grad call in eval mode (so dropout is off) of a plain nn.Linear base with one
        active, unmerged, non-DoRA adapter, all in the input's dtype outside autocast, and no hook anywhere (nor a
        ``torch.func`` transform, see ``func_transforms``).
        """
        if (self.training or not self._plain_linear or self.disabled or self.batch_adapter_names is not None
                or self.merged_adapters or len(self.active_adapters) != 1 or func_transform_active()):
            return None
        modules = self._modules
        name = self.active_adapters[0]
        lora_a, lora_b = modules["lora_A"]._modules.get(name), modules["lora_B"]._modules.get(name)
        dropout = modules["lora_dropout"]._modules.get(name)
        if lora_a is None or lora_b is None or name in modules["lora_magnitude_vector"]._modules:
            return None
        base = modules["base_layer"]
        weight, down, up = base.weight, lora_a.weight, lora_b.weight
        if not (x.dtype == weight.dtype == down.dtype == up.dtype) or x.dim() < 2 \
                or torch.is_autocast_enabled(x.device.type):
            return None
        if not runs_plain(base, lora_a, lora_b, dropout):
            return None
        flat = x.reshape(-1, x.shape[-1])
        out = F.linear(flat, weight, base.bias).addmm_(F.linear(flat, down), up.t(), alpha=self.scaling[name])
        return out.view(*x.shape[:-1], out.shape[-1])

    def _fused_call(self, x: torch.Tensor) -> tuple[str, torch.dtype] | None:
        """The adapter to run through `FusedLoraLinear` in this call and the dtype of its products, or None for the
        module-by-module path.

        Fused: a training forward (grad enabled) of a frozen nn.Linear or quantized base with exactly one active,
        unmerged adapter, where the input, the adapter and the base's matmul share a dtype, or autocast (bf16/fp16)
        decides it for all of them, as it would cast each matmul; never inside a ``torch.func`` transform or
        forward-mode AD, which cannot go through a custom autograd Function (``func_transforms``); on CPU only where
        the layer's work is at least ``FUSED_MIN_WORK``.
        """
        if (not self._fusable or not self.fused_training or not torch.is_grad_enabled()
                or len(self.active_adapters) != 1 or self.merged_adapters or func_transform_active()):
            return None
        name = self.active_adapters[0]
        if name not in self.r:
            return None
        base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
        device = x.device.type
        if device == "cpu" and x.numel() * lora_b.weight.shape[0] < FUSED_MIN_WORK:
            return None
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
        if not runs_plain(base, lora_a, lora_b):
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
        in_place = self._result_is_scratch and result.is_contiguous() and not result._is_view()
        if in_place and not func_transform_active():  # (vmap would run an in-place addmm_ one sample at a time)
            result.view(-1, result.shape[-1]).addmm_(after_a, up, alpha=self.scaling[name])
            return result
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), after_a, up, alpha=self.scaling[name])
        return flat.view(result.shape)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each batch row gets its own adapter (or none, for '__base__'); DoRA adapters are refused, as in PEFT."""
        dora = sorted({n for n in self.batch_adapter_names if n in self.lora_magnitude_vector})
        if dora:
            raise ValueError(
                f"A mixed batch (adapter_names=...) cannot use DoRA adapters ({dora}); PEFT refuses this too. Run "
                "their rows as a separate batch with set_adapter(), or merge_and_unload() a copy of the model."
            )
        result = call_base_layer(self.base_layer, x, *args, **kwargs)
        check_batch_size(self.batch_adapter_names, x.shape[0])
        for name, rows in rows_by_adapter(self.batch_adapter_names, x.device).items():
            if name == BASE_ADAPTER or name not in self.r:
                continue
            result = result.index_add(0, rows, self.lora_output(name, x[rows]).to(result.dtype))
        return result

    def extra_repr(self) -> str:
        dora = f", dora={list(self.lora_magnitude_vector)}" if len(self.lora_magnitude_vector) else ""
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling}{dora}"


def attach(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Add LoRA adapter ``adapter_name`` to every module ``config`` targets; returns their names.

    Every target is checked before the first layer is swapped, and a failure while adding (an allocation that
    fails) takes back the layers already done, so an error always leaves the model as it was.
    """
    if isinstance(config, LoraConfig):  # (PEFT's own LoraConfig is taken as it is, unchecked)
        config.validate()  # fields may have been changed since the config was made
    if config.target_modules is None:
        config.target_modules = default_target_modules(model)
    names = find_targets(
        model, config.target_modules, exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
        skip_inside=inside_adapter_layer(model), skip=config.modules_to_save or (),
    )
    use_dora = bool(getattr(config, "use_dora", False))
    plans = []
    for name in names:
        module = model.get_submodule(name)
        existing = module if isinstance(module, LoraLayer) else None
        base = existing.base_layer if existing else module
        r = resolve_pattern(config.rank_pattern, name, config.r)
        # refuses types LoRA cannot wrap, and base-changing inits a layer cannot take
        _check_adapter_fits(base, r, config.init_lora_weights, name, use_dora,
                            has_adapters=bool(existing and existing.r))
        if existing and adapter_name in existing.r:
            raise ValueError(f"{name} already has an adapter named {adapter_name!r}; pick another name.")
        enable = getattr(config, "enable_lora", None)
        mask = None if enable is None else lora_slices.block_mask(
            lora_slices.qkv_rows(model, name, base, len(enable)), enable, r)
        plans.append((name, existing, base, r, mask))
    done: list[tuple[str, LoraLayer | None, nn.Module]] = []
    if lora_init.base_init(config.init_lora_weights) == "loftq":
        lora_init.check_loftq_config(getattr(config, "loftq_config", None))
    try:
        for name, existing, base, r, mask in plans:
            layer = existing or LoraLayer(base, fan_in_fan_out=fan_in_fan_out_for(base, config, name))
            alpha = resolve_pattern(config.alpha_pattern, name, config.lora_alpha)
            try:
                layer.add_adapter(
                    adapter_name,
                    r=r if mask is None else mask.shape[1],
                    lora_alpha=alpha,
                    lora_dropout=config.lora_dropout,
                    init_lora_weights=config.init_lora_weights,
                    use_rslora=config.use_rslora,
                    use_dora=use_dora,
                    loftq_config=getattr(config, "loftq_config", None),
                )
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
            if mask is not None:
                lora_slices.restrict(layer, adapter_name, mask, r, alpha, config.use_rslora)
            if existing is None:
                replace_module(model, name, layer)
            done.append((name, existing, base))
    except BaseException:
        _take_back(model, done, adapter_name, config.init_lora_weights)
        raise
    return names


def _take_back(model: nn.Module, done: list[tuple[str, LoraLayer | None, nn.Module]], adapter_name: str,
               init_lora_weights: Any = True) -> None:
    """Undo a partial ``attach``: drop the new adapter from layers that had others, put new layers' bases back
    (PiSSA / OLoRA: with ``s B A`` added back to the base weight; LoftQ: the float layer it replaced)."""
    for name, existing, base in reversed(done):
        lora_init.undo(existing or model.get_submodule(name), adapter_name, init_lora_weights)
        if existing is not None:
            existing.delete_adapter(adapter_name)
        else:
            replace_module(model, name, base)


def base_tensors_in_file(root: nn.Module, layers: dict[str, nn.Module], config: LoraConfig, adapter_name: str,
                         save_embedding_layers: bool) -> dict[str, torch.Tensor]:
    """Base-model tensors a LoRA file carries besides A and B, by PEFT's rules: biases for ``bias="all"`` (every
    bias of the model) or ``"lora_only"`` (those of adapted layers), and the full weight of adapted embedding
    layers when ``save_embedding_layers`` (a second copy of the vocabulary matrix, so only when asked).

    ``root`` is the PeftModel, ``layers`` its adapter layers by path.
    """
    out: dict[str, torch.Tensor] = {}
    bias = getattr(config, "bias", "none")
    if bias == "all":
        wrapped = tuple(f"{path}." for path, layer in layers.items() if hasattr(layer, "original_module"))
        for name, param in root.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" and not name.startswith(wrapped):
                out[name] = param
    elif bias == "lora_only":
        for path, layer in layers.items():
            base_bias = getattr(layer.base_layer, "bias", None)
            is_copy = hasattr(layer, "original_module")  # modules_to_save: its bias is in the copy already
            if base_bias is not None and adapter_name in layer.adapter_names() and not is_copy:
                out[f"{path}.base_layer.bias"] = base_bias
    if save_embedding_layers:
        for path, layer in layers.items():
            if getattr(layer, "kind", None) == "embedding":
                out[f"{path}.base_layer.weight"] = layer.base_layer.weight
    return out


# tokens x in x out below which a CPU training forward takes the module-by-module path: the fused node's fixed
# Python cost (~0.1 ms a layer, forward and backward) outweighs what it saves there. Measured per layer, fp32, 2
# threads: module-by-module took 0.81-0.98 of the fused time below 2**24 (64x64 to 576x576 layers, 32 to 2048 tokens)
# and fused 0.91-1.02 of it from ~1e8 up; a tiny Llama's step (64 wide) went from 1.04-1.16 to 0.95-1.03 of PEFT's.
FUSED_MIN_WORK = 2 ** 24

# deltatune train --method lora: the flags and the defaults of the main job (all linear layers, lr 2e-3).
CLI = MethodCli(name="lora", lr=2e-3, target_modules="all-linear", options=(
    CliOption("r", "r", "int", 8, "LoRA rank", label="rank"),
    CliOption("alpha", "lora_alpha", "number", 16, "LoRA alpha (scale = alpha / r)", positive=True),
    CliOption("dropout", "lora_dropout", "number", 0.05, "dropout on the input of LoRA's A"),
    CliOption("dora", "use_dora", "bool", None, "DoRA: train a magnitude per output besides A and B (Liu et al. 2024)",
              label="DoRA"),
    CliOption("init", "init_lora_weights", "text", None, "how A and B start: gaussian, orthogonal, pissa, "
              "pissa_niter_K, olora (from the base weight, saved as plain LoRA), loftq (with --quantize nf4/int8)",
              label="init"),
))


def set_fused_training(model: nn.Module, enabled: bool) -> None:
    """Let the LoRA/DoRA layers of ``model`` take the fused training path (the default), or not.

    Why: a second derivative (``create_graph=True``, then a backward through the gradients: gradient penalties,
    meta-learning) through a fused DoRA node, or a fused LoRA node under autocast, raises; the module-by-module path
    gives it, at the fused path's cost in time and memory. Takes effect from the next forward.
    """
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.fused_training = enabled
