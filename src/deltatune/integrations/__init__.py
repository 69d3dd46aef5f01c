"""What ``transformers.Trainer``, accelerate and TRL need to treat deltatune's objects as PEFT's.

They recognise a PEFT model with ``isinstance(model, peft.PeftModel)`` in a few named functions
(``transformers.trainer_utils._is_peft_model``, ``accelerate.utils.is_peft_model``), save a model
that is not a ``PreTrainedModel``/``peft.PeftModel`` as one big state dict (``Trainer._save``), and
accept only ``peft.PeftConfig`` as ``peft_config`` (TRL's trainers). None offers an extension point
for this, so this module patches exactly those places, and each patch changes behaviour only for
deltatune's objects: for anything else it calls the original. A model wrapped by HF PEFT in the same
process behaves as before.

The patches are applied by :func:`install`, which deltatune calls whenever a config or model of its
own is made; it patches the modules that are imported at that moment (and since the two predicates
are replaced where they are defined, modules imported later pick up the patched ones). Call it
yourself after importing TRL if you made your deltatune objects before. Each library's major version
is checked: on an untested one nothing is patched, and a warning says so.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import sys
import warnings
from typing import Any

# Major versions these patches were written and tested against (transformers 5.x, accelerate 1.x, TRL 1.x).
TESTED_MAJOR = {"transformers": "5", "accelerate": "1", "trl": "1"}
# Functions that answer "is this a PEFT model?", by module that defines them.
PREDICATES = {"transformers.trainer_utils": "_is_peft_model", "accelerate.utils.modeling": "is_peft_model"}
# TRL trainers that take a ``peft_config``.
TRL_TRAINERS = ("sft_trainer", "dpo_trainer", "kto_trainer", "reward_trainer", "grpo_trainer", "rloo_trainer")
_PATCHED = "_deltatune_original"  # attribute a patched function keeps its original under
_modules_seen = 0
_warned: set[str] = set()


def install() -> None:
    """Patch whatever of transformers, accelerate and TRL is imported now (cheap when nothing new was imported)."""
    global _modules_seen
    if len(sys.modules) == _modules_seen:
        return
    _modules_seen = len(sys.modules)
    for module_name, function_name in PREDICATES.items():
        if _tested(module_name):
            _patch_predicate(module_name, function_name)
    if _tested("transformers.trainer"):
        _patch_trainer_save(sys.modules["transformers.trainer"])
    if _tested("trl"):
        _import_trl_trainers()
    for name in [n for n in sys.modules if n.startswith("trl.trainer.") and n.endswith("_trainer")]:
        if _tested(name):
            _patch_trl_trainers(sys.modules[name])


def _import_trl_trainers() -> None:
    """TRL loads its trainers lazily (``trl.SFTTrainer`` imports on first use): once TRL itself is imported,
    import the trainers that take ``peft_config``, so they are patched before a deltatune config reaches one."""
    for name in TRL_TRAINERS:
        if f"trl.trainer.{name}" not in sys.modules:
            with contextlib.suppress(ImportError):
                importlib.import_module(f"trl.trainer.{name}")


def _tested(module_name: str) -> bool:
    """The module is imported and its library's major version is one the patches were tested with."""
    if sys.modules.get(module_name) is None:
        return False
    library = module_name.split(".")[0]
    version = getattr(sys.modules.get(library), "__version__", "")
    if version.split(".")[0] == TESTED_MAJOR[library]:
        return True
    if library not in _warned:
        _warned.add(library)
        warnings.warn(f"deltatune's integration with {library} was tested on {library} {TESTED_MAJOR[library]}.x, "
                      f"found {version}: not enabled. Trainers there will not recognise deltatune models.",
                      stacklevel=3)
    return False


def is_deltatune_model(model: Any) -> bool:
    """A deltatune PeftModel, also inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``)."""
    return _deltatune_model(model) is not None


def _deltatune_model(model: Any) -> Any:
    """The deltatune PeftModel ``model`` is or wraps (DDP, ``torch.compile``), or None."""
    from ..model import PeftModel

    for _ in range(3):
        if isinstance(model, PeftModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            return None
    return None


def _patch_predicate(module_name: str, function_name: str) -> None:
    """Replace the predicate where it is defined and wherever it was already imported by name."""
    original = sys.modules[module_name].__dict__.get(function_name)
    if original is None or hasattr(original, _PATCHED):
        return

    @functools.wraps(original)
    def recognising(model: Any, *args: Any, **kwargs: Any) -> bool:
        return is_deltatune_model(model) or original(model, *args, **kwargs)

    setattr(recognising, _PATCHED, original)
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in TESTED_MAJOR and module is not None \
                and getattr(module, "__dict__", {}).get(function_name) is original:
            setattr(module, function_name, recognising)


def _patch_trainer_save(trainer_module: Any) -> None:
    """``Trainer._save`` writes a deltatune model as a PEFT adapter folder, not as the whole model's weights."""
    trainer_class = trainer_module.Trainer
    original = trainer_class.__dict__["_save"]
    if hasattr(original, _PATCHED):
        return

    @functools.wraps(original)
    def _save(self: Any, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not is_deltatune_model(model):
            return original(self, output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict)
        # what Trainer._save does after the weights, unchanged
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        import torch

        torch.save(self.args, os.path.join(output_dir, trainer_module.TRAINING_ARGS_NAME))
        return None

    setattr(_save, _PATCHED, original)
    trainer_class._save = _save


def _patch_trl_trainers(module: Any) -> None:
    """TRL trainers (``SFTTrainer``, ``DPOTrainer``, ...) take a deltatune config as ``peft_config``.

    The model is wrapped by deltatune's ``get_peft_model`` before TRL sees it, so TRL goes on as it does
    for a model the user wrapped (``model=peft_model``), which it supports fully.
    """
    for obj in list(vars(module).values()):
        if not (isinstance(obj, type) and obj.__module__ == module.__name__):
            continue
        original = obj.__dict__.get("__init__")
        if original is None or hasattr(original, _PATCHED) or \
                "peft_config" not in inspect.signature(original).parameters:
            continue
        obj.__init__ = _accepting_deltatune_config(original)


def _accepting_deltatune_config(original: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def init_taking_deltatune_config(self: Any, *args: Any, **kwargs: Any) -> None:
        from ..config import PeftConfig
        from ..tasks import get_peft_model

        bound = signature.bind(self, *args, **kwargs)
        config = bound.arguments.get("peft_config")
        train_args = bound.arguments.get("args")
        model = bound.arguments.get("model")
        refuse_prefix_under_checkpointing(config if isinstance(config, PeftConfig) else model, train_args)
        if isinstance(config, PeftConfig):
            if is_deltatune_model(model):
                raise ValueError("You passed a deltatune PeftModel together with a peft_config; pass one or the "
                                 "other (merge_and_unload() first to train a new adapter on the merged model).")
            if isinstance(model, str):
                model = _load_as_trl_would(model, train_args, bound.arguments.get("quantization_config"))
            if getattr(train_args, "seed", None) is not None:  # TRL seeds before PEFT draws the adapter's init
                from transformers import set_seed

                set_seed(train_args.seed)
            bound.arguments["model"] = get_peft_model(model, config)
            bound.arguments["peft_config"] = None
        original(*bound.args, **bound.kwargs)
        # again with the arguments the trainer ended up with (TRL's defaults when args was None)
        refuse_prefix_under_checkpointing(getattr(self, "model", None), getattr(self, "args", None))

    setattr(init_taking_deltatune_config, _PATCHED, original)
    return init_taking_deltatune_config


def refuse_prefix_under_checkpointing(model_or_config: Any, train_args: Any) -> None:
    """Refuse to train a deltatune prefix-tuning adapter with gradient checkpointing on (TRL's default).

    ``activation_checkpointing`` is transformers 5's name for it (``gradient_checkpointing`` mirrors it).

    Prefix tuning hands its key/value prefixes to the model as a pre-filled KV cache, and transformers drops the
    cache from every decoder layer that runs under gradient checkpointing, so training would fail with a shape
    mismatch deep in attention (HF PEFT's prefix tuning fails the same way). Prompt tuning and P-tuning change
    the input embeddings and train under gradient checkpointing.

    Args:
        model_or_config: a deltatune config, or a model (a deltatune PeftModel, possibly wrapped); anything else
            passes.
        train_args: the trainer's arguments (``SFTConfig``, ``TrainingArguments``); None passes.

    Raises:
        ValueError: a prefix-tuning adapter with checkpointing on; says how to go on.
    """
    on = getattr(train_args, "activation_checkpointing", None) or getattr(train_args, "gradient_checkpointing", None)
    if not on:
        return
    from ..config import PeftConfig

    model = _deltatune_model(model_or_config)
    config = model.active_peft_config if model is not None else model_or_config
    if isinstance(config, PeftConfig) and config.peft_type == "PREFIX_TUNING":
        raise ValueError("Prefix tuning cannot train with gradient (activation) checkpointing, which TRL turns on by "
                         "default: its key/value prefixes reach the model as a KV cache, which transformers drops from "
                         "layers run under checkpointing. Pass activation_checkpointing=False (gradient_checkpointing="
                         "False) in the trainer's arguments, e.g. SFTConfig(..., activation_checkpointing=False), or "
                         "use prompt tuning or P-tuning, which train under it.")


def _load_as_trl_would(model_id: str, train_args: Any, quantization_config: Any) -> Any:
    """A model named by a string, loaded with TRL's own helper and ``args.model_init_kwargs``."""
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(getattr(train_args, "model_init_kwargs", None) or {})
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    kwargs.setdefault("trust_remote_code", getattr(train_args, "trust_remote_code", False))
    return create_model_from_path(model_id, **kwargs)
