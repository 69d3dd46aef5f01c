"""The config base class shared by every method, and its JSON form (PEFT's adapter_config.json).

A config is a dataclass: the single source of truth for a method's settings. On disk it is the
flat JSON object HF PEFT writes, so files move freely between the two libraries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import numbers
import os
import re
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """What the base model does; it decides how the wrapper treats heads (as in PEFT)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# hf_hub_download's options (and the older names PEFT still passes on): they choose what to download from the
# Hub, so on a local folder they have nothing to do.
HUB_DOWNLOAD_KWARGS = frozenset({
    "cache_dir", "dry_run", "endpoint", "etag_timeout", "force_download", "headers", "library_name",
    "library_version", "local_dir", "local_files_only", "proxies", "repo_type", "resume_download", "token",
    "tqdm_class", "use_auth_token", "user_agent",
})


@dataclass
class PeftConfig:
    """Settings every method shares.

    Attributes:
        peft_type: the method, as written in adapter_config.json ("LORA", ...).
        task_type: what the base model does (``TaskType``); SEQ_CLS also trains the classifier head.
        base_model_name_or_path: where the base model came from; filled in on save when unknown.
        revision: the base model's revision, kept for PEFT compatibility.
        inference_mode: True freezes the adapter (set on every saved file, as PEFT does).
        modules_to_save: modules (by name, matched like list ``target_modules``) trained in full and
            saved with the adapter, e.g. a new classifier head.
        auto_mapping: the base model's class, which PEFT records for models without a task type.
        peft_version: the PEFT version that wrote a file (kept as read; deltatune leaves it unset).
    """

    peft_type: str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    modules_to_save: list[str] | None = None
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None

    # Fields left out of the JSON while they hold their default (absent means the default in every PEFT
    # version, and older PEFTs then load the file without warnings), and fields never written (runtime only).
    _written_only_when_set: ClassVar[frozenset[str]] = frozenset({"peft_version"})
    _never_written: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if isinstance(self.peft_type, enum.Enum):  # methods.PeftType, or PEFT's
            self.peft_type = self.peft_type.value
        if isinstance(self.modules_to_save, (list, tuple, set, frozenset)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.base_model_name_or_path, os.PathLike):
            self.base_model_name_or_path = os.fspath(self.base_model_name_or_path)
        self.validate()
        from .integrations import install  # trainers imported by now learn to take this config (stdlib-only module)

        install()

    def validate(self) -> None:
        """Refuse values of the wrong type or out of range, naming the field and what it takes.

        Called on construction and again when an adapter is attached (a field may have been changed since):
        a wrong value must stop here, not turn into a NaN model or a traceback deep inside.

        Raises:
            ValueError: the first field whose value is wrong.
        """
        if self.task_type is not None and (not isinstance(self.task_type, str)
                                           or self.task_type not in TaskType.__members__):
            raise ValueError(
                f"task_type={self.task_type!r} is not known; use one of {sorted(TaskType.__members__)} or None."
            )
        if self.modules_to_save is not None and not _is_str_list(self.modules_to_save):
            raise ValueError(f"modules_to_save={self.modules_to_save!r} must be a list of module names, "
                             "e.g. ['lm_head'], or None.")
        for name in ("base_model_name_or_path", "revision", "peft_version"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}={value!r} must be a string or None.")
        if not isinstance(self.inference_mode, bool):
            raise ValueError(f"inference_mode={self.inference_mode!r} must be True or False.")
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            raise ValueError(f"auto_mapping={self.auto_mapping!r} must be a dict or None.")

    @property
    def is_prompt_learning(self) -> bool:
        """True for methods that change the inputs rather than wrap layers (prefix/prompt/P-tuning)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict: the dataclass fields (see ``_written_only_when_set``), sets as sorted lists.

        Raises:
            ValueError: a field holds NaN or Infinity, which JSON cannot hold (Python would write bare ``NaN``
                that other readers refuse, and the adapter would compute NaN anyway).
        """
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self._never_written or (f.name in self._written_only_when_set and value == _default(f)):
                continue
            if isinstance(value, (set, frozenset)):
                value = sorted(value)
            out[f.name] = value
        check_json_finite(out, type(self).__name__)
        return out

    def to_json_string(self, **extra: Any) -> str:
        """The text of ``adapter_config.json``: ``to_dict()`` plus ``extra``, strict JSON (no NaN/Infinity).

        Raises:
            ValueError: a value that is not finite or not JSON-serializable, naming the field.
        """
        data = {**self.to_dict(), **extra}
        check_json_finite(data, type(self).__name__)
        for key, value in data.items():
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{type(self).__name__}.{key}={value!r} cannot be written to {CONFIG_NAME}: {err}. "
                                 "Use plain numbers, strings, lists and dicts.") from err
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, **extra: Any) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (extra keys are added verbatim).

        The file is written to a temporary name and renamed, so a crash never leaves a half-written config.
        """
        text = self.to_json_string(**extra)  # every check before the folder is touched
        os.makedirs(save_directory, exist_ok=True)
        write_atomically(os.path.join(save_directory, CONFIG_NAME), lambda path: _write_text(path, text))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PeftConfig:
        """Build a config from a dict such as one read from adapter_config.json.

        Keys this config has no field for (written by a newer PEFT) are dropped with a warning. A field
        the config refuses (a PEFT feature deltatune lacks, switched on) raises, naming ``source``.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(
                f"{source}: ignoring keys deltatune does not know (written by a newer PEFT?): {unknown}",
                stacklevel=2,
            )
        try:
            return cls(**{key: value for key, value in data.items() if key in names})
        except (ValueError, TypeError) as err:  # TypeError: a value of a type no check foresaw
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfig:
        """Read ``adapter_config.json`` from a local folder, as PEFT's ``PeftConfig.from_pretrained``.

        ``PeftConfig.from_pretrained`` returns the method's own class (``LoraConfig`` for ``"LORA"``);
        ``LoraConfig.from_pretrained`` also checks the file is a LoRA config.

        Args:
            pretrained_model_name_or_path: the adapter folder (deltatune does not download from the Hub).
            subfolder: the config lies in this sub-folder (e.g. a named adapter that ``save_pretrained`` wrote).
            kwargs: as in PEFT: config fields fill in keys the file lacks (the file wins); Hub download
                options (``token``, ``cache_dir``, ...) have no effect on a local folder, and say so;
                ``revision`` can only be None or "main", since a local folder has no revisions.

        Raises:
            FileNotFoundError: no such folder (Hub ids cannot be downloaded here), or no adapter_config.json.
            ValueError: a bad or unknown config, a revision, or a file of another method than ``cls``.
            TypeError: a keyword argument that is neither a config field nor a Hub download option.
        """
        directory = local_adapter_folder(pretrained_model_name_or_path, subfolder, kwargs.pop("revision", None))
        hub_options = sorted(k for k in kwargs if k in HUB_DOWNLOAD_KWARGS and kwargs[k] not in (None, False))
        if hub_options:
            warnings.warn(f"{hub_options} only apply to downloads from the Hub and have no effect on the local "
                          f"folder {directory!r}.", stacklevel=2)
        data = read_config_dict(directory)
        source = os.path.join(directory, CONFIG_NAME)
        from .methods import method_for  # the registry imports this module: look it up only when called

        config_class = method_for(data["peft_type"], source).config_class
        fields = {f.name for f in dataclasses.fields(config_class)}
        unknown = sorted(k for k in kwargs if k not in fields and k not in HUB_DOWNLOAD_KWARGS)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained() got unexpected keyword arguments {unknown}; it takes "
                            f"{config_class.__name__} fields and Hub download options.")
        defaults = {k: v for k, v in kwargs.items() if k in fields}
        config = config_class.from_dict({**defaults, **data}, source=source)
        if not isinstance(config, cls):
            raise ValueError(f"{source} holds a {config_class.__name__} (peft_type={data['peft_type']!r}), not a "
                             f"{cls.__name__}; use PeftConfig.from_pretrained to read any method's config.")
        return config


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def is_real_number(value: Any) -> bool:
    """An int or float (numpy scalars too), but not a bool nor a string that looks like a number."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def non_finite_paths(value: Any, path: str) -> list[str]:
    """Where NaN or +-Infinity sits in a JSON-like value (dicts, lists, numbers), as ``path['key'][0]``."""
    if is_real_number(value) and not isinstance(value, numbers.Integral):
        return [] if math.isfinite(float(value)) else [path]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in non_finite_paths(item, f"{path}[{key!r}]")]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [p for i, item in enumerate(value) for p in non_finite_paths(item, f"{path}[{i}]")]
    return []


def check_number(name: str, value: Any) -> None:
    """A finite int or float; a string such as "16" is refused rather than guessed at (PEFT takes it silently and
    fails later, or computes with it)."""
    if not is_real_number(value):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__}); pass e.g. {name}=16.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}: the update is scaled by it, so every output "
                         "would be NaN or infinite.")


def check_regex(name: str, pattern: str, template: str) -> None:
    """``pattern`` as it will be used (inside ``template``) must compile; say so here, not as a re.error later."""
    try:
        re.compile(template.format(pattern))
    except re.error as err:
        raise ValueError(f"{name}={pattern!r} is not a valid regular expression ({err}); give a list of module "
                         "names, or a valid regex.") from err


def check_names(name: str, value: Any, template: str = "^(?:{})$") -> None:
    """None, a list of module names, or one string (a full-match regex, or "all-linear")."""
    if value is None:
        return
    if isinstance(value, str):
        check_regex(name, value, template)
        return
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name}={value!r} must be a list of module names (strings), a regex string, or None "
                         "(target_modules also takes 'all-linear').")


def check_patterns(name: str, patterns: Any, check_value: Callable[[str, Any], None]) -> None:
    """rank_pattern / alpha_pattern: {regex on the module name: value}."""
    if not isinstance(patterns, dict):
        raise ValueError(f"{name} must be a dict {{module name regex: value}}, got {patterns!r}.")
    for key, value in patterns.items():
        if not isinstance(key, str):
            raise ValueError(f"{name} keys must be strings (module name regexes), got {key!r}.")
        check_regex(f"{name} key", key, r"(.*\.)?({})$")  # as targets.resolve_pattern uses it
        check_value(f"{name}[{key!r}]", value)


def check_layers(layers_to_transform: Any, layers_pattern: Any) -> None:
    """layers_to_transform: None, a block index or a list of them; layers_pattern: None, a name or a list."""
    indices = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    if indices is not None and (not isinstance(indices, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)):
        raise ValueError(f"layers_to_transform must be a block index (int >= 0), a list of them, or None; "
                         f"got {layers_to_transform!r}.")
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if patterns is None:
        return
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"layers_pattern must be a name, a list of names, or None; got {layers_pattern!r}.")
    for pattern in patterns:
        check_regex("layers_pattern", pattern, r"(?:.*\.)?{}\.(\d+)(?:\.|$)")  # as targets.layer_index uses it

def check_json_finite(data: dict[str, Any], owner: str) -> None:
    """Refuse NaN/Infinity anywhere in a config dict, naming each field that holds one."""
    bad = [p for key, value in data.items() for p in non_finite_paths(value, key)]
    if bad:
        raise ValueError(f"{owner} holds non-finite values (NaN or Infinity) in {bad}; an adapter config must hold "
                         "finite numbers (JSON has no NaN/Infinity, and such a scale makes every output NaN).")


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Let ``write`` fill a temporary file next to ``path``, then rename it over ``path``.

    A crash or a full disk midway leaves the old file (or none), never a torn one; the temporary file is
    removed on failure.
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # made by ``write``: normal mode
    try:
        write(tmp)
        with open(tmp, "r+b") as fh:  # on disk before the rename makes it the file
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (made fresh from its factory)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def local_adapter_folder(path: str | os.PathLike, subfolder: str | None, revision: str | None) -> str:
    """The local adapter folder (``path``/``subfolder``), or an error saying why there is none (no Hub access here)."""
    if revision not in (None, "main"):
        raise ValueError(f"revision={revision!r} needs the Hugging Face Hub; deltatune reads configs from local "
                         "folders only (download that revision first, e.g. with huggingface_hub.snapshot_download).")
    directory = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Adapter folder {directory!r} does not exist. deltatune reads adapters from local folders only: "
            f"downloading from the Hugging Face Hub is not available offline. Pass the folder that "
            f"save_pretrained wrote (it holds {CONFIG_NAME}), or download the adapter first."
        )
    return directory


def read_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    """Read adapter_config.json from ``directory`` with errors that say what to fix."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Adapter folder {directory!r} does not exist. Pass the folder that save_pretrained wrote "
            f"(it holds {CONFIG_NAME} and adapter_model.safetensors)."
        )
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {directory!r} is not an adapter folder.")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}).") from err
    except (UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not a readable JSON text ({err}).") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    if "peft_type" not in data:
        raise ValueError(f"{path} has no 'peft_type' key; it is not a PEFT adapter config.")
    return data


__all__ = ["CONFIG_NAME", "HUB_DOWNLOAD_KWARGS", "PeftConfig", "TaskType", "read_config_dict"]
