"""``PeftModel``: the wrapper users hold. Same names and behaviour as HF PEFT's.

It owns the adapters' configs, decides which adapter is active and trainable, and reads and writes
PEFT adapter folders. It knows methods only through the registry (``methods.METHODS``) and the
``AdapterLayer`` protocol, so a new method needs no change here.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapter_layer import BASE_ADAPTER, AdapterLayer, adapter_layers, replace_module
from .config import PeftConfig, TaskType, read_config_dict
from .formats.peft import adapter_tensors, load_adapter_tensors, read_adapter_weights, write_adapter
from .methods import config_from_dict, method_for
from .modules_to_save import ModulesToSaveWrapper, wrap_modules_to_save
from .targets import CLASSIFIER_HEAD_NAMES

DEFAULT_ADAPTER = "default"


class AdaptedModel(nn.Module):
    """Holds the user's model as ``.model`` so parameter names start with ``base_model.model.`` as in PEFT."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class PeftModel(nn.Module):
    """A base model with one or more named adapters.

    Attributes:
        base_model: an ``AdaptedModel``; ``base_model.model`` is the model that was wrapped.
        peft_config: adapter name -> its config.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        self.base_model = AdaptedModel(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_active", "peft_config"):
                raise
            return getattr(self.base_model, name)

    # ---- adapters -------------------------------------------------------------------------------

    @property
    def active_adapter(self) -> str:
        return self._active[0]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Attach a new adapter (not activated: call ``set_adapter``). A failure leaves the model as it was."""
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; pick another name.")
        if adapter_name == BASE_ADAPTER or not adapter_name or "." in adapter_name:
            raise ValueError(f"{adapter_name!r} cannot name an adapter (reserved, empty, or contains '.').")
        if peft_config.is_prompt_learning and self.peft_config:
            raise ValueError("Prompt-learning adapters cannot share a model with other adapters.")
        method = method_for(peft_config.peft_type)
        model = self.get_base_model()
        if peft_config.task_type == TaskType.SEQ_CLS.value:
            heads = [h for h in CLASSIFIER_HEAD_NAMES if h not in (peft_config.modules_to_save or [])]
            peft_config.modules_to_save = [*(peft_config.modules_to_save or []), *heads]
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
        method.attach(model, peft_config, adapter_name)
        if peft_config.modules_to_save:
            try:
                wrap_modules_to_save(model, peft_config.modules_to_save, adapter_name)
            except ValueError:
                self._remove_adapter_layers(adapter_name)
                raise
        self.peft_config[adapter_name] = peft_config
        self._apply_activation()

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters the ones forward applies, and the ones that train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"No adapter named {unknown}; this model has {sorted(self.peft_config)}.")
        self._active = names
        self._apply_activation()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining adapter becomes active."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}.")
        if len(self.peft_config) == 1:
            raise ValueError("Cannot delete the only adapter; use unload() to get the base model back.")
        self._remove_adapter_layers(adapter_name)
        del self.peft_config[adapter_name]
        self._active = [a for a in self._active if a != adapter_name] or [next(iter(self.peft_config))]
        self._apply_activation()

    def _remove_adapter_layers(self, adapter_name: str) -> None:
        """Drop one adapter's weights; layers left with none go back to their base module."""
        model = self.get_base_model()
        for name, layer in list(adapter_layers(model)):
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names():
                replace_module(model, name, layer.unwrapped(merge=False))

    def _apply_activation(self) -> None:
        """Push the active adapter list into every layer and set requires_grad to match."""
        model = self.get_base_model()
        for param in model.parameters():
            param.requires_grad_(False)
        for _, layer in adapter_layers(model):
            layer.active_adapters = [a for a in self._active if a in layer.adapter_names()]
        for name in self._active:
            config = self.peft_config.get(name)
            if config is None or config.inference_mode:
                continue
            for tensor in adapter_tensors(self, config, name).values():
                if tensor.is_floating_point():
                    tensor.requires_grad_(True)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this block the model computes the base model's output."""
        layers = [layer for _, layer in adapter_layers(self)]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    # ---- merging --------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active (or named) adapters into the base weights; ``unmerge_adapter`` undoes it."""
        names = adapter_names or self._active
        if safe_merge:  # check every layer before writing into any
            self._check_mergeable(names)
        for _, layer in adapter_layers(self):
            layer.merge([n for n in names if n in layer.adapter_names()], safe_merge=safe_merge)

    def _check_mergeable(self, names: list[str]) -> None:
        for path, layer in adapter_layers(self):
            delta_weight = getattr(layer, "delta_weight", None)
            for name in names:
                if delta_weight is None or name not in layer.adapter_names() or name in layer.merged_adapters:
                    continue
                merged = layer.base_weight() + delta_weight(name).detach()
                if not torch.isfinite(merged).all():
                    raise ValueError(f"Merging adapter {name!r} into {path} gives NaN/Inf; nothing was merged.")

    def unmerge_adapter(self) -> None:
        for _, layer in adapter_layers(self):
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the active adapters and return the plain base model, with no adapter layers left."""
        names = adapter_names or self._active
        if safe_merge:
            self._check_mergeable(names)
        model = self.get_base_model()
        for path, layer in list(adapter_layers(model)):
            layer.active_adapters = [n for n in names if n in layer.adapter_names()]
            replace_module(model, path, layer.unwrapped(merge=True))
        return model

    def unload(self) -> nn.Module:
        """Return the base model with every adapter removed and nothing merged."""
        model = self.get_base_model()
        for path, layer in list(adapter_layers(model)):
            replace_module(model, path, layer.unwrapped(merge=False))
        return model

    # ---- running --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names names unknown adapters {unknown}; known: {sorted(self.peft_config)}.")
        layers = [layer for _, layer in adapter_layers(self)]
        if any(layer.merged_adapters for layer in layers):
            raise ValueError("A mixed batch (adapter_names=...) needs unmerged adapters; call unmerge_adapter() first.")
        for layer in layers:
            layer.batch_adapter_names = list(adapter_names)
        try:
            yield
        finally:
            for layer in layers:
                layer.batch_adapter_names = None

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward; ``adapter_names`` gives one adapter per batch row ('__base__' for none)."""
        with self._mixed_batch(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's generate; with ``adapter_names`` each prompt row uses its own adapter."""
        if adapter_names is not None:
            generation_config = kwargs.get("generation_config") or getattr(self.get_base_model(),
                                                                           "generation_config", None)
            beams = kwargs.get("num_beams") or getattr(generation_config, "num_beams", 1) or 1
            returns = kwargs.get("num_return_sequences") or getattr(generation_config, "num_return_sequences", 1) or 1
            copies = beams if beams > 1 else returns  # generate repeats each row this many times
            adapter_names = [n for n in adapter_names for _ in range(copies)]
        with self._mixed_batch(adapter_names):
            return self.get_base_model().generate(*args, **kwargs)

    # ---- counting -------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts."""
        trainable = all_params = 0
        for param in self.parameters():
            count = param.numel()
            all_params += count
            if param.requires_grad:
                trainable += count
        return trainable, all_params

    def print_trainable_parameters(self) -> None:
        trainable, all_params = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {all_params:,d} || "
            f"trainable%: {100 * trainable / max(all_params, 1):.4f}"
        )

    # ---- files ----------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool = False,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as a PEFT folder: "default" at the top, others in sub-folders by name."""
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory!r} is a file; save_pretrained needs a folder.")
        names = selected_adapters or list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"No adapter named {unknown}; this model has {sorted(self.peft_config)}.")
        if not is_main_process:
            return
        model = self.get_base_model()
        for name in names:
            config = self.peft_config[name]
            directory = save_directory if name == DEFAULT_ADAPTER else os.path.join(save_directory, name)
            extra: dict[str, Any] = {"inference_mode": True}
            if config.task_type is None:
                extra["auto_mapping"] = {"base_model_class": type(model).__name__,
                                         "parent_library": type(model).__module__}
            tensors = adapter_tensors(self, config, name, save_embedding_layers=save_embedding_layers)
            write_adapter(directory, config, tensors, extra)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in folder ``model_id`` (frozen unless ``is_trainable``).

        The config and weights are read and checked before the model is touched; if the weights do
        not fit, the model is given back unchanged and the error names the key and both shapes.
        """
        config, weights = _read_adapter(model_id, config, is_trainable)
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper.base_model = AdaptedModel(model)
        wrapper.peft_config = {}
        wrapper._active = []
        wrapper._load_checked(adapter_name, config, weights, os.fspath(model_id))
        wrapper._active = [adapter_name]
        wrapper._apply_activation()
        if not is_trainable:
            wrapper.eval()
        return wrapper

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **kwargs: Any
    ) -> None:
        """Add the adapter saved in ``model_id`` under ``adapter_name`` (not activated)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; pick another name.")
        config, weights = _read_adapter(model_id, kwargs.get("config"), is_trainable)
        self._load_checked(adapter_name, config, weights, os.fspath(model_id))
        self._apply_activation()
        if not is_trainable:
            self.eval()

    def _load_checked(self, adapter_name: str, config: PeftConfig, weights: dict, source: str) -> None:
        self.add_adapter(adapter_name, config)
        try:
            missing, unexpected = load_adapter_tensors(self, config, adapter_name, weights)
        except ValueError:
            self._undo_add(adapter_name)
            raise
        if missing:
            warnings.warn(f"{source}: the file lacks these adapter tensors (left at their initial values): {missing}",
                          stacklevel=3)
        if unexpected:
            warnings.warn(f"{source}: ignoring tensors this model has no place for: {unexpected}", stacklevel=3)

    def _undo_add(self, adapter_name: str) -> None:
        self._remove_adapter_layers(adapter_name)
        self.peft_config.pop(adapter_name, None)
        self._active = [a for a in self._active if a != adapter_name]


def _read_adapter(
    model_id: str | os.PathLike, config: PeftConfig | None, is_trainable: bool
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter folder's config and weights without touching any model."""
    if config is None:
        data = read_config_dict(model_id)
        config = config_from_dict(data, source=os.path.join(os.fspath(model_id), "adapter_config.json"))
    config.inference_mode = not is_trainable
    return config, read_adapter_weights(model_id)


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER, **kwargs: Any
) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config``; only the adapter trains.

    Raises:
        ValueError: the config targets nothing, a target cannot be adapted, or ``model`` is already
            a PeftModel (use ``add_adapter``). The model is left unchanged.
    """
    if isinstance(model, PeftModel):
        raise ValueError("This model is already a PeftModel; use model.add_adapter(name, config) to add another.")
    if any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in model.modules()):
        raise ValueError("This model already holds adapter layers; wrap the original model, or call unload() first.")
    return PeftModel(model, peft_config, adapter_name)
