"""(IA)^3: learned vectors that rescale activations, h = l * (W x) or h = W (l * x).

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
section 3.3: attention becomes softmax(Q (l_k * K)^T / sqrt(d_k)) (l_v * V) and the feed-forward block
(l_ff * gamma(W_1 x)) W_2. So the key and value projections have their OUTPUT scaled, elementwise, by a
learned vector, and the second feed-forward projection (a "feedforward module") has its INPUT scaled. The
vectors start at ones, so the adapted model starts equal to the base model.

Both are a rescaling of the weight, so the vectors merge away: l * (W x + b) = (diag(l) W) x + l * b scales
W's rows (and the bias), W (l * x) = (W diag(l)) x scales its columns. Tensor names, shapes and module
choices are HF PEFT's (``ia3_l``: (out, 1) for an output vector, (1, in) for an input vector), so adapter
files move both ways.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapter_layer import (
    BASE_ADAPTER,
    WeightedLayer,
    adapter_layers,
    check_batch_size,
    inside_adapter_layer,
    replace_module,
    rows_by_adapter,
)
from ..config import PeftConfig, check_names
from ..quant.bnb import bnb_weight_kind, call_base_layer
from ..targets import (
    fan_in_fan_out_for,
    find_targets,
    is_linear_like,
    is_modules_to_save_wrapper,
    is_quantized,
    model_type,
)
from .options import CliOption, MethodCli

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING (peft 0.21):
# model_type -> (target_modules, feedforward_modules) used when the config leaves them None.
DEFAULT_MODULES: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "RefinedWebModel": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWeb": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
}


@dataclass
class IA3Config(PeftConfig):
    """(IA)^3 settings; field names and defaults are HF PEFT's ``IA3Config``, every PEFT field is accepted.

    Attributes:
        target_modules: module names (list: equal or dotted suffix), a full-match regex (str), or "all-linear".
            None picks the architecture's default (``DEFAULT_MODULES``, e.g. k_proj, v_proj, down_proj for Llama).
        exclude_modules: names (same rules) never to adapt.
        feedforward_modules: the targets whose input (not output) is scaled, as the paper's l_ff: a list (a target
            whose full name ends with an item, PEFT's rule) or a full-match regex. A list must be a subset of a list
            ``target_modules`` (PEFT's rule). None picks the architecture's default.
        fan_in_fan_out: the base weight is stored (in, out), as in GPT-2's Conv1D (corrected per layer, with a
            warning, as PEFT does).
        init_ia3_weights: True starts every vector at ones (the adapted model equals the base); False draws
            them from N(0, 1) (for tests).
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        self.peft_type = "IA3"
        self.target_modules = _as_list(self.target_modules)
        self.exclude_modules = _as_list(self.exclude_modules)
        self.feedforward_modules = _as_list(self.feedforward_modules)
        super().__post_init__()  # runs validate()

    def validate(self) -> None:
        """Every field checked for type, and feedforward_modules against target_modules.

        Raises:
            ValueError: the first field whose value is wrong, with what it takes.
        """
        super().validate()
        check_names("target_modules", self.target_modules)
        check_names("exclude_modules", self.exclude_modules)
        check_names("feedforward_modules", self.feedforward_modules)
        for name in ("fan_in_fan_out", "init_ia3_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        check_feedforward_subset(self.target_modules, self.feedforward_modules)


def _as_list(names: Any) -> Any:
    """A set or tuple of names as a sorted list (a file must not depend on hash order)."""
    if isinstance(names, (set, frozenset, tuple)):
        return sorted(names) if all(isinstance(n, str) for n in names) else list(names)
    return names


def check_feedforward_subset(target_modules: Any, feedforward_modules: Any) -> None:
    """PEFT's rule: when both are lists, every feedforward name must also be a target name.

    Raises:
        ValueError: naming the feed-forward names that are not targets.
    """
    if not isinstance(target_modules, list) or not isinstance(feedforward_modules, list):
        return
    missing = [name for name in feedforward_modules if name not in target_modules]
    if missing:
        raise ValueError(
            f"feedforward_modules={feedforward_modules!r} must be a subset of target_modules={target_modules!r}; "
            f"{missing} are not targets. (IA)^3 only scales modules it adapts, so add them to target_modules or "
            "drop them from feedforward_modules (PEFT refuses such a config too, also when reading it from a file)."
        )


def is_feedforward(name: str, feedforward_modules: list[str] | str) -> bool:
    """PEFT's rule for one target's full name: a regex must match it whole; a list item must end it (plain
    ``str.endswith``, so "proj" would match "down_proj")."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(item) for item in feedforward_modules)


def _kind(base: nn.Module) -> str:
    """'linear' or 'conv': how (IA)^3 attaches to this base layer (PEFT's supported types)."""
    if is_linear_like(base):
        return "linear"
    if isinstance(base, (nn.Conv2d, nn.Conv3d)):
        return "conv"
    raise ValueError(
        f"(IA)^3 cannot wrap a {type(base).__name__}; supported layers are nn.Linear, transformers' Conv1D, "
        "nn.Conv2d and nn.Conv3d (as in PEFT), also on a quantized base. Choose target_modules that name such layers."
    )


def _features(base: nn.Module, kind: str) -> tuple[int, int]:
    """(in, out) sizes: features or channels (GPT-2's Conv1D stores its weight (in, out))."""
    if kind == "conv":
        return base.in_channels, base.out_channels
    if isinstance(base, nn.Linear) or is_quantized(base):
        return base.in_features, base.out_features
    return base.weight.shape[0], base.weight.shape[1]


def _vector_dtype(base: nn.Module) -> torch.dtype:
    """Vectors train in the base dtype when it is fp32/fp64, otherwise in fp32 (as PEFT's autocast does)."""
    weight = getattr(base, "weight", None)
    dtype = getattr(weight, "dtype", None)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class IA3Layer(WeightedLayer):
    """Wraps one Linear, Conv1D, Conv2d/3d (or quantized linear) and adds any number of named (IA)^3 vectors.

    Each adapter scales either the input (a feed-forward module) or the output of the base layer; active
    adapters of one kind multiply, as in PEFT.
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = _kind(base_layer)
        self.in_features, self.out_features = _features(base_layer, self.kind)
        self.fan_in_fan_out = fan_in_fan_out
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.batch_adapter_names: list[str] | None = None
        # weight (and bias) entries a merge multiplied by exactly 0, kept so unmerge can restore them
        self._zeroed: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l)

    def add_adapter(self, name: str, is_feedforward: bool, init_ia3_weights: bool = True) -> None:
        """Create vector ``name`` (not activated here): ones, or N(0, 1) when ``init_ia3_weights`` is False.

        Shapes are PEFT's: linear (1, in) for an input vector, (out, 1) for an output vector; a convolution's
        is (1, channels, 1, ...) so that it broadcasts over (batch, channels, *spatial).
        """
        if name in self.ia3_l:
            raise ValueError(f"This layer already has an adapter named {name!r}.")
        size = self.in_features if is_feedforward else self.out_features
        if self.kind == "conv":
            shape = (1, size) + (1,) * (self.base_layer.weight.dim() - 2)
        else:
            shape = (1, size) if is_feedforward else (size, 1)
        device = getattr(getattr(self.base_layer, "weight", None), "device", None)
        vector = torch.randn(shape, dtype=_vector_dtype(self.base_layer), device=device)
        if init_ia3_weights:
            nn.init.ones_(vector)
        self.ia3_l[name] = nn.Parameter(vector)
        self.is_feedforward[name] = is_feedforward

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged; unmerge it before deleting it.")
        if adapter_name in self.ia3_l:
            del self.ia3_l[adapter_name]
        self.is_feedforward.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name not in self.ia3_l:
            return {}
        return {"ia3_l": self.ia3_l[adapter_name]}

    # ---- merging --------------------------------------------------------------------------------

    def weight_scale(self, name: str) -> torch.Tensor:
        """The vector shaped to broadcast against the base weight: (out, 1, ...) scales rows (output channels),
        (1, in, ...) columns (input channels); transposed for a Conv1D's (in, out) weight. A grouped convolution's
        input vector is laid out per group, since its weight holds only in / groups input channels."""
        vector = self.ia3_l[name]
        if self.kind == "linear":
            return vector.T if self.fan_in_fan_out else vector
        if not self.is_feedforward[name]:
            return vector.transpose(0, 1)  # (out, 1, *1)
        groups = self.base_layer.groups
        if groups == 1:
            return vector
        per_group_in, per_group_out = self.in_features // groups, self.out_features // groups
        spatial = vector.shape[2:]
        grouped = vector.reshape(groups, 1, per_group_in, *spatial).expand(groups, per_group_out, per_group_in,
                                                                           *spatial)
        return grouped.reshape(self.out_features, per_group_in, *spatial)

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight as floats (dequantized when the base is quantized)."""
        if is_quantized(self.base_layer):
            return self.base_layer.dequantized_weight(torch.float32)
        return self.base_layer.weight.detach()

    def delta_weight(self, name: str) -> torch.Tensor:
        """W * l - W: what merging ``name`` adds to the base weight (for the wrapper's NaN/Inf check)."""
        weight = self.base_weight()
        return weight * self.weight_scale(name).detach() - weight

    def check_mergeable(self) -> None:
        """A bitsandbytes base cannot take the vectors (PEFT refuses to merge (IA)^3 into 4/8-bit models too)."""
        if bnb_weight_kind(self.base_layer):
            raise ValueError(
                f"Cannot merge (IA)^3 into a bitsandbytes {type(self.base_layer).__name__}: scaling its 4/8-bit codes "
                "would round the vectors away (PEFT refuses this too). Keep the adapter unmerged, or use unload()."
            )

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold vectors into the base weight: W <- W * l (rows for an output vector, and b <- b * l; columns for
        an input vector). No extra inference cost afterwards.

        Raises:
            ValueError: a quantized base (use merge_and_unload), or with ``safe_merge`` a weight that would hold
                NaN/Inf (nothing is changed then).
        """
        if is_quantized(self.base_layer):
            raise ValueError(
                "The base layer is quantized; scaling its 4/8-bit codes would round the vectors away. "
                "Use merge_and_unload(), which returns a dequantized layer with the vectors folded in."
            )
        self.check_mergeable()
        names = [n for n in (adapter_names if adapter_names is not None else self.active_adapters)
                 if n in self.ia3_l and n not in self.merged_adapters]
        weight, bias = self.base_layer.weight, self.bias
        for name in names:
            scale = self.weight_scale(name)
            new_weight = weight.data * scale
            bias_scale = None if self.is_feedforward[name] or bias is None else self.ia3_l[name].reshape(bias.shape)
            new_bias = None if bias_scale is None else bias.data * bias_scale
            if safe_merge and not (torch.isfinite(new_weight).all()
                                   and (new_bias is None or torch.isfinite(new_bias).all())):
                raise ValueError(f"Merging adapter {name!r} would put NaN/Inf into the weight; nothing merged.")
            self._keep_zeroed(name, scale, bias_scale)
            weight.data.copy_(new_weight.to(weight.dtype))
            if new_bias is not None:
                bias.data.copy_(new_bias.to(bias.dtype))
            self.merged_adapters.append(name)

    def _keep_zeroed(self, name: str, scale: torch.Tensor, bias_scale: torch.Tensor | None) -> None:
        """Keep the weight (and bias) entries a zero in the vector will wipe out, so unmerge can put them back."""
        weight, bias = self.base_layer.weight, self.bias
        zero = (scale == 0).expand_as(weight)
        bias_zero = None if bias_scale is None else bias_scale == 0
        if not zero.any() and (bias_zero is None or not bias_zero.any()):
            return
        kept_bias = None if bias_zero is None else bias.data[bias_zero].clone()
        self._zeroed[name] = (weight.data[zero].clone(), kept_bias)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide merged vectors out again, newest first: exact up to float rounding (entries a zero in the
        vector wiped out are restored from the copy the merge kept; PEFT divides by l + 1e-8 instead)."""
        weight, bias = self.base_layer.weight, self.bias
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            scale = self.weight_scale(name)
            weight.data.copy_((weight.data / torch.where(scale == 0, 1.0, scale)).to(weight.dtype))
            kept_weight, kept_bias = self._zeroed.pop(name, (None, None))
            if kept_weight is not None:
                weight.data[(scale == 0).expand_as(weight)] = kept_weight
            if self.is_feedforward[name] or bias is None:
                continue
            bias_scale = self.ia3_l[name].reshape(bias.shape)
            bias.data.copy_((bias.data / torch.where(bias_scale == 0, 1.0, bias_scale)).to(bias.dtype))
            if kept_bias is not None:
                bias.data[bias_scale == 0] = kept_bias

    @torch.no_grad()
    def unwrapped(self, merge: bool) -> nn.Module:
        """The module that replaces this layer on unload; merged, a deltatune-quantized base becomes a float Linear
        with the vectors folded in."""
        if not merge:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer
        if not is_quantized(self.base_layer):
            self.merge()
            return self.base_layer
        names = [n for n in self.active_adapters if n in self.ia3_l]
        weight = self.base_weight()
        merged = weight
        for name in names:
            merged = merged * self.weight_scale(name).float()
        linear = self.base_layer.to_linear(getattr(self.base_layer, "compute_dtype", None) or torch.float32,
                                           [merged - weight])
        if linear.bias is not None:
            for name in names:
                if not self.is_feedforward[name]:
                    linear.bias.mul_(self.ia3_l[name].reshape(linear.bias.shape).to(linear.bias.dtype))
        return linear

    # ---- running --------------------------------------------------------------------------------

    def _scale(self, names: list[str]) -> torch.Tensor | None:
        """The product of these adapters' vectors, shaped to broadcast over an input or output (None if none)."""
        scale = None
        for name in names:
            vector = self.ia3_l[name] if self.kind == "conv" else self.ia3_l[name].flatten()
            scale = vector if scale is None else scale * vector
        return scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """base(x * l_in) * l_out, with l_in / l_out the products of the active input / output vectors."""
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return call_base_layer(self.base_layer, x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            if self.merged_adapters:
                raise ValueError("A mixed batch (adapter_names=...) cannot run on merged adapters; unmerge first.")
            return self._mixed_batch_forward(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.ia3_l and n not in self.merged_adapters]
        return self._scaled_forward(x, self._scale([n for n in names if self.is_feedforward[n]]),
                                    self._scale([n for n in names if not self.is_feedforward[n]]), *args, **kwargs)

    def _scaled_forward(self, x: torch.Tensor, scale_in: torch.Tensor | None, scale_out: torch.Tensor | None,
                        *args, **kwargs) -> torch.Tensor:
        """base(x * scale_in) * scale_out, computed in the vectors' dtype and cast back (PEFT's dtype rule)."""
        if scale_in is not None:
            x = (x.to(scale_in.dtype) * scale_in).to(x.dtype)
        result = call_base_layer(self.base_layer, x, *args, **kwargs)
        if scale_out is not None:
            result = (result.to(scale_out.dtype) * scale_out).to(result.dtype)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each batch row gets its own adapter's vector (or none, for '__base__'): one per-row scale tensor."""
        check_batch_size(self.batch_adapter_names, x.shape[0])
        rows = {n: r for n, r in rows_by_adapter(self.batch_adapter_names, x.device).items()
                if n != BASE_ADAPTER and n in self.ia3_l}
        scale_in = self._row_scale({n: r for n, r in rows.items() if self.is_feedforward[n]}, x, self.in_features)
        scale_out = self._row_scale({n: r for n, r in rows.items() if not self.is_feedforward[n]}, x,
                                    self.out_features)
        return self._scaled_forward(x, scale_in, scale_out, *args, **kwargs)

    def _row_scale(self, rows: dict[str, torch.Tensor], x: torch.Tensor, size: int) -> torch.Tensor | None:
        """(batch, size) ones with each adapter's vector in its rows, shaped (batch, 1, ..., size) for a linear
        layer's (batch, ..., features) tensors, (batch, size, 1, ...) for a convolution's (batch, C, *spatial)."""
        if not rows:
            return None
        dtype = self.ia3_l[next(iter(rows))].dtype
        scale = torch.ones(x.shape[0], size, dtype=dtype, device=x.device)
        for name, index in rows.items():
            vector = self.ia3_l[name].reshape(1, size).to(dtype)
            scale = scale.index_copy(0, index, vector.expand(len(index), size))
        ones = (1,) * (x.dim() - 2)
        return scale.view(x.shape[0], *ones, size) if self.kind == "linear" else scale.view(x.shape[0], size, *ones)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, feedforward={self.is_feedforward}"


# ---- attaching ----------------------------------------------------------------------------------


def default_modules(model: nn.Module, config: IA3Config) -> tuple[list[str] | str, list[str] | str]:
    """``config``'s target and feedforward modules, with PEFT's per-architecture defaults where they are None.

    A default feed-forward list is cut to the names that are also in a target list, as PEFT's subset rule wants
    (PEFT itself writes the whole default, and then cannot read its own file back).

    Raises:
        ValueError: no default for this model type, or a cut default that would no longer mark the same modules.
    """
    kind = model_type(model)
    targets, feedforward = config.target_modules, config.feedforward_modules
    if (targets is None or feedforward is None) and kind not in DEFAULT_MODULES:
        missing = "target_modules" if targets is None else "feedforward_modules"
        raise ValueError(
            f"{missing} was not given and (IA)^3 has no default for model type {kind!r}. Pass target_modules and "
            "feedforward_modules (the targets whose input is scaled; [] for none), as PEFT asks too."
        )
    if targets is None:
        targets = list(DEFAULT_MODULES[kind][0])
    if feedforward is None:
        feedforward = list(DEFAULT_MODULES[kind][1])
        if isinstance(targets, list):
            feedforward = [name for name in feedforward if name in targets]
    return targets, feedforward


def default_target_modules(model: nn.Module, config: IA3Config) -> list[str] | str:
    """The modules (IA)^3 adapts when ``config.target_modules`` is None: PEFT's per-architecture default."""
    return default_modules(model, config)[0]


def _check_default_cut(names: list[str], config: IA3Config, feedforward: list[str] | str, kind: str | None) -> None:
    """The cut default feed-forward list must mark the same targets as PEFT's whole default list would."""
    if config.feedforward_modules is not None or kind not in DEFAULT_MODULES:
        return
    whole = DEFAULT_MODULES[kind][1]
    differ = [n for n in names if is_feedforward(n, feedforward) != is_feedforward(n, whole)]
    if differ:
        raise ValueError(
            f"feedforward_modules was not given, and the default for {kind!r} ({whole}) marks {differ} as feed-forward "
            f"but is not a subset of target_modules={config.target_modules!r}, so the adapter could not be loaded "
            "again (PEFT refuses such a file). Pass feedforward_modules explicitly, e.g. the names of those targets."
        )


def _refuse_other_methods(model: nn.Module) -> None:
    """PEFT's rule: adapters of different methods cannot share a model."""
    for name, layer in adapter_layers(model):
        if not isinstance(layer, IA3Layer) and not is_modules_to_save_wrapper(layer):
            raise ValueError(
                f"Cannot combine adapters with different peft types: {name} holds a {type(layer).__name__}, and an "
                "(IA)^3 adapter can only join other (IA)^3 adapters (PEFT refuses this too). Use another copy of the "
                "base model for it."
            )


def attach(model: nn.Module, config: IA3Config, adapter_name: str) -> list[str]:
    """Add (IA)^3 adapter ``adapter_name`` to every module ``config`` targets; returns their names.

    Targets and feed-forward modules default per architecture (``DEFAULT_MODULES``) and are written into
    ``config`` once attached. Every target is checked before the first layer is swapped, and a failure while
    adding takes back the layers already done, so an error leaves the model (and the config) as it was.

    Raises:
        ValueError: a bad config, no target found, a layer type (IA)^3 cannot wrap, an adapter name already
            there, or another method's adapters on the model.
    """
    if isinstance(config, IA3Config):  # (PEFT's own IA3Config is taken as it is, unchecked)
        config.validate()  # fields may have been changed since the config was made
    _refuse_other_methods(model)
    targets, feedforward = default_modules(model, config)
    check_feedforward_subset(targets, feedforward)
    names = find_targets(model, targets, exclude_modules=config.exclude_modules,
                         skip_inside=inside_adapter_layer(model), skip=config.modules_to_save or ())
    _check_default_cut(names, config, feedforward, model_type(model))
    plans = []
    for name in names:
        module = model.get_submodule(name)
        existing = module if isinstance(module, IA3Layer) else None
        base = existing.base_layer if existing else module
        _kind(base)  # refuses layer types (IA)^3 cannot wrap
        if existing and adapter_name in existing.ia3_l:
            raise ValueError(f"{name} already has an adapter named {adapter_name!r}; pick another name.")
        plans.append((name, existing, base, is_feedforward(name, feedforward)))
    done: list[tuple[str, IA3Layer | None, nn.Module]] = []
    try:
        for name, existing, base, feeds_forward in plans:
            layer = existing or IA3Layer(base, fan_in_fan_out=fan_in_fan_out_for(base, config, name))
            layer.add_adapter(adapter_name, feeds_forward, config.init_ia3_weights)
            if existing is None:
                replace_module(model, name, layer)
            done.append((name, existing, base))
    except BaseException:
        _take_back(model, done, adapter_name)
        raise
    config.target_modules, config.feedforward_modules = targets, feedforward
    return names


def _take_back(model: nn.Module, done: list[tuple[str, IA3Layer | None, nn.Module]], adapter_name: str) -> None:
    """Undo a partial ``attach``: drop the new vector from layers that had others, put new layers' bases back."""
    for name, existing, base in reversed(done):
        if existing is not None:
            existing.delete_adapter(adapter_name)
        else:
            replace_module(model, name, base)


__all__ = ["DEFAULT_MODULES", "IA3Config", "IA3Layer", "attach", "is_feedforward"]


# deltatune train --method ia3: PEFT's targets per architecture unless --target-modules is given; a vector per
# layer trains few values, so it takes larger steps than LoRA (lr 1e-2).
CLI = MethodCli(name="ia3", lr=1e-2, options=(
    CliOption("feedforward-modules", "feedforward_modules", "names", None,
              "targets whose input (not output) is scaled: comma-separated names or a regex "
              "(default: PEFT's for the architecture, e.g. down_proj)"),
))
