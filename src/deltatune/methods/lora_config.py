"""LoRA's settings: ``LoraConfig``, with every field of PEFT's ``LoraConfig`` and the checks that go with them.

Split from ``lora.py`` (the layer and ``attach``) because PEFT's field list, and what deltatune does with
each field it lacks, is an idea of its own: a field at PEFT's default is always accepted, a value that
switches on a feature deltatune does not have is refused naming the field.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..config import PeftConfig, check_layers, check_names, check_number, check_patterns, is_real_number
from ..targets import model_type
from .lora_init import base_init, check_loftq_config, is_pissa_niter_typo
from .lora_slices import check_enable_lora

# LoRA's per-architecture defaults when target_modules is not given (model_type -> module names; PEFT's
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for these types).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{t: ["q_proj", "v_proj"] for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt", "bart",
        "gptj", "gpt_neo", "stablelm", "olmo", "olmo2", "phi3_small", "smollm3", "granite",
    )},
    **{t: ["query", "value"] for t in ("bert", "roberta", "xlm-roberta", "electra", "layoutlm")},
    **{t: ["query_key_value"] for t in ("gpt_neox", "bloom", "falcon", "chatglm", "RefinedWeb", "RefinedWebModel")},
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
}


def default_target_modules(model: nn.Module, config: object = None) -> list[str]:
    """LoRA's per-architecture default target modules, or an error that says how to choose."""
    kind = model_type(model)
    if kind in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[kind])
    raise ValueError(
        f"target_modules was not given and there is no default for model type {kind!r}. "
        "Pass target_modules, e.g. a list of module names, a regex, or 'all-linear'."
    )


BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "orthogonal", "pissa", "pissa_niter_<K>", "olora", "loftq")
# PEFT's other init_lora_weights values: each needs data (activations or gradients) deltatune does not collect.
PEFT_ONLY_INIT_MODES = ("eva", "corda", "lora_ga", "mica")
# ... of which these only choose A and B's starting values, which a loaded file replaces, so an adapter
# file written with them loads as a plain LoRA adapter (as PEFT's own loader treats it).
_INIT_MODES_PLAIN_ONCE_TRAINED = ("eva",)

# PEFT LoraConfig fields for features deltatune does not have yet: field -> (what it is, the values that
# leave it off; the first is PEFT's default). Any other value is refused, here and in a file PEFT wrote,
# since running the adapter without the feature would give other outputs than PEFT.
UNSUPPORTED_FIELDS: dict[str, tuple[str, tuple[Any, ...]]] = {
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
# Fields deltatune has that a file leaves out at their default (PEFT reads a missing one as the default).
_SUPPORTED_WRITTEN_WHEN_SET = ("use_dora", "enable_lora")


@dataclass
class LoftQConfig:
    """PEFT's LoftQ settings, for ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))``.

    Attributes:
        loftq_bits: 4 (NF4, blocks of 64, no double quantization) or 8 (row-wise int8): the quantized base the
            adapter starts by absorbing the error of.
        loftq_iter: alternating rounds of quantize / low-rank fit (1 is LoftQ's usual choice; more fit closer).
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        check_loftq_config({"loftq_bits": self.loftq_bits, "loftq_iter": self.loftq_iter})


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
        use_dora: DoRA (Liu et al. 2024): also train a magnitude per output, W' = m (W + s B A) / ||W + s B A||
            (``methods/lora_dora.py``); on Linear, Conv1D, Embedding and ConvNd (not grouped) layers, float or
            quantized bases. Costs one out-wide activation per layer more than LoRA; merge for inference.
        init_lora_weights: True (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r), B zero),
            "orthogonal" (A and B from orthogonal rows so that B A = 0; linear layers, even r), False
            (both random: the adapter changes the output from the start; for tests), or one that starts from the
            base weight and changes the base to match (``methods/lora_init.py``): "pissa" (top-r singular
            vectors), "pissa_niter_K" (the same by a randomised SVD), "olora" (QR), "loftq" (quantizes the base
            and fits its error; needs ``loftq_config``). PEFT's other modes (``PEFT_ONLY_INIT_MODES``) are refused.
        loftq_config: ``LoftQConfig`` (or its dict) for init_lora_weights="loftq".
        enable_lora: deltatune's (loralib's name): which q/k/v slices of a fused projection get LoRA, e.g.
            ``[True, False, True]`` on GPT-2's ``c_attn`` or Phi-3's ``qkv_proj`` (``methods/lora_slices.py``);
            each enabled slice gets rank r. Written to files as the equal plain LoRA adapter PEFT can load.
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
    use_dora: bool = False
    enable_lora: list[bool] | None = None
    # PEFT's fields for features deltatune does not have yet (see UNSUPPORTED_FIELDS)
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
        {*UNSUPPORTED_FIELDS, *_INIT_CONFIG_FIELDS, *_INERT_FIELDS, *_SUPPORTED_WRITTEN_WHEN_SET})
    _never_written: ClassVar[frozenset[str]] = frozenset({"runtime_config"})

    def __post_init__(self) -> None:
        self.peft_type = "LORA"
        self.target_modules = _as_list(self.target_modules)
        self.exclude_modules = _as_list(self.exclude_modules)
        self.runtime_config = _runtime_config(self.runtime_config)
        if self.use_dora is None:  # what some PEFT versions wrote for "off"
            self.use_dora = False
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
        for name in ("fan_in_fan_out", "use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if not isinstance(self.bias, str) or self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}.")
        _check_init_mode(self.init_lora_weights)
        check_enable_lora(self.enable_lora)
        if self.enable_lora is not None and (self.use_dora or base_init(self.init_lora_weights)):
            raise ValueError("enable_lora (LoRA on slices of a fused layer) cannot be combined with use_dora or "
                             f"init_lora_weights={self.init_lora_weights!r}; use plain LoRA on the slices.")
        if self.init_lora_weights == "loftq":
            self.loftq_config = check_loftq_config(self.loftq_config)
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
    """The modes of INIT_MODES work; PEFT's other modes get a clear 'not supported yet'."""
    if isinstance(mode, str) and mode in PEFT_ONLY_INIT_MODES:
        raise ValueError(
            f"init_lora_weights={mode!r} is not supported yet by deltatune; use one of {INIT_MODES}. (A CorDA "
            "adapter loads once PEFT saved it as plain LoRA, with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...).)"
        )
    if is_pissa_niter_typo(mode):
        raise ValueError(f"init_lora_weights={mode!r}: write 'pissa_niter_K' with K the number of subspace "
                         "iterations of the randomised SVD, e.g. 'pissa_niter_4'.")
    if base_init(mode) is None and (mode not in INIT_MODES or (mode in (0, 1) and not isinstance(mode, bool))):
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
