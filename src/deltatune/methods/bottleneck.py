"""Bottleneck adapters: a small d -> m -> d network with a residual connection inside each Transformer block.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", section 2.1 and figure 2: the adapter
h + up(f(down(h))) is inserted twice per layer, after the attention block and after the feed-forward block,
each time on the sub-layer's output before the block's residual add and layer norm ("houlsby").
Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning" (arXiv
2005.00247), and AdapterHub (Pfeiffer et al. 2020, arXiv 2007.07779): one adapter per layer, after the
feed-forward block only, reading the block's output after its residual add and layer norm ("pfeiffer").

The computation is AdapterHub's (``adapters`` 1.3.0, ``SeqBnConfig`` = pfeiffer, ``DoubleSeqBnConfig`` =
houlsby; tests/methods/test_bottleneck.py checks equal logits). With A(x) = dropout(scaling * up(f(down(x)))),
sub-layer output h and sub-layer input (the residual) r:

    post-LN block (BERT: dense -> dropout -> LayerNorm(h + r)), houlsby:  LN(h + A(h) + r)
    post-LN block, pfeiffer:                                             LN(h + r + A(LN(h + r)))
    pre-LN model (Llama: r + h), houlsby on attention and MLP:           r + h + A(h)
    pre-LN model, pfeiffer on the decoder layer's output z = r + h:      z + A(z)

Not mergeable: the adapter is a non-linear network, which no change of a weight can fold away.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..adapter_layer import (
    BASE_ADAPTER,
    AdapterLayer,
    check_batch_size,
    inside_adapter_layer,
    replace_module,
    rows_by_adapter,
)
from ..config import PeftConfig, check_layers, check_names, check_number, is_real_number
from ..targets import find_targets, is_linear_like, model_type
from .options import CliOption, MethodCli

PLACEMENTS = ("pfeiffer", "houlsby")
DEFAULT_NON_LINEARITY = {"pfeiffer": "relu", "houlsby": "swish"}  # AdapterHub's SeqBnConfig / DoubleSeqBnConfig
DEFAULT_REDUCTION_FACTOR = 16
# AdapterHub's names (transformers' ACT2FN, which AdapterHub uses), computed with torch alone.
NON_LINEARITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
}
INIT_MODES = ("mam_adapter", "bert", "houlsby")

# Where the adapters go when target_modules is not given: model_type -> placement -> full-match regex.
_PRE_LN = {"houlsby": r"(.*\.)?layers\.\d+\.(self_attn|mlp)", "pfeiffer": r"(.*\.)?layers\.\d+"}
_POST_LN = {"houlsby": r"(.*\.)?layer\.\d+\.(attention\.)?output", "pfeiffer": r"(.*\.)?layer\.\d+\.output"}
LAYOUTS: dict[str, dict[str, str]] = {
    **{t: _PRE_LN for t in ("llama", "mistral", "qwen2", "qwen3")},
    **{t: _POST_LN for t in ("bert", "roberta", "xlm-roberta")},
}

NOT_MERGEABLE = (
    "Bottleneck adapters cannot be merged: the adapter is a small network with a non-linearity, "
    "x + up(f(down(x))), and no change of the wrapped layer's weights computes that. Nothing was changed. Keep the "
    "adapter unmerged (it runs beside the layer), or call unload() to get the base model back without it."
)


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapter settings (AdapterHub's ``SeqBnConfig`` / ``DoubleSeqBnConfig``; see the module docstring).

    Attributes:
        bottleneck_size: m, the adapter's inner width. Give this or ``reduction_factor``, not both.
        reduction_factor: m = int(hidden // reduction_factor), as AdapterHub; 16 when neither is given.
        non_linearity: f, one of ``NON_LINEARITIES``; None takes AdapterHub's preset ("relu" for pfeiffer,
            "swish" for houlsby).
        placement: "pfeiffer" (after the feed-forward block) or "houlsby" (after attention and feed-forward).
        init_weights: "mam_adapter" (down Kaiming-uniform, up zero: the model's output is unchanged at first),
            "bert" (both N(0, 0.02^2), AdapterHub's default: near identity), "houlsby" (both N(0, 0.01^2) cut at
            +-0.02: near-zero projections, so near identity, Houlsby et al. section 2.1); biases start at zero.
        scaling: the adapter's output is multiplied by this (He et al. 2022's scaled addition; 1.0 = none).
        dropout: dropout on the adapter's output, before the residual add.
        target_modules: modules whose output gets an adapter (list: equal or dotted suffix; str: full-match
            regex). None takes the architecture's layout (``LAYOUTS``). A module with ``dense``, ``dropout`` and
            ``LayerNorm`` (BERT's SelfOutput / Output) is treated as a post-LN block, any other by its output.
        layers_to_transform: only these block indices (AdapterHub's ``leave_out`` is the complement).
        layers_pattern: name of the block container ("layers", "layer") for layers_to_transform.
    """

    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    non_linearity: str | None = None
    placement: str = "pfeiffer"
    init_weights: str = "mam_adapter"
    scaling: float = 1.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        self.peft_type = "BOTTLENECK"
        if isinstance(self.non_linearity, str):
            self.non_linearity = self.non_linearity.lower()  # AdapterHub lower-cases it too
        if self.non_linearity is None and self.placement in PLACEMENTS:
            self.non_linearity = DEFAULT_NON_LINEARITY[self.placement]
        if self.bottleneck_size is None and self.reduction_factor is None:
            self.reduction_factor = DEFAULT_REDUCTION_FACTOR
        if isinstance(self.target_modules, (set, frozenset, tuple)):
            self.target_modules = sorted(self.target_modules)
        super().__post_init__()  # runs validate()

    def validate(self) -> None:
        """Refuse a wrong value, naming the field and what it takes.

        Raises:
            ValueError: the first field whose value is wrong.
        """
        super().validate()
        if not isinstance(self.placement, str) or self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}.")
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ValueError(f"give bottleneck_size or reduction_factor, not both (got bottleneck_size="
                             f"{self.bottleneck_size!r}, reduction_factor={self.reduction_factor!r}).")
        if self.bottleneck_size is not None:
            _check_size(self.bottleneck_size)
        if self.reduction_factor is not None:
            check_number("reduction_factor", self.reduction_factor)
            if self.reduction_factor <= 0:
                raise ValueError(f"reduction_factor must be > 0 (bottleneck = hidden // reduction_factor), "
                                 f"got {self.reduction_factor!r}.")
        if not isinstance(self.non_linearity, str) or self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"non_linearity={self.non_linearity!r} is not known; use one of {list(NON_LINEARITIES)}.")
        if not isinstance(self.init_weights, str) or self.init_weights not in INIT_MODES:
            raise ValueError(f"init_weights must be one of {INIT_MODES}, got {self.init_weights!r}.")
        check_number("scaling", self.scaling)
        if not is_real_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}.")
        check_names("target_modules", self.target_modules)
        check_layers(self.layers_to_transform, self.layers_pattern)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only has a meaning together with layers_to_transform.")


def _check_size(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"bottleneck_size must be a positive integer (the adapter's inner width), got {value!r}.")
    if value >= 2**63:
        raise ValueError(f"bottleneck_size={value} is too large to be a tensor dimension.")


def is_post_ln_block(module: nn.Module) -> bool:
    """BERT's SelfOutput / Output shape: ``LayerNorm(dropout(dense(x)) + input_tensor)``."""
    return (isinstance(getattr(module, "dense", None), nn.Module) and isinstance(getattr(module, "dropout", None),
            nn.Module) and isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm))


def _adapter_factory(base: nn.Module) -> dict[str, Any]:
    """Device of the base module; its dtype when fp32/fp64, else fp32 (adapters train in full precision)."""
    param = next((p for p in base.parameters() if p.is_floating_point()), None)
    if param is None:
        return {"device": None, "dtype": torch.float32}
    dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
    return {"device": param.device, "dtype": dtype}


class BottleneckLayer(nn.Module):
    """Wraps one module and adds named bottleneck adapters to what it computes (see the module docstring).

    ``kind`` is "block" for a post-LN block (the adapter goes inside, before its LayerNorm) or "output" (the
    adapter goes on the module's output; for a tuple output, on its first element).
    """

    def __init__(self, base_layer: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = "block" if is_post_ln_block(base_layer) else "output"
        self.hidden_size = hidden_size
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.non_linearity: dict[str, str] = {}
        self.scaling: dict[str, float] = {}
        self.ln_before: dict[str, bool] = {}  # pfeiffer: the adapter reads LN(h + r) in a post-LN block
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []  # always empty: nothing can be merged
        self.disabled = False
        self.batch_adapter_names: list[str] | None = None

    def adapter_names(self) -> list[str]:
        return list(self.adapter_down)

    def add_adapter(self, name: str, size: int, non_linearity: str, placement: str, scaling: float = 1.0,
                    dropout: float = 0.0, init_weights: str = "mam_adapter") -> None:
        """Create adapter ``name``: down (hidden -> size) and up (size -> hidden) linear layers with biases."""
        if name in self.adapter_down:
            raise ValueError(f"This layer already has an adapter named {name!r}.")
        factory = _adapter_factory(self.base_layer)
        try:
            self.adapter_down[name] = nn.Linear(self.hidden_size, size, **factory)
            self.adapter_up[name] = nn.Linear(size, self.hidden_size, **factory)
        except (RuntimeError, MemoryError) as err:
            self.delete_adapter(name)
            raise ValueError(f"Could not allocate a bottleneck adapter of size {size} for a {self.hidden_size}-wide "
                             f"layer (torch: {str(err).splitlines()[0]}); choose a smaller bottleneck.") from err
        self.adapter_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.non_linearity[name] = non_linearity
        self.scaling[name] = scaling
        self.ln_before[name] = placement == "pfeiffer"
        self.reset_parameters(name, init_weights)

    @torch.no_grad()
    def reset_parameters(self, name: str, init_weights: str) -> None:
        """AdapterHub's three inits (``Adapter.__init__``); biases zero in each.

        "mam_adapter": down Kaiming-uniform, up zero, so A(x) = 0 and the model is unchanged (He et al. 2022,
        "Towards a Unified View of Parameter-Efficient Transfer Learning"); "bert": both N(0, 0.02^2);
        "houlsby": both N(0, 0.01^2) cut at +-0.02 (near-zero projections: near identity, Houlsby et al. 2.1).
        """
        down, up = self.adapter_down[name], self.adapter_up[name]
        if init_weights == "mam_adapter":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
        elif init_weights == "bert":
            nn.init.normal_(down.weight, std=0.02)
            nn.init.normal_(up.weight, std=0.02)
        else:
            for linear in (down, up):
                nn.init.trunc_normal_(linear.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.bias)

    def delete_adapter(self, adapter_name: str) -> None:
        for store in (self.adapter_down, self.adapter_up, self.adapter_dropout):
            if adapter_name in store:
                del store[adapter_name]
        for table in (self.non_linearity, self.scaling, self.ln_before):
            table.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name not in self.adapter_down:
            return {}
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        return {"adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}

    def _live(self) -> list[str]:
        """The active adapters this layer holds, in order."""
        return [name for name in self.active_adapters if name in self.adapter_down]

    def check_mergeable(self) -> None:
        """Always refuses (``PeftModel`` calls this before merging anything): see ``NOT_MERGEABLE``."""
        raise ValueError(NOT_MERGEABLE)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Refuses, changing nothing, when asked to merge any adapter this layer holds.

        Raises:
            ValueError: a bottleneck adapter is a non-linear network, which cannot be folded into a weight.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        if any(name in self.adapter_down for name in names):
            raise ValueError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        """Nothing is ever merged, so nothing to undo."""

    def unwrapped(self, merge: bool) -> nn.Module:
        """The wrapped module, for ``unload()``; ``merge=True`` with an active adapter here raises (nothing changes).

        Raises:
            ValueError: merging was asked for (``merge_and_unload``); see ``NOT_MERGEABLE``.
        """
        if merge and self._live():
            raise ValueError(NOT_MERGEABLE)
        return self.base_layer

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """A(x) = dropout(scaling * up(f(down(x)))), in x's dtype."""
        down = self.adapter_down[name]
        hidden = NON_LINEARITIES[self.non_linearity[name]](down(x.to(down.weight.dtype)))  # (..., m)
        return self.adapter_dropout[name](self.adapter_up[name](hidden) * self.scaling[name]).to(x.dtype)

    def _stack(self, names: list[str], h: torch.Tensor, residual: torch.Tensor | None,
               layer_norm: nn.Module | None) -> torch.Tensor:
        """Adapters one after another (AdapterHub's Stack): h <- h + A(x), x = LN(h + r) for pfeiffer in a
        post-LN block, else x = h."""
        for name in names:
            x = layer_norm(h + residual) if layer_norm is not None and self.ln_before[name] else h
            h = h + self.adapter_output(name, x)
        return h

    def _adapt(self, h: torch.Tensor, residual: torch.Tensor | None, layer_norm: nn.Module | None) -> torch.Tensor:
        """The active adapters on h, or in a mixed batch each row's own adapter (none for '__base__')."""
        if self.batch_adapter_names is None:
            return self._stack(self._live(), h, residual, layer_norm)
        check_batch_size(self.batch_adapter_names, h.shape[0])
        out = h
        for name, rows in rows_by_adapter(self.batch_adapter_names, h.device).items():
            if name == BASE_ADAPTER or name not in self.adapter_down:
                continue
            rows_residual = None if residual is None else residual[rows]
            out = out.index_copy(0, rows, self._stack([name], h[rows], rows_residual, layer_norm))
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or (self.batch_adapter_names is None and not self._live()):
            return self.base_layer(*args, **kwargs)
        if self.kind == "block":
            hidden_states, input_tensor = _block_inputs(args, kwargs)
            base = self.base_layer
            h = base.dropout(base.dense(hidden_states))
            return base.LayerNorm(self._adapt(h, input_tensor, base.LayerNorm) + input_tensor)
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return self._adapt(out, None, None)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (self._adapt(out[0], None, None), *out[1:])
        raise TypeError(f"A bottleneck adapter on a {type(self.base_layer).__name__} needs it to return a tensor or "
                        f"a tuple starting with one, got {type(out).__name__}; target another module.")

    def extra_repr(self) -> str:
        sizes = {name: down.out_features for name, down in self.adapter_down.items()}
        return f"kind={self.kind}, hidden_size={self.hidden_size}, bottleneck={sizes}"


def _block_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states, input_tensor) of a call to a BERT-style SelfOutput / Output block."""
    values = list(args) + [kwargs[k] for k in ("hidden_states", "input_tensor") if k in kwargs]
    if len(values) != 2:
        raise TypeError("a post-LN block is called as block(hidden_states, input_tensor); got "
                        f"{len(args)} positional and {sorted(kwargs)} keyword arguments.")
    return values[0], values[1]


def default_target_modules(model: nn.Module, config: BottleneckConfig) -> str:
    """The target regex of ``config.placement``'s layout for this architecture, or an error naming the model type."""
    kind = model_type(model)
    if kind not in LAYOUTS:
        raise ValueError(
            f"target_modules was not given and deltatune knows no bottleneck adapter layout for model type {kind!r} "
            f"(known: {sorted(LAYOUTS)}). Pass target_modules: the modules whose output gets an adapter (a post-LN "
            "block with dense/dropout/LayerNorm gets it before its LayerNorm, as BERT's attention.output / output)."
        )
    return LAYOUTS[kind][config.placement]


def _hidden_size(model: nn.Module, base: nn.Module, where: str) -> int:
    """The width of the hidden states the adapter reads: a block's dense output, a linear layer's output,
    else the model's ``config.hidden_size`` (as AdapterHub)."""
    if is_post_ln_block(base):
        return int(base.dense.out_features)
    if is_linear_like(base):
        return int(base.out_features if hasattr(base, "out_features") else base.weight.shape[1])
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int) or hidden <= 0:
        raise ValueError(f"{where}: cannot tell the width of this {type(base).__name__}'s output (the model has no "
                         "config.hidden_size); target a linear layer or a block instead.")
    return hidden


def _bottleneck_size(config: BottleneckConfig, hidden: int, where: str) -> int:
    """bottleneck_size, or int(hidden // reduction_factor) as AdapterHub computes it (which must be >= 1)."""
    if config.bottleneck_size is not None:
        return config.bottleneck_size
    size = int(hidden // config.reduction_factor)
    if size <= 0:
        raise ValueError(f"{where}: reduction_factor={config.reduction_factor!r} gives a bottleneck of "
                         f"int({hidden} // {config.reduction_factor!r}) = {size} units for this {hidden}-wide layer; "
                         f"use a reduction_factor <= {hidden} or set bottleneck_size.")
    return size


def _check_wrappable(name: str, module: nn.Module) -> None:
    """Refuse a module that is, or holds, another method's adapter layer: wrapping it would rename its tensors."""
    for inner_name, inner in module.named_modules():
        if isinstance(inner, AdapterLayer):
            where = f"{name}.{inner_name}" if inner_name else name
            raise ValueError(
                f"{name}: cannot add a bottleneck adapter here, since {where} is a {type(inner).__name__} of another "
                "adapter; wrapping it would change its tensor names. Add the bottleneck adapter first, or choose "
                "other target_modules."
            )


def attach(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> list[str]:
    """Add bottleneck adapter ``adapter_name`` to every module ``config`` targets; returns their names.

    Every target is checked (layout, widths, sizes, names) before the first module is swapped, and a failure while
    adding takes back what was done, so an error always leaves the model as it was.
    """
    config.validate()  # fields may have changed since the config was made
    if config.target_modules is None:
        config.target_modules = default_target_modules(model, config)
    names = find_targets(model, config.target_modules, layers_to_transform=config.layers_to_transform,
                         layers_pattern=config.layers_pattern, skip_inside=inside_adapter_layer(model),
                         skip=config.modules_to_save or ())
    plans = []
    for name in names:
        module = model.get_submodule(name)
        existing = module if isinstance(module, BottleneckLayer) else None
        if existing is None:
            _check_wrappable(name, module)
        elif adapter_name in existing.adapter_down:
            raise ValueError(f"{name} already has an adapter named {adapter_name!r}; pick another name.")
        hidden = existing.hidden_size if existing else _hidden_size(model, module, name)
        plans.append((name, existing, module, _bottleneck_size(config, hidden, name), hidden))
    done: list[tuple[str, BottleneckLayer | None, nn.Module]] = []
    try:
        for name, existing, module, size, hidden in plans:
            layer = existing or BottleneckLayer(module, hidden)
            layer.add_adapter(adapter_name, size, config.non_linearity, config.placement, scaling=config.scaling,
                              dropout=config.dropout, init_weights=config.init_weights)
            if existing is None:
                replace_module(model, name, layer)
            done.append((name, existing, module))
    except BaseException:
        for name, existing, module in reversed(done):
            if existing is not None:
                existing.delete_adapter(adapter_name)
            else:
                replace_module(model, name, module)
        raise
    return names


# ---- AdapterHub's files ----------------------------------------------------------------------------------------

# AdapterHub's key: <module>[.attention_adapters|.output_adapters].adapters.<name>.<adapter_down.0|adapter_up>.<leaf>
_ADAPTERHUB_KEY = re.compile(r"^(?P<path>.+?)(?:\.(?P<loc>attention_adapters|output_adapters))?\.adapters\."
                             r"(?P<name>[^.]+)\.(?P<param>adapter_down\.0|adapter_up)\.(?P<leaf>weight|bias)$")
# pre-LN models: where AdapterHub's per-layer adapters sit, as deltatune's target under the decoder layer
_ADAPTERHUB_LOCATIONS = {("houlsby", "attention_adapters"): ".self_attn", ("houlsby", "output_adapters"): ".mlp",
                         ("pfeiffer", "output_adapters"): ""}
# AdapterHub BnConfig options and the only values deltatune computes exactly (the SeqBn / DoubleSeqBn presets)
_ADAPTERHUB_FIXED = {"original_ln_after": True, "residual_before_ln": True, "adapter_residual_before_ln": False,
                     "ln_before": False, "ln_after": False, "is_parallel": False, "use_gating": False,
                     "phm_layer": False, "inv_adapter": None, "cross_adapter": False, "stochastic_depth": 0.0}
# options that change nothing once the weights are loaded, or only matter for a switched-off feature
_ADAPTERHUB_INERT = {"architecture", "init_weights_seed", "inv_adapter_reduction_factor", "phm_dim",
                     "factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule", "phm_c_init",
                     "phm_init_range", "learn_phm", "hypercomplex_nonlinearity", "phm_rank", "phm_bias"}


def from_adapterhub_state_dict(state_dict: dict[str, torch.Tensor], placement: str,
                               prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """AdapterHub bottleneck tensors renamed to deltatune's adapter-file keys (ready for
    ``set_peft_model_state_dict`` or an ``adapter_model.safetensors``).

    Both sides name modules as in the same transformers model class (e.g. ``LlamaForCausalLM``). The mapping:
    ``<block>.adapters.<name>.adapter_down.0.<w|b>`` -> ``<prefix><block>.adapter_down.<w|b>`` (BERT-style
    blocks hold AdapterHub's adapters themselves); in pre-LN models ``<layer>.attention_adapters.adapters.<name>.``
    -> ``<layer>.self_attn.`` and ``<layer>.output_adapters.adapters.<name>.`` -> ``<layer>.mlp.`` (houlsby) or
    ``<layer>.`` (pfeiffer, the decoder layer's output); ``adapter_up.<w|b>`` keeps its name.

    Raises:
        ValueError: a key of a part deltatune does not have (layer norms, gates, PHM, invertible adapters), or
            an attention adapter with placement "pfeiffer"; names the key.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}.")
    out = {}
    for key, tensor in state_dict.items():
        match = _ADAPTERHUB_KEY.match(key)
        if match is None:
            raise ValueError(f"{key!r} is not a tensor of an AdapterHub bottleneck adapter that deltatune computes "
                             "(only adapter_down.0 and adapter_up weights and biases are).")
        path, loc = match["path"], match["loc"]
        if loc is not None:
            if (placement, loc) not in _ADAPTERHUB_LOCATIONS:
                raise ValueError(f"{key!r}: a {placement} adapter has no adapter at AdapterHub's {loc}.")
            path += _ADAPTERHUB_LOCATIONS[(placement, loc)]
        out[f"{prefix}{path}.{match['param'].removesuffix('.0')}.{match['leaf']}"] = tensor
    return out


def config_from_adapterhub(options: dict[str, Any], layers: list[int] | None = None) -> BottleneckConfig:
    """The ``BottleneckConfig`` that computes what AdapterHub's BnConfig ``options`` compute (its ``config`` dict).

    Args:
        layers: the block indices holding adapters, for a non-empty ``leave_out`` (AdapterHub does not record
            how many layers the model has).

    Raises:
        ValueError: an option deltatune does not reproduce exactly, naming it and its value.
    """
    shape = (options.get("mh_adapter"), options.get("output_adapter"), options.get("original_ln_before"))
    placements = {(False, True, True): "pfeiffer", (True, True, False): "houlsby"}
    if shape not in placements:
        raise ValueError(f"AdapterHub adapter with mh_adapter, output_adapter, original_ln_before = {shape} is neither "
                         "SeqBnConfig (pfeiffer) nor DoubleSeqBnConfig (houlsby); deltatune computes only those.")
    known = {"mh_adapter", "output_adapter", "original_ln_before", "reduction_factor", "non_linearity", "scaling",
             "dropout", "init_weights", "leave_out", *_ADAPTERHUB_FIXED, *_ADAPTERHUB_INERT}
    unknown = sorted(set(options) - known)
    wrong = [f"{k}={options[k]!r}" for k, v in _ADAPTERHUB_FIXED.items() if k in options and options[k] != v]
    if unknown or wrong or isinstance(options.get("reduction_factor"), dict) or isinstance(options.get("scaling"), str):
        raise ValueError(f"AdapterHub options deltatune does not compute: {wrong + unknown}, or a per-layer "
                         "reduction_factor / learned scaling; only SeqBnConfig and DoubleSeqBnConfig as preset, with "
                         "reduction_factor, non_linearity, scaling (a number), dropout, init_weights and leave_out.")
    return BottleneckConfig(
        reduction_factor=options.get("reduction_factor", DEFAULT_REDUCTION_FACTOR), placement=placements[shape],
        non_linearity=options.get("non_linearity"), scaling=float(options.get("scaling", 1.0)),
        dropout=options.get("dropout", 0.0), init_weights=options.get("init_weights", "bert"),
        layers_to_transform=sorted(layers) if options.get("leave_out") and layers else None,
    )


def read_adapterhub(directory: str) -> tuple[BottleneckConfig, dict[str, torch.Tensor]]:
    """Read a folder AdapterHub's ``save_adapter(..., use_safetensors=True)`` wrote (adapter_config.json +
    adapter.safetensors) as a deltatune config and adapter-file tensors.

    Usage: ``config, tensors = read_adapterhub(d); model = get_peft_model(base, config);
    set_peft_model_state_dict(model, tensors)``.

    Raises:
        ValueError / FileNotFoundError: a missing or unreadable file, or options deltatune does not compute.
    """
    with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    weights = load_file(os.path.join(directory, "adapter.safetensors"))
    layers = sorted({int(m.group(1)) for k in weights if (m := re.search(r"\.layers?\.(\d+)\.", k))})
    config = config_from_adapterhub(meta.get("config", {}), layers)
    return config, from_adapterhub_state_dict(weights, config.placement)


# deltatune train --method bottleneck: AdapterHub's pfeiffer layout (one adapter per block), m = hidden // 16.
CLI = MethodCli(name="bottleneck", lr=1e-3, options=(
    CliOption("bottleneck-size", "bottleneck_size", "int", None,
              "the adapter's inner width m (instead of --reduction-factor)"),
    CliOption("reduction-factor", "reduction_factor", "number", None,
              "m = hidden size // this (16 when --bottleneck-size is not given)"),
    CliOption("placement", "placement", "text", "pfeiffer",
              "pfeiffer: after the feed-forward block; houlsby: after attention and after the feed-forward block",
              choices=PLACEMENTS),
    CliOption("non-linearity", "non_linearity", "text", None,
              "the adapter's activation (default: relu for pfeiffer, swish for houlsby)",
              choices=tuple(NON_LINEARITIES)),
))
