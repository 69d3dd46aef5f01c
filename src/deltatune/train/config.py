"""``TrainConfig``: every setting of ``deltatune train``, checked before any heavy work.

The dataclass is the single source of truth for the run's own settings: the CLI flags are its fields
(``--grad-accum`` is ``grad_accum``), and a YAML file (``--config run.yaml``) holds the same keys; flags win
over the file. The adapter methods and their settings come from the method registry (``methods.METHODS``, each
entry's ``cli``): ``--method`` takes their names, and each method's flags (``--bottleneck-size``, ...) are
settings here and keys in the YAML file too, kept in ``TrainConfig.options``. LoRA's ``r``, ``alpha`` and
``dropout`` stay fields, as scripts and files written before other methods existed use them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import PeftConfig, check_names, is_real_number
from ..methods import METHODS, Method
from ..methods.lora_init import base_init
from ..methods.options import CliOption, MethodCli
from ..quant.convert import QUANTIZE_NAMES  # --quantize: storage of the frozen base

FORMATS = ("alpaca", "chat", "text")
PRECISIONS = ("auto", "fp32", "bf16")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class TrainConfig:
    """Settings of one training run. Defaults are the ones the default run (no arguments) uses.

    Attributes:
        model: HF model folder or .gguf file; None = the bundled SmolLM2-135M-Instruct.
        data: training file (.jsonl/.json/.csv/.parquet); None = the built-in order-to-JSON task.
        eval_data: held-out file; None = take ``eval_size`` rows out of ``data``.
        format: "alpaca", "chat" or "text"; None = guess from the file's columns.
        method: the adapter method, a ``--method`` name from the registry (``method_names()``: "lora",
            "ia3", "bottleneck", ...).
        r, alpha, dropout: LoRA's rank, lora_alpha and lora_dropout (its ``--r``, ``--alpha``, ``--dropout``);
            None = LoRA's defaults 8, 16, 0.05. Only --method lora takes them.
        target_modules: module names, a regex, or "all-linear"; None = the method's default for a run
            (LoRA: "all-linear", every Linear but the output head, which learns a new output format faster
            than q/v only; (IA)^3 and bottleneck: their per-architecture defaults).
        epochs: passes over the data (used when max_steps <= 0).
        max_steps: optimizer steps; > 0 overrides epochs. The built-in task generates
            max_steps * batch_size * grad_accum training examples, so each is seen once.
        lr: peak learning rate (linear warm-up over the first 5% of steps, then linear decay); None = the
            method's default (LoRA 2e-3, (IA)^3 1e-2, bottleneck 1e-3).
        batch_size: examples per device per micro-batch.
        grad_accum: micro-batches per optimizer step (4 x 2 = 8 examples a step by default:
            the same update as batch 8, with half the activation memory).
        max_length: longest sequence in tokens; longer ones are cut (and counted).
        seed: seeds the model init of the adapter, the data order and the built-in task.
        output: run folder (adapter, log, loss curve, checkpoints); None = runs/default.
        resume: continue from the last checkpoint in ``output``.
        overwrite: allow ``output`` to hold an adapter, a model or an earlier run's checkpoints, which the
            run replaces (refused without it, so that no run destroys earlier work by accident).
        eval_size: held-out rows used for the before/after score (0 = no evaluation).
        max_new_tokens: generation length for exact match; None = longest reference + 8 tokens.
        save_steps: write a resumable checkpoint every this many steps.
        threads: torch CPU threads; None = CPU cores / processes on this machine.
        precision: "fp32", "bf16" (autocast; the adapter and optimizer stay fp32), or "auto" =
            bf16 where the hardware computes it natively (a CUDA GPU with bf16, or a CPU with
            AVX512-BF16 / AMX), fp32 elsewhere.
        quantize: None, "nf4", "fp4" or "int8": store the frozen base's linear layers in 4 or 8 bits
            (QLoRA); the adapter trains in float beside them.
        loraplus_ratio: LoRA+ (Hayou et al. 2024): B's learning rate is ``lr`` times this (e.g. 16); None = plain
            LoRA, one learning rate. Only --method lora takes it.
        packing: padding-free batches: a micro-batch's rows are joined into one sequence whose position ids
            restart at each row (transformers' ``DataCollatorWithFlattening``), so no step computes padding;
            attention stays within each row and the loss equals the padded batch's. Layer methods only (a
            prompt-learning method prepends its virtual tokens per row).
        options: the chosen method's other settings by their key (``{"bottleneck_size": 64}``), as
            ``--bottleneck-size 64`` or ``bottleneck_size: 64`` in the YAML file give them; a setting another
            method declares is refused, naming its method.
    """

    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    format: str | None = None
    method: str = "lora"
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: list[str] | str | None = None
    epochs: float = 1.0
    max_steps: int = 0
    lr: float | None = None
    batch_size: int = 4
    grad_accum: int = 2
    max_length: int = 256
    seed: int = 0
    output: str | None = None
    resume: bool = False
    overwrite: bool = False
    eval_size: int = 100
    max_new_tokens: int | None = None
    save_steps: int = 20
    threads: int | None = None
    precision: str = "auto"
    quantize: str | None = None
    loraplus_ratio: float | None = None
    packing: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.target_modules = _split_names(self.target_modules)
        if isinstance(self.options, dict):
            self.options = dict(self.options)  # defaults are filled in: never into the caller's dict
        self.validate()

    def validate(self) -> None:
        """Raise ValueError / FileNotFoundError for a bad setting, naming it and what is expected.

        Every check here is cheap and touches nothing on disk, so a bad value (a NaN learning rate, a
        number written in quotes in the YAML file, a bottleneck size of 0) stops the run before anything is
        loaded or removed. Settings left None get the chosen method's defaults first (lr, target_modules, its
        flags); the method's settings are checked by building its config, so its own checks speak.
        """
        self._check_types()
        for name, allowed in (("format", FORMATS), ("precision", PRECISIONS), ("quantize", QUANTIZE_NAMES),
                              ("method", method_names())):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(allowed)}"
                                 f"{' or none' if name == 'quantize' else ''}.")
        self._use_method_defaults()
        for name in ("batch_size", "grad_accum", "save_steps"):
            _positive_int(name, getattr(self, name))
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}.")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError(f"Give epochs > 0 or max_steps > 0 (got epochs={self.epochs}, "
                             f"max_steps={self.max_steps}).")
        if self.max_length < 8:
            raise ValueError(f"max_length must be an integer >= 8, got {self.max_length!r}.")
        if self.eval_size < 0:
            raise ValueError(f"eval_size must be >= 0, got {self.eval_size!r}.")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer from 0 to 2**32 - 1, got {self.seed!r}.")
        for name in ("threads", "max_new_tokens"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        self._check_loraplus()
        if self.packing and method_entry(self.method).kind != "layers":
            raise ValueError(f"packing joins a batch's rows into one sequence; --method {self.method} prepends its "
                             "virtual tokens to each row, so it needs padded batches. Leave --packing out.")
        check_names("target_modules", self.target_modules)
        self._check_method_settings()
        for key in ("data", "eval_data"):
            _check_data_path(key, getattr(self, key))
        if self.output is not None:
            _check_output_path(self.output)

    def _check_loraplus(self) -> None:
        if self.loraplus_ratio is None:
            return
        if self.method != "lora":
            raise ValueError(f"loraplus_ratio (LoRA+) sets the learning rate of LoRA's B matrices; --method "
                             f"{self.method} has none. Use it with --method lora, or leave it out.")
        if self.loraplus_ratio <= 0:
            raise ValueError(f"loraplus_ratio must be > 0 (B's learning rate is lr times it; e.g. 16), got "
                             f"{self.loraplus_ratio!r}.")

    def _check_types(self) -> None:
        """Each setting has the type its field says; a YAML value in quotes ("16") is text, not a number.

        The method's settings (LoRA's r/alpha/dropout fields and ``options``) have the kinds their method
        declares, checked in ``_check_method_settings``.
        """
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), FIELD_KINDS[f.name]
            if kind == "options" and not isinstance(value, dict):
                raise ValueError(f"options must be a mapping of method settings, got {_shown(value)}.")
            if kind == "method setting" or (value is None and f.name in OPTIONAL):
                continue
            _check_kind(f.name, value, kind)

    def option(self, key: str) -> Any:
        """The value of method setting ``key`` (a field for LoRA's r/alpha/dropout, else in ``options``)."""
        return getattr(self, key) if key in _FIELDS else self.options.get(key)

    def _set_option(self, key: str, value: Any) -> None:
        if key in _FIELDS:
            setattr(self, key, value)
        else:
            self.options[key] = value

    def _use_method_defaults(self) -> None:
        """Fill what is left None with the chosen method's defaults: lr, target_modules and its flags; split a
        comma-separated list of names. Idempotent, so validate() can run again after a change."""
        cli = method_cli(self.method)
        if self.lr is None:
            self.lr = cli.lr
        if self.target_modules is None:
            self.target_modules = cli.target_modules
        for opt in cli.options:
            value = self.option(opt.key)
            if value is None and opt.default is not None:
                self._set_option(opt.key, opt.default)
            elif value is not None and opt.kind == "names":
                self._set_option(opt.key, _split_names(value))

    def _check_method_settings(self) -> None:
        """Every method setting given is known and belongs to the chosen method, has its declared type, and
        the method's config accepts the lot (its own checks, worded with the flag's name)."""
        declared = {opt.key: opt for opt in method_cli(self.method).options}
        known = method_options()
        for key in sorted(self.options):
            if key in _FIELDS:
                raise ValueError(f"options: {key!r} is a TrainConfig field; give it as {key}=..., not in options.")
            if key not in known:
                raise ValueError(f"options: unknown method setting {key!r}; known: {', '.join(sorted(known))}.")
        for key in sorted(known):
            if self.option(key) is not None and key not in declared:
                owners = " / ".join(f"--method {name}" for name, _ in known[key])
                takes = ", ".join(f"--{opt.flag}" for opt in declared.values()) or "no method settings"
                raise ValueError(f"{key} is a setting of {owners}, not of --method {self.method} (which takes "
                                 f"{takes}).")
        for key, opt in declared.items():
            _check_option(opt, self.option(key))
        method = method_entry(self.method)
        if self.target_modules is not None and not takes_targets(method):
            raise ValueError(f"target_modules does not apply to --method {self.method}: it adapts no modules "
                             f"({method.config_class.__name__} has no target_modules).")
        method_config(self)

    @property
    def use_bf16(self) -> bool:
        """Whether to train and evaluate under bf16 autocast (see ``precision``)."""
        if self.precision != "auto":
            return self.precision == "bf16"
        import torch

        if torch.cuda.is_available():
            return torch.cuda.is_bf16_supported()
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())

    @property
    def output_dir(self) -> str:
        return self.output or os.path.join("runs", "default")


# How each setting is checked: its type (None is allowed for the OPTIONAL ones), ranges in validate(). LoRA's
# r, alpha and dropout are checked as lora's registry entry declares them ("method setting").
FIELD_KINDS = {
    "model": "text", "data": "text", "eval_data": "text", "format": "text", "method": "text",
    "r": "method setting", "alpha": "method setting", "dropout": "method setting", "target_modules": "names",
    "epochs": "number", "max_steps": "int", "lr": "number", "batch_size": "int", "grad_accum": "int",
    "max_length": "int", "seed": "int", "output": "text", "resume": "bool", "overwrite": "bool", "eval_size": "int",
    "max_new_tokens": "int", "save_steps": "int", "threads": "int", "precision": "text", "quantize": "text",
    "loraplus_ratio": "number", "packing": "bool", "options": "options",
}
OPTIONAL = frozenset({"model", "data", "eval_data", "format", "output", "max_new_tokens", "threads", "quantize",
                      "lr", "target_modules", "loraplus_ratio"})
_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig)) - {"options"}


# ---- the methods, from the registry ------------------------------------------------------------------------------

def cli_methods() -> dict[str, Method]:
    """``--method`` name -> registry entry, in registry order (the methods that declare a ``cli``)."""
    return {method.cli.name: method for method in METHODS.values() if method.cli is not None}


def method_names() -> tuple[str, ...]:
    """The ``--method`` choices."""
    return tuple(cli_methods())


def method_entry(name: str) -> Method:
    """The registry entry of ``--method name`` (a known name: validate() checked it)."""
    return cli_methods()[name]


def method_cli(name: str) -> MethodCli:
    """The ``MethodCli`` of ``--method name``."""
    return method_entry(name).cli


def method_options() -> dict[str, list[tuple[str, CliOption]]]:
    """Setting key -> [(method name, its declaration)] over every method; methods may share a flag."""
    found: dict[str, list[tuple[str, CliOption]]] = {}
    for name, method in cli_methods().items():
        for opt in method.cli.options:
            found.setdefault(opt.key, []).append((name, opt))
    return found


def takes_targets(method: Method) -> bool:
    """Whether the method adapts modules chosen by ``target_modules`` (prompt-type methods do not)."""
    return any(f.name == "target_modules" for f in dataclasses.fields(method.config_class))


def method_config(config: TrainConfig, base_name: str | None = None) -> PeftConfig:
    """The adapter config of the run: the chosen method's config class built from its settings.

    ``base_name`` is what adapter_config.json records as the base model: for the bundled SmolLM2 its hub id
    (``ModelSource.name``), which PEFT and vLLM can load and deltatune maps back to the bundled file.

    Raises:
        ValueError: the config class refuses a value; the message names the flag (``alpha``, not
            ``lora_alpha``) where the two differ.
    """
    method = method_entry(config.method)
    values = {opt.field: config.option(opt.key) for opt in method.cli.options if config.option(opt.key) is not None}
    if takes_targets(method):
        values["target_modules"] = config.target_modules
    values.update(_init_settings(values.get("init_lora_weights"), config.quantize))
    try:
        return method.config_class(task_type="CAUSAL_LM", base_model_name_or_path=base_name, **values)
    except ValueError as err:
        raise ValueError(_worded_as_flags(str(err), method.cli.options)) from err


def _init_settings(init: Any, quantize: str | None) -> dict[str, Any]:
    """What ``--init`` needs from ``--quantize``: LoftQ fits the adapter to the error of that quantized base, and
    PiSSA / OLoRA need the float weights (PEFT's order is: initialise, then quantize the residual)."""
    if init == "loftq":
        if quantize not in ("nf4", "int8"):
            raise ValueError(f"--init loftq fits the adapter to the error of a quantized base; add --quantize nf4 "
                             f"(or int8){'' if quantize is None else f', not {quantize}'}.")
        return {"loftq_config": {"loftq_bits": 4 if quantize == "nf4" else 8, "loftq_iter": 1}}
    if quantize and base_init(init) in ("pissa", "olora"):
        raise ValueError(f"--init {init} needs the float base weights, so it cannot be combined with --quantize "
                         f"{quantize}; use --init loftq for a quantized base, or train {init} without --quantize.")
    return {}


def _worded_as_flags(message: str, options: tuple[CliOption, ...]) -> str:
    """A config error that starts with a field name, started with the setting's name instead."""
    for opt in options:
        if opt.field != opt.key and message.startswith(opt.field):
            return opt.key + message[len(opt.field):]
    return message


def _check_option(opt: CliOption, value: Any) -> None:
    """A method setting's value against its declaration (None = not given)."""
    if value is None:
        return
    if opt.kind == "names":
        check_names(opt.key, value)
        return
    _check_kind(opt.key, value, opt.kind)
    if opt.choices and value not in opt.choices:
        raise ValueError(f"Unknown {opt.key} {value!r}; expected one of {', '.join(opt.choices)}.")
    if opt.positive and value <= 0:
        raise ValueError(f"{opt.key} must be > 0, got {value!r}.")


def _check_kind(name: str, value: Any, kind: str) -> None:
    """``value`` is of ``kind`` ("int", "number", "text", "bool"; "names" is checked by check_names)."""
    if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{name} must be an integer, got {_shown(value)}.")
    if kind == "number" and not is_real_number(value):
        raise ValueError(f"{name} must be a number, got {_shown(value)}.")
    if kind == "number" and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r} (NaN and infinity make the "
                         "run's weights or length meaningless).")
    if kind == "text" and not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {_shown(value)}.")
    if kind == "text" and not value:
        raise ValueError(f"{name} must not be empty; leave it out for the default.")
    if kind == "bool" and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {_shown(value)}.")


_PLAIN_NAME = re.compile(r"[\w.]+")


def _split_names(value: Any) -> Any:
    """"q_proj,v_proj" (a flag or YAML text) as a list of names, and so is one plain name ("down_proj"): as a
    config's string it would be a regex that must match a module's whole dotted name, which a bare name never
    does (a silent no-op for feedforward_modules). A regex or "all-linear" stays as it is."""
    if isinstance(value, str) and "," in value:
        return [name.strip() for name in value.split(",") if name.strip()]
    if isinstance(value, str) and _PLAIN_NAME.fullmatch(value):
        return [value]
    return value


def _shown(value: Any) -> str:
    """A wrong value as an error shows it, with the fix for the usual cause: a number in quotes in the YAML file."""
    if isinstance(value, str):
        return f"the text {value!r} (in a YAML file, write numbers and true/false without quotes)"
    return f"{value!r} ({type(value).__name__})"


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_output_path(output: str) -> None:
    """The run folder must be (or be creatable as) a folder: not a file, and not under one."""
    if os.path.isfile(output):
        raise ValueError(f"output {output!r} is a file; give a folder for the run.")
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(f"output {output!r} is under {parent!r}, which is a file, not a folder; choose another "
                         "--output.")


def _check_data_path(key: str, path: str | None) -> None:
    if path is None:
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key} file {path!r} does not exist.")
    if os.path.isdir(path):
        raise ValueError(f"{key} {path!r} is a folder; give a .jsonl, .json, .csv or .parquet file.")
    if not path.lower().endswith(DATA_SUFFIXES):
        raise ValueError(f"{key} file {path!r} has an unsupported suffix; expected one of {', '.join(DATA_SUFFIXES)}.")


def field_names() -> list[str]:
    """Every setting's name: TrainConfig's fields and every method's settings (the flags and YAML keys)."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "options"]
    return names + [key for key in method_options() if key not in _FIELDS]


def config_from_sources(yaml_path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a YAML file (optional) and explicit settings; the settings win.

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ValueError: the YAML is unreadable, not a mapping, or has keys TrainConfig does not know.
    """
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(_read_yaml(yaml_path))
    from_file = set(values) - {k for k, v in overrides.items() if v is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    options = {key: values.pop(key) for key in list(values) if key not in _FIELDS}
    try:
        return TrainConfig(**values, options=options)
    except (ValueError, FileNotFoundError) as err:  # a bad value from the file: say which file
        message = str(err)
        if any(message.startswith((f"{key} ", f"{key}=", f"Unknown {key} ")) for key in from_file):
            raise type(err)(f"{yaml_path}: {message}") from err
        raise


# A plain (unquoted) YAML scalar such as 1e-3, 5e-4 or 2E-3 is a number to YAML 1.2 and to every reader of the
# file, but PyYAML follows YAML 1.1, where a float needs a dot, and returns the text "1e-3". Quoted values stay text.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that also reads 1e-3 (no dot) as a float."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))
    return Loader


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist.")
    if not os.path.isfile(path):
        raise ValueError(f"config {path!r} is not a file; give a YAML file (key: value per line).")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8.") from err
    except RecursionError as err:
        raise ValueError(f"{path} is not valid YAML: it nests too deeply.") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings (key: value), got {type(data).__name__}.")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {', '.join(field_names())}.")
    return data
