"""``PeftModel``: the wrapper users hold. Same names, signatures and behaviour as HF PEFT's.

It owns the adapters' configs, decides which adapter is active and trainable, and reads and writes
PEFT adapter folders. It knows methods only through the registry (``methods.METHODS``) and two small
protocols: ``AdapterLayer`` for methods that wrap layers, and ``prompt_learning.PromptModule`` for methods
that change the inputs (prompt, P-, prefix tuning; their modules live in ``prompt_encoder``, as in PEFT, and
``forward`` / ``generate`` pass every call through ``prompt_learning_tasks``, per task type). A new method needs no
change here. The per-task subclasses (``PeftModelForCausalLM``, ...) and ``get_peft_model`` live in ``tasks.py``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import integrations
from .adapted_model import AdaptedModel
from .adapter_layer import BASE_ADAPTER, adapter_layers, replace_module
from .config import PeftConfig, TaskType
from .formats.peft import adapter_tensors, check_finite, load_adapter_tensors, prompt_module, write_adapter
from .functional import remove_adapter_layers, resolve_save_embedding_layers, values_from_state_dict
from .loading import adapter_directory, check_adapter_name, read_adapter
from .methods import method_for
from .methods.lora_init import convert_to_plain_lora, read_initial_adapter
from .methods.lora_slices import file_config
from .modules_to_save import wrap_modules_to_save
from .prompt_learning import check_combination, refuse_merge, trainable_tensors
from .prompt_learning_tasks import prompted_forward, prompted_generate
from .quant.kbit import is_bnb_quantized_param, peft_param_count, quantized_param_count

DEFAULT_ADAPTER = "default"
# Heads a task trains in full next to the adapter (PEFT's classifier_module_names / qa_module_names).
TASK_HEADS: dict[str, tuple[str, ...]] = {
    TaskType.SEQ_CLS.value: ("classifier", "score"),
    TaskType.TOKEN_CLS.value: ("classifier", "score"),
    TaskType.QUESTION_ANS.value: ("qa_outputs",),
}


class PeftModel(nn.Module):
    """A base model with one or more named adapters.

    Attributes:
        base_model: an ``AdaptedModel``; ``base_model.model`` is the model that was wrapped.
        peft_config: adapter name -> its config.
        prompt_encoder: adapter name -> its ``PromptModule`` (only once a prompt-learning adapter is added).
    """

    _prompt_disabled = False  # disable_adapter(): prompt-learning adapters leave the inputs alone

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER,
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        integrations.install()
        self.base_model = AdaptedModel(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self._frozen_adapters: set[str] = set()
        self.add_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype,
                         freeze_base=True)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_active", "peft_config", "_frozen_adapters"):
                raise
            # Trainers probe attributes the wrapper lacks; if one was imported after this model was made, this
            # is where its integration gets installed (a no-op when nothing new was imported)
            integrations.install()
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

    @property
    def peft_type(self) -> str | None:
        return self.active_peft_config.peft_type

    @property
    def targeted_module_names(self) -> list[str]:
        return self.base_model.targeted_module_names

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True, *, freeze_base: bool = False) -> None:
        """Attach a new adapter (not activated: call ``set_adapter``). A failure leaves the model as it was.

        As in PEFT, the base model's parameters are frozen only when the model is first wrapped
        (``freeze_base``); adding an adapter later leaves parameters the user unfroze alone.
        ``low_cpu_mem_usage`` is accepted for PEFT's signature: adapter weights are small and made in place.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; pick another name.")
        if not hasattr(peft_config, "peft_type"):
            raise TypeError(f"peft_config must be a config such as deltatune.LoraConfig, got {type(peft_config)!r}.")
        check_combination(list(self.peft_config.values()), peft_config)
        method = method_for(peft_config.peft_type)
        model = self.get_base_model()
        heads = TASK_HEADS.get(peft_config.task_type or "", ())
        extra_heads = [h for h in heads if h not in (peft_config.modules_to_save or [])]
        if extra_heads:
            peft_config.modules_to_save = [*(peft_config.modules_to_save or []), *extra_heads]
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
        # layers: takes back its own layers when it fails; inputs: changes nothing, returns the PromptModule
        attached = method.attach(model, peft_config, adapter_name)
        try:
            if peft_config.modules_to_save:
                wrap_modules_to_save(model, peft_config.modules_to_save, adapter_name)
        except BaseException:
            self._remove_adapter_layers(adapter_name)
            raise
        if method.kind == "inputs":
            if "prompt_encoder" not in self._modules:
                self.prompt_encoder = nn.ModuleDict()
            self.prompt_encoder[adapter_name] = attached
        self.peft_config[adapter_name] = peft_config
        if freeze_base:
            for param in model.parameters():
                param.requires_grad_(False)
        if not autocast_adapter_dtype:
            self._cast_adapter_to_base_dtype(adapter_name)
        self._apply_activation()

    def _adapter_parameters(self, adapter_name: str) -> list[torch.Tensor]:
        """What trains for one adapter: its file tensors, and a prompt module's every parameter (a
        reparameterization trains too, though only its output is saved)."""
        tensors = list(adapter_tensors(self, self.peft_config[adapter_name], adapter_name).values())
        module = prompt_module(self, adapter_name)
        return tensors + (trainable_tensors(module) if module is not None else [])

    def _cast_adapter_to_base_dtype(self, adapter_name: str) -> None:
        """``autocast_adapter_dtype=False``: keep the adapter in the base layer's bf16/fp16 instead of fp32."""
        for _, layer in adapter_layers(self.get_base_model()):
            dtype = next((p.dtype for p in layer.base_layer.parameters() if p.is_floating_point()), None)
            if dtype not in (torch.float16, torch.bfloat16):
                continue
            for tensor in layer.adapter_state_dict(adapter_name).values():
                if tensor.is_floating_point():
                    tensor.data = tensor.data.to(dtype)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make these adapters the ones forward applies and (unless ``inference_mode``) the ones that train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"No adapter named {unknown}; this model has {sorted(self.peft_config)}.")
        if len(names) > 1 and any(self.peft_config[n].is_prompt_learning for n in names):
            raise ValueError(f"Only one prompt-learning adapter can be active at a time, got {names}.")
        self._active = names
        self._frozen_adapters = set(names) if inference_mode else set()
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

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """Add LoRA adapter ``adapter_name`` combining ``adapters`` with ``weights`` (PEFT's method of the same
        name: "svd", "linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune" and the "*_svd" forms).
        Not activated. Bad input raises ValueError and leaves the model unchanged; see ``methods.lora_combine``."""
        from .methods.lora_combine import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                             svd_full_matrices, svd_driver, density, majority_sign_method)

    def _remove_adapter_layers(self, adapter_name: str) -> None:
        """Drop one adapter's weights; layers left with none go back to their base module."""
        remove_adapter_layers(self.get_base_model(), adapter_name)
        modules = self._modules.get("prompt_encoder")
        if modules is not None and adapter_name in modules:
            del modules[adapter_name]
            if not len(modules):
                del self.prompt_encoder

    def _apply_activation(self) -> None:
        """Push the active adapter list into every layer; only the active adapters' tensors train.

        Only adapter tensors are touched (as in PEFT): base parameters the user unfroze stay trainable.
        """
        model = self.get_base_model()
        for _, layer in adapter_layers(model):
            layer.active_adapters = [a for a in self._active if a in layer.adapter_names()]
        trainable = [n for n in self._active if not self.peft_config[n].inference_mode
                     and n not in self._frozen_adapters]
        for name in self.peft_config:  # freeze first, so shared tensors end up trainable
            if name not in trainable:
                for tensor in self._adapter_parameters(name):
                    tensor.requires_grad_(False)
        for name in trainable:
            for tensor in self._adapter_parameters(name):
                if tensor.is_floating_point():
                    tensor.requires_grad_(True)

    def enable_adapter_layers(self) -> None:
        self.base_model.enable_adapter_layers()
        self._prompt_disabled = False

    def disable_adapter_layers(self) -> None:
        self.base_model.disable_adapter_layers()
        self._prompt_disabled = True

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this block the model computes the base model's output (no virtual tokens, no head copies)."""
        layers = [layer for _, layer in adapter_layers(self)]
        before = [layer.disabled for layer in layers]
        prompt_before = self._prompt_disabled
        for layer in layers:
            layer.disabled = True
        self._prompt_disabled = True
        try:
            yield
        finally:
            for layer, was in zip(layers, before, strict=True):
                layer.disabled = was
            self._prompt_disabled = prompt_before

    # ---- merging --------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active (or named) adapters into the base weights; ``unmerge_adapter`` undoes it."""
        names = adapter_names or self._active
        refuse_merge(self.peft_config, names)
        self._check_mergeable(names, values=safe_merge)  # every layer before writing into any
        for _, layer in adapter_layers(self):
            layer.merge([n for n in names if n in layer.adapter_names()], safe_merge=safe_merge)

    def _check_mergeable(self, names: list[str], values: bool) -> None:
        """Raise before anything is merged: a layer that cannot take the update at all, or (``values``, i.e.
        safe_merge) one whose merged weight would hold NaN/Inf."""
        for path, layer in adapter_layers(self):
            check = getattr(layer, "check_mergeable", None)
            if check is not None and any(n in layer.adapter_names() for n in names):
                check()
            if not values:
                continue
            delta_weight = getattr(layer, "delta_weight", None)
            preview = getattr(layer, "merged_weight", None)  # a layer whose merge is not W + delta (DoRA) says so
            for name in names:
                if delta_weight is None or name not in layer.adapter_names() or name in layer.merged_adapters:
                    continue
                merged = preview(name) if preview is not None else layer.base_weight() + delta_weight(name).detach()
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
        refuse_merge(self.peft_config, names)
        self._check_mergeable(names, values=safe_merge)
        model = self.get_base_model()
        for path, layer in list(adapter_layers(model)):
            if not hasattr(layer, "original_module"):  # PEFT keeps the active adapter's modules_to_save copy
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

    def _active_prompt_module(self, adapter_names: list[str] | None) -> Any:
        """The active prompt-learning module, or None when the active adapter wraps layers or is disabled."""
        if self._prompt_disabled or not self._active or not self.peft_config[self._active[0]].is_prompt_learning:
            return None
        if adapter_names is not None:
            raise ValueError("adapter_names (one adapter per batch row) does not work with prompt-learning adapters: "
                             "the virtual tokens are the same for the whole batch.")
        return prompt_module(self, self._active[0])

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward; ``adapter_names`` gives one adapter per batch row ('__base__' for none).

        With a prompt-learning adapter active, the virtual tokens (or prefixes) go in front of the inputs
        (``prompt_learning_tasks.prompted_forward``); a positional first argument is ``input_ids``.
        """
        module = self._active_prompt_module(adapter_names)
        if module is not None:
            if args:
                kwargs = {"input_ids": args[0], **kwargs}
                args = args[1:]
            return prompted_forward(lambda **call: self.base_model(*args, **call), kwargs, module,
                                    self.active_peft_config, self.get_base_model())
        with self._mixed_batch(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's generate; with ``adapter_names`` each prompt row uses its own adapter.

        With a prompt-learning adapter active, every forward call generate makes sees the virtual tokens (with
        and without the KV cache, any padding, any number of beams); the output holds the input ids and the new
        tokens, not the virtual tokens (as in PEFT).
        """
        module = self._active_prompt_module(adapter_names)
        if module is not None:
            return prompted_generate(self.get_base_model(), args, kwargs, module, self.active_peft_config)
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
        """(trainable, all) parameter counts, as PEFT counts them.

        A bitsandbytes ``Params4bit`` packs two weights per byte, so it counts ``2 * bytes``; deltatune's own
        quantized layers hold their codes as buffers, and count the weights those codes stand for.
        """
        trainable = all_params = 0
        for param in self.parameters():
            if not is_bnb_quantized_param(param):  # counted with the quantized layers below
                all_params += param.numel()
            if param.requires_grad:
                trainable += peft_param_count(param)
        return trainable, all_params + quantized_param_count(self)

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
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = False,
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as a PEFT folder: "default" at the top, others in sub-folders by name.

        Args:
            save_embedding_layers: True also writes the full embedding matrices of targeted embedding
                layers; "auto" does as PEFT does (True when ``embed_tokens``/``lm_head`` are named in
                ``target_modules`` or the vocabulary differs from the base model's local config.json).
            path_initial_model_for_weight_conversion: the folder of this adapter saved right after
                initialisation; a PiSSA / OLoRA adapter is then written as a plain LoRA adapter of rank 2r for the
                original base weights (as PEFT). That folder is only read.
            state_dict: the full model state dict (as Trainer passes under FSDP/DeepSpeed); the adapter's
                values are taken from it instead of the live parameters.
        """
        if kwargs:
            raise TypeError(f"save_pretrained() got unexpected keyword arguments {sorted(kwargs)}.")
        if not safe_serialization:
            raise ValueError("safe_serialization=False (a pickled adapter_model.bin) is not supported: deltatune "
                             "writes safetensors only, which PEFT reads too.")
        initial = None
        if path_initial_model_for_weight_conversion is not None:
            initial = read_initial_adapter(path_initial_model_for_weight_conversion)
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory!r} is a file; save_pretrained needs a folder.")
        names = selected_adapters or list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"No adapter named {unknown}; this model has {sorted(self.peft_config)}.")
        if not is_main_process:
            return
        model = self.get_base_model()
        writes = []
        for name in names:  # every adapter checked before the first file is written
            config = self.peft_config[name]
            directory = adapter_directory(save_directory, name, DEFAULT_ADAPTER)
            extra: dict[str, Any] = {"inference_mode": True}
            if config.task_type is None:
                extra["auto_mapping"] = {"base_model_class": type(model).__name__,
                                         "parent_library": type(model).__module__}
            embeddings = resolve_save_embedding_layers(save_embedding_layers, config, model)
            tensors = adapter_tensors(self, config, name, save_embedding_layers=embeddings)
            if getattr(config, "enable_lora", None) is not None:  # sliced layers: written as the equal plain LoRA
                config = file_config(config, dict(adapter_layers(model)), name)
            if state_dict is not None:
                tensors = values_from_state_dict(self, tensors, state_dict)
            if initial is not None:
                if getattr(config, "peft_type", None) != "LORA":
                    raise ValueError(f"path_initial_model_for_weight_conversion converts PiSSA / OLoRA LoRA adapters "
                                     f"to plain LoRA; adapter {name!r} is {config.peft_type}.")
                config, tensors = convert_to_plain_lora(config, tensors, initial,
                                                        os.fspath(path_initial_model_for_weight_conversion))
            check_finite(tensors, f"adapter {name!r}")
            writes.append((directory, config, tensors, extra))
        for directory, config, tensors, extra in writes:
            write_adapter(directory, config, tensors, extra)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in folder ``model_id`` (frozen unless ``is_trainable``).

        Called on ``PeftModel`` itself, returns the class for the adapter's ``task_type``
        (``PeftModelForCausalLM``, ...) as PEFT does. Keyword arguments are PEFT's: ``subfolder`` and
        ``torch_device`` are honoured, Hub-only ones (``token``, ``cache_dir``, ...) have no effect on a
        local folder and say so; anything else is an error. The config and weights are read and checked
        before the model is touched; if the weights do not fit, the model is given back unchanged and the
        error names the key and both shapes. Any failure leaves ``model`` exactly as it was (values,
        requires_grad, modules). Tensors holding NaN/Inf load with a warning naming them; base weights the
        file replaces (biases, embeddings: the keys PEFT writes) load with a warning naming them.
        """
        check_adapter_name(adapter_name)
        adapter = read_adapter(model_id, config, is_trainable, ephemeral_gpu_offload=ephemeral_gpu_offload,
                               key_mapping=key_mapping, **kwargs)
        if cls is PeftModel:
            from .tasks import peft_model_class  # the subclasses are defined on top of this module

            cls = peft_model_class(adapter.config.task_type)
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        integrations.install()
        wrapper.base_model = AdaptedModel(model)
        wrapper.peft_config = {}
        wrapper._active = []
        wrapper._frozen_adapters = set()
        requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        try:
            wrapper._load_checked(adapter_name, adapter, autocast_adapter_dtype, freeze_base=True)
        except BaseException:
            for param in model.parameters():  # a failed load leaves the model as it was
                param.requires_grad_(requires_grad.get(id(param), param.requires_grad))
            raise
        wrapper._active = [adapter_name]
        wrapper._apply_activation()
        if not is_trainable:
            wrapper.eval()
        return wrapper

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Load the adapter saved in ``model_id`` as ``adapter_name`` (not activated).

        As in PEFT, an existing ``adapter_name`` gets the file's weights (this is how Trainer resumes and
        loads the best checkpoint); a new one is attached first. Not ``is_trainable``: the model is put in
        eval mode, as PEFT does. A failure leaves the model as it was; warnings as in ``from_pretrained``.
        """
        check_adapter_name(adapter_name)
        config = kwargs.pop("config", None)
        adapter = read_adapter(model_id, config, is_trainable, torch_device=torch_device,
                               ephemeral_gpu_offload=ephemeral_gpu_offload, key_mapping=key_mapping, **kwargs)
        if adapter_name in self.peft_config:
            self._warn_load_result(adapter.source, *load_adapter_tensors(
                self, self.peft_config[adapter_name], adapter_name, adapter.weights,
                skip_mismatched=adapter.ignore_mismatched_sizes, source=adapter.source))
        else:
            self._load_checked(adapter_name, adapter, autocast_adapter_dtype)
            self._apply_activation()
        if not is_trainable:
            self.eval()

    def _load_checked(self, adapter_name: str, adapter: Any, autocast_adapter_dtype: bool = True,
                      freeze_base: bool = False) -> None:
        """Attach the adapter, then fill it from the file; any failure takes the adapter off again.

        A prompt started from text (``prompt_tuning_init="TEXT"``) is attached with a random start: the file's prompt
        replaces it, and redoing the text init would read a tokenizer the config may only name (a Hub id).
        """
        text_init = getattr(adapter.config, "prompt_tuning_init", None) in ("TEXT", "SAMPLE_VOCAB")
        init = adapter.config.prompt_tuning_init if text_init else None
        try:
            if text_init:
                adapter.config.prompt_tuning_init = "RANDOM"
            self.add_adapter(adapter_name, adapter.config, autocast_adapter_dtype=autocast_adapter_dtype,
                             freeze_base=freeze_base)
        except ValueError as err:
            raise ValueError(f"{adapter.source}: {err}") from err
        finally:
            if text_init:
                adapter.config.prompt_tuning_init = init
        try:
            result = load_adapter_tensors(self, adapter.config, adapter_name, adapter.weights,
                                          skip_mismatched=adapter.ignore_mismatched_sizes, source=adapter.source)
            if adapter.device is not None:
                self._move_adapter(adapter_name, adapter.device)
        except BaseException:
            self._undo_add(adapter_name)
            raise
        self._warn_load_result(adapter.source, *result)

    def _move_adapter(self, adapter_name: str, device: torch.device) -> None:
        """Put one adapter's tensors on ``device`` (``torch_device=``), replacing the parameter objects so that a
        change of device type (e.g. to "meta") works too."""
        moving = {id(t) for t in self._adapter_parameters(adapter_name)}
        for module in self.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and id(param) in moving:
                    module._parameters[name] = nn.Parameter(param.detach().to(device),
                                                            requires_grad=param.requires_grad)

    @staticmethod
    def _warn_load_result(source: str, missing: list[str], unexpected: list[str]) -> None:
        if missing:
            warnings.warn(f"{source}: the file lacks these adapter tensors (left at their initial values): {missing}",
                          stacklevel=4)
        if unexpected:
            warnings.warn(f"{source}: ignoring tensors this model has no place for: {unexpected}", stacklevel=4)

    def _undo_add(self, adapter_name: str) -> None:
        self._remove_adapter_layers(adapter_name)
        self.peft_config.pop(adapter_name, None)
        self._active = [a for a in self._active if a != adapter_name]

