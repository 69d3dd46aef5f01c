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
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter_layer import BASE_ADAPTER, check_batch_size, inside_adapter_layer, replace_module, rows_by_adapter
from ..config import PeftConfig, check_layers, check_names, check_number, check_patterns, is_real_number
from ..quant.bnb import bnb_add_to_weight, bnb_dequantized_weight, bnb_weight_kind
from ..targets import (
    default_target_modules,
    fan_in_fan_out_for,
    find_targets,
    gpt2_conv1d_class,
    is_linear_like,
    is_quantized,
    resolve_pattern,
)
from .lora_fused import FusedLoraLinear, runs_plain
from .options import CliOption, MethodCli

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "orthogonal")
# PEFT's other init_lora_weights values: each needs data, an SVD of the base weight that changes it, or a
# quantization pass, none of which deltatune has yet ("pissa_niter_<n>" is PiSSA too).
PEFT_ONLY_INIT_MODES = ("pissa", "olora", "loftq", "eva", "corda", "lora_ga", "mica")
# ... of which these only choose A and B's starting values, which a loaded file replaces, so an adapter
# file written with them loads as a plain LoRA adapter (as PEFT's own loader treats it).
_INIT_MODES_PLAIN_ONCE_TRAINED = ("eva",)

# PEFT LoraConfig fields for features deltatune does not have yet: field -> (what it is, the values that
# leave it off; the first is PEFT's default). Any other value is refused, here and in a file PEFT wrote,
# since running the adapter without the feature would give other outputs than PEFT.
UNSUPPORTED_FIELDS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "use_dora": ("DoRA, weight-decomposed LoRA", (False, None)),
    "lora_bias": ("a trained bias in lora_B", (False, None)),
    "layer_replication": ("layer replication", (None, [])),
    "target_parameters": ("LoRA on nn.Parameters", (None, [])),
    "trainable_token_indices": ("trainable tokens", (None, [], {})),
    "use_qalora": ("QALoRA", (False, None)),
    "alora_invocation_tokens": ("activated LoRA (aLoRA)", (None,)),
    "arrow_config": ("Arrow routing", (None,)),
    "use_bdlora": ("block-diagonal LoRA", (None, False)),
    "megatron_config": ("Megatron parallel layers", (None, {})),
    "velora_config": ("VeLoRA", (None,)),
    "monteclora_config": ("MonteCLoRA", (None,)),
    "kasa_config": ("KaSA", (None,)),
    "ensure_weight_tying": ("tying adapters of tied weights", (False,)),
}
# PEFT fields that only matter for an init mode or feature above: any value is accepted (when its mode is
# off PEFT ignores them too, with a warning where it warns) and written only when set.
_INIT_CONFIG_FIELDS = {"loftq_config": "loftq", "eva_config": "eva", "corda_config": "corda",
                       "lora_ga_config": "lora_ga"}
_INERT_FIELDS = ("megatron_core", "qalora_group_size")


@dataclass
class LoraRuntimeConfig:
    """PEFT's runtime-only LoRA settings (never written to adapter_config.json).

    Attributes:
        ephemeral_gpu_offload: PEFT's GPU offloading for models partly kept on the CPU (not supported yet).
    """

    ephemeral_gpu_offload: bool = False


@dataclass
class LoraConfig(PeftConfig):
    """LoRA settings; field names and defaults are HF PEFT's, every PEFT field is accepted.

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
            "orthogonal" (A and B from orthogonal rows so that B A = 0; linear layers, even r), or False
            (both random: the adapter changes the output from the start; for tests). PEFT's other modes
            (``PEFT_ONLY_INIT_MODES``) are refused.
        layers_to_transform: only adapt blocks with these indices.
        layers_pattern: name of the block container ("layers", "h", ...) for layers_to_transform.
        rank_pattern: {name regex: r} overrides per module.
        alpha_pattern: {name regex: alpha} overrides per module.
        runtime_config: runtime-only settings (``LoraRuntimeConfig``, PEFT's object or a dict).
        The remaining fields are PEFT's (``UNSUPPORTED_FIELDS``, ``_INIT_CONFIG_FIELDS``, ``_INERT_FIELDS``):
        accepted at their defaults, refused with a "not supported yet" error where they switch on a feature.
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
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig)
    # PEFT's fields for features deltatune does not have yet (see UNSUPPORTED_FIELDS)
    use_dora: bool = False
    lora_bias: bool = False
    layer_replication: list[tuple[int, int]] | None = None
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    use_qalora: bool = False
    alora_invocation_tokens: list[int] | None = None
    arrow_config: Any = None
    use_bdlora: Any = None
    megatron_config: dict | None = None
    velora_config: Any = None
    monteclora_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False
    # PEFT's settings of those features and of its other init modes
    loftq_config: Any = field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    megatron_core: str | None = "megatron.core"
    qalora_group_size: int = 16

    _written_only_when_set: ClassVar[frozenset[str]] = PeftConfig._written_only_when_set | frozenset(
        {*UNSUPPORTED_FIELDS, *_INIT_CONFIG_FIELDS, *_INERT_FIELDS})
    _never_written: ClassVar[frozenset[str]] = frozenset({"runtime_config"})

    def __post_init__(self) -> None:
        self.peft_type = "LORA"
        self.target_modules = _as_list(self.target_modules)
        self.exclude_modules = _as_list(self.exclude_modules)
        self.runtime_config = _runtime_config(self.runtime_config)
        super().__post_init__()  # runs validate()
        self._drop_unused_init_configs()

    def validate(self) -> None:
        """Every field checked for type and range, so a bad value (NaN alpha, a string for a number, an int for
        target_modules) stops here with its name, instead of training a NaN adapter or failing deep inside.

        Raises:
            ValueError: the first field whose value is wrong, with what it takes.
        """
        super().validate()
        _check_rank("r", self.r)
        check_number("lora_alpha", self.lora_alpha)
        if not is_real_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}.")
        check_names("target_modules", self.target_modules)
        check_names("exclude_modules", self.exclude_modules)
        check_patterns("rank_pattern", self.rank_pattern, _check_rank)
        check_patterns("alpha_pattern", self.alpha_pattern, check_number)
        check_layers(self.layers_to_transform, self.layers_pattern)
        for name in ("fan_in_fan_out", "use_rslora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if not isinstance(self.bias, str) or self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}.")
        _check_init_mode(self.init_lora_weights)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(
                "layers_to_transform and layers_pattern need target_modules as a list of names (a regex can select "
                "layers itself); PEFT refuses this combination too, so such an adapter could not be shared."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only has a meaning together with layers_to_transform.")
        _check_unsupported_fields(self)

    def _drop_unused_init_configs(self) -> None:
        """A settings object for an init mode that is not chosen is ignored, with PEFT's warning."""
        for name, mode in _INIT_CONFIG_FIELDS.items():
            value = getattr(self, name)
            if value not in (None, {}) and self.init_lora_weights != mode:
                warnings.warn(f"{name} is set but ignored, since init_lora_weights is not {mode!r}.", stacklevel=4)
                setattr(self, name, {} if name == "loftq_config" else None)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> LoraConfig:
        """As ``PeftConfig.from_dict``; an init mode that only chose the starting A and B loads as plain LoRA, and
        a ``runtime_config`` key is dropped with a warning (runtime settings never come from a file; PEFT's rule)."""
        if "runtime_config" in data:
            warnings.warn(f"{source}: ignoring runtime_config; runtime settings are not read from files.",
                          stacklevel=2)
            data = {key: value for key, value in data.items() if key != "runtime_config"}
        mode = data.get("init_lora_weights")
        if isinstance(mode, str) and mode in _INIT_MODES_PLAIN_ONCE_TRAINED:
            data = {key: value for key, value in data.items() if key != f"{mode}_config"}
            data["init_lora_weights"] = True
        return super().from_dict(data, source=source)


def _as_list(names: Any) -> Any:
    """A set or tuple of names as a sorted list (a file must not depend on hash order)."""
    if isinstance(names, (set, frozenset, tuple)):
        return sorted(names) if all(isinstance(n, str) for n in names) else list(names)
    return names


def _check_rank(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer (the LoRA rank), got {value!r}.")
    if value >= 2**63:  # no tensor can have such a dimension; smaller ones that do not fit fail at allocation
        raise ValueError(f"{name}={value} is too large to be a tensor dimension; LoRA ranks are usually 4-64.")

def _check_init_mode(mode: Any) -> None:
    """True/False/'gaussian'/'orthogonal' work; PEFT's other modes get a clear 'not supported yet'."""
    if isinstance(mode, str) and (mode in PEFT_ONLY_INIT_MODES or mode.startswith("pissa_niter_")):
        raise ValueError(
            f"init_lora_weights={mode!r} is not supported yet by deltatune; use one of {INIT_MODES}. (A PiSSA, "
            "OLoRA or CorDA adapter loads once PEFT saved it as plain LoRA, with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...).)"
        )
    if mode not in INIT_MODES or (mode in (0, 1) and not isinstance(mode, bool)):
        raise ValueError(
            f"init_lora_weights={mode!r} is not a valid value; use one of {INIT_MODES} (PEFT also knows "
            f"{PEFT_ONLY_INIT_MODES}, which deltatune does not support yet)."
        )


def _runtime_config(value: Any) -> LoraRuntimeConfig:
    """PEFT's LoraRuntimeConfig, a dict or None, as ours; ephemeral GPU offload is refused."""
    if value is None:
        value = LoraRuntimeConfig()
    elif isinstance(value, dict):
        value = LoraRuntimeConfig(**value)
    elif not isinstance(value, LoraRuntimeConfig):
        value = LoraRuntimeConfig(ephemeral_gpu_offload=bool(getattr(value, "ephemeral_gpu_offload", False)))
    if value.ephemeral_gpu_offload:
        raise ValueError(f"runtime_config={value!r} (ephemeral GPU offload) is not supported yet by deltatune; "
                         "leave ephemeral_gpu_offload at False and put the model on the device it runs on.")
    return value


def _check_unsupported_fields(config: LoraConfig) -> None:
    """Refuse each PEFT feature that is switched on, naming the field, its value and what to do."""
    for name, (what, off) in UNSUPPORTED_FIELDS.items():
        value = getattr(config, name)
        if not any(value is v or (type(value) is type(v) and value == v) for v in off):
            raise ValueError(
                f"{name}={value!r} ({what}) is not supported yet by deltatune; leave {name} at {off[0]!r}. "
                "An adapter trained with it gives other outputs without it, so it cannot be loaded either."
            )


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


def _check_adapter_fits(base: nn.Module, r: int, init_lora_weights: bool | str, where: str) -> None:
    """Refuse, before anything changes, an adapter this layer cannot hold (PEFT refuses the same ones).

    A grouped convolution's B is grouped too (each group of outputs reads r / groups of A's channels), so r
    must be a multiple of ``groups``. Orthogonal init pairs rows of one r x r orthogonal matrix: linear
    layers only, even r.
    """
    kind = _kind(base)
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


class LoraLayer(nn.Module):
    """Wraps one Linear, Conv1D, ConvNd or Embedding and adds any number of named LoRA adapters."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = _kind(base_layer)
        # whether the base layer's output is a fresh tensor its backward does not need (see _add_lora)
        conv1d = gpt2_conv1d_class()
        self._result_is_scratch = type(base_layer) is nn.Linear or (conv1d is not None and type(base_layer) is conv1d)
        # whether training steps may take `FusedLoraLinear` (see `_fused_call` for the per-call conditions)
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
        """Create adapter ``name`` with rank ``r``; it is not activated here.

        Tensor shapes are PEFT's, so files move both ways: for a convolution A is a convolution with the base's
        kernel, stride and padding into r channels, and B a 1x1 convolution with the base's ``groups``.
        """
        if name in self.r:
            raise ValueError(f"This layer already has an adapter named {name!r}.")
        _check_adapter_fits(self.base_layer, r, init_lora_weights, type(self.base_layer).__name__)
        try:
            self._create_adapter(name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)
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
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
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
        if init_lora_weights is False:
            return
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
        """Fold adapters into the base weight: W0 <- W0 + scaling B A (no extra inference cost).

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
        weight = self.base_layer.weight
        for name in names:
            if bnb_weight_kind(self.base_layer):
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
            if bnb_weight_kind(self.base_layer):
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
            return FusedLoraLinear.apply(x, x_lora, self.lora_A[name].weight, self.lora_B[name].weight,
                                          self.base_layer, self.scaling[name], dtype)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged_adapters:
            return result
        for name in self.active_adapters:
            if name in self.r:
                result = self._add_lora(name, x, result)
        return result

    def _fused_call(self, x: torch.Tensor) -> tuple[str, torch.dtype] | None:
        """The adapter to run through `FusedLoraLinear` in this call and the dtype of its products, or None for the
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
        if not (runs_plain(base) and runs_plain(lora_a) and runs_plain(lora_b)):
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
    plans = []
    for name in names:
        module = model.get_submodule(name)
        existing = module if isinstance(module, LoraLayer) else None
        base = existing.base_layer if existing else module
        r = resolve_pattern(config.rank_pattern, name, config.r)
        _check_adapter_fits(base, r, config.init_lora_weights, name)  # also refuses layer types LoRA cannot wrap
        if existing and adapter_name in existing.r:
            raise ValueError(f"{name} already has an adapter named {adapter_name!r}; pick another name.")
        plans.append((name, existing, base, r))
    done: list[tuple[str, LoraLayer | None, nn.Module]] = []
    try:
        for name, existing, base, r in plans:
            layer = existing or LoraLayer(base, fan_in_fan_out=fan_in_fan_out_for(base, config, name))
            try:
                layer.add_adapter(
                    adapter_name,
                    r=r,
                    lora_alpha=resolve_pattern(config.alpha_pattern, name, config.lora_alpha),
                    lora_dropout=config.lora_dropout,
                    init_lora_weights=config.init_lora_weights,
                    use_rslora=config.use_rslora,
                )
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
            if existing is None:
                replace_module(model, name, layer)
            done.append((name, existing, base))
    except BaseException:
        _take_back(model, done, adapter_name)
        raise
    return names


def _take_back(model: nn.Module, done: list[tuple[str, LoraLayer | None, nn.Module]], adapter_name: str) -> None:
    """Undo a partial ``attach``: drop the new adapter from layers that had others, put new layers' bases back."""
    for name, existing, base in reversed(done):
        if existing is not None:
            existing.delete_adapter(adapter_name)
        else:
            replace_module(model, name, base)


# deltatune train --method lora: the flags and the defaults of the main job (all linear layers, lr 2e-3).
CLI = MethodCli(name="lora", lr=2e-3, target_modules="all-linear", options=(
    CliOption("r", "r", "int", 8, "LoRA rank", label="rank"),
    CliOption("alpha", "lora_alpha", "number", 16, "LoRA alpha (scale = alpha / r)", positive=True),
    CliOption("dropout", "lora_dropout", "number", 0.05, "dropout on the input of LoRA's A"),
))
