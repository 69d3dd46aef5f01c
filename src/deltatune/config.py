"""The config base class shared by every method, and its JSON form (PEFT's adapter_config.json).

A config is a dataclass: the single source of truth for a method's settings. On disk it is the
flat JSON object HF PEFT writes, so files move freely between the two libraries.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
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


class PeftType(str, enum.Enum):
    """The method names as they appear in the "peft_type" key of adapter_config.json."""

    LORA = "LORA"


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
        if isinstance(self.peft_type, PeftType):
            self.peft_type = self.peft_type.value
        if self.task_type is not None and self.task_type not in TaskType.__members__:
            raise ValueError(
                f"task_type={self.task_type!r} is not known; use one of {sorted(TaskType.__members__)} or None."
            )
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    @property
    def is_prompt_learning(self) -> bool:
        """True for methods that change the inputs rather than wrap layers (prefix/prompt/P-tuning)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict: the dataclass fields (see ``_written_only_when_set``), sets as sorted lists."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self._never_written or (f.name in self._written_only_when_set and value == _default(f)):
                continue
            if isinstance(value, (set, frozenset)):
                value = sorted(value)
            out[f.name] = value
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, **extra: Any) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (extra keys are added verbatim)."""
        os.makedirs(save_directory, exist_ok=True)
        data = {**self.to_dict(), **extra}
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")

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
        except ValueError as err:
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
        directory = _local_config_folder(pretrained_model_name_or_path, subfolder, kwargs.pop("revision", None))
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


def _default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (made fresh from its factory)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _local_config_folder(path: str | os.PathLike, subfolder: str | None, revision: str | None) -> str:
    """The folder to read a config from, or an error saying why there is none (no Hub access here)."""
    if revision not in (None, "main"):
        raise ValueError(f"revision={revision!r} needs the Hugging Face Hub; deltatune reads configs from local "
                         "folders only (download that revision first, e.g. with huggingface_hub.snapshot_download).")
    directory = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No folder {directory!r}. deltatune reads adapter configs from local folders only: downloading "
            f"from the Hugging Face Hub is not available offline. Download the adapter first and pass its "
            f"folder (the one holding {CONFIG_NAME})."
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
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    if "peft_type" not in data:
        raise ValueError(f"{path} has no 'peft_type' key; it is not a PEFT adapter config.")
    return data


__all__ = ["CONFIG_NAME", "HUB_DOWNLOAD_KWARGS", "PeftConfig", "PeftType", "TaskType", "read_config_dict"]
