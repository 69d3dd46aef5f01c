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
from typing import Any

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


# Keys that newer PEFT versions write for features deltatune does not have. A key at its
# "off" value is dropped silently; a key that switches the feature on is refused, because
# loading the adapter without it would give silently wrong outputs.
_PEFT_FEATURE_KEYS_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "use_bdlora": (None, False),
    "megatron_config": (None,),
}
# Keys that PEFT writes which carry no meaning once the adapter is trained.
_PEFT_INERT_KEYS = {
    "auto_mapping", "peft_version", "megatron_core", "loftq_config", "eva_config", "corda_config",
    "qalora_group_size", "ensure_weight_tying", "kasa_config", "lora_ga_config", "monteclora_config",
    "velora_config", "runtime_config",
}


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
    """

    peft_type: str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    modules_to_save: list[str] | None = None

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
        """The JSON-ready dict: every dataclass field, sets as sorted lists."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
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

        Keys a newer PEFT writes are tolerated: inert ones are dropped, unknown ones dropped with a
        warning. Keys that switch on a feature deltatune lacks raise, naming the key.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in _PEFT_FEATURE_KEYS_OFF_VALUES:
                if value not in _PEFT_FEATURE_KEYS_OFF_VALUES[key]:
                    raise ValueError(
                        f"{source}: {key}={value!r} asks for a PEFT feature deltatune does not support. "
                        f"Remove the key (or set it to {_PEFT_FEATURE_KEYS_OFF_VALUES[key][0]!r}) only if the "
                        "adapter was trained without it."
                    )
            elif key not in _PEFT_INERT_KEYS:
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"{source}: ignoring keys deltatune does not know (written by a newer PEFT?): {sorted(unknown)}",
                stacklevel=2,
            )
        return cls(**kwargs)


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


__all__ = ["CONFIG_NAME", "PeftConfig", "PeftType", "TaskType", "read_config_dict"]
