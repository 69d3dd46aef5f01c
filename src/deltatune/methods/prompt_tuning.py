"""Prompt tuning: P trainable virtual-token embeddings prepended to the input embeddings.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", section 2: the embedded input
X_e (n x e) is extended to [P_e; X_e] ((p + n) x e) with a learned prompt P_e (p x e); the model is frozen and only
P_e trains. Section 2.1 (initialization): from the embeddings of real vocabulary tokens rather than at random;
PEFT's TEXT init takes the tokens of a text, cut or repeated to length P, and SAMPLE_VOCAB random vocabulary
tokens. Names, defaults and the saved tensor (``prompt_embeddings``, (P, token_dim)) are PEFT's. PEFT reads the TEXT
tokenizer from ``tokenizer_name_or_path``; :func:`init_prompt_from_text` takes a tokenizer object instead (a model
read from a GGUF file has no tokenizer folder).
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..prompt_learning import PromptLearningConfig, virtual_token_embeddings, word_embeddings
from .options import CliOption, MethodCli


class PromptTuningInit(str, enum.Enum):
    """How the prompt starts (PEFT's enum): from a text's tokens, from random vocabulary tokens, or N(0, 1)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning settings; field names and defaults are HF PEFT's ``PromptTuningConfig``.

    Attributes:
        prompt_tuning_init: "RANDOM" (N(0, 1), as nn.Embedding), "TEXT" (the word embeddings of
            ``prompt_tuning_init_text``'s tokens, repeated to length) or "SAMPLE_VOCAB" (random vocabulary tokens).
        prompt_tuning_init_text: the text for "TEXT", e.g. "Classify the sentiment:".
        tokenizer_name_or_path: a local tokenizer folder for "TEXT" (deltatune does not download from the Hub);
            with a tokenizer object, use ``init_prompt_from_text`` on the adapted model, which records the name here.
        tokenizer_kwargs: extra keyword arguments for ``AutoTokenizer.from_pretrained`` ("TEXT" only).
    """

    prompt_tuning_init: str = PromptTuningInit.RANDOM.value
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.peft_type = "PROMPT_TUNING"
        if isinstance(self.prompt_tuning_init, PromptTuningInit):
            self.prompt_tuning_init = self.prompt_tuning_init.value
        if isinstance(self.tokenizer_name_or_path, os.PathLike):
            self.tokenizer_name_or_path = os.fspath(self.tokenizer_name_or_path)
        super().__post_init__()  # runs validate()

    def validate(self) -> None:
        """PEFT's rules: TEXT needs a tokenizer and a text; tokenizer_kwargs only with TEXT.

        Raises:
            ValueError: naming the field and the value.
        """
        super().validate()
        init = self.prompt_tuning_init
        if init not in PromptTuningInit.__members__:
            raise ValueError(f"prompt_tuning_init={init!r} must be one of {sorted(PromptTuningInit.__members__)}.")
        for name in ("prompt_tuning_init_text", "tokenizer_name_or_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}={value!r} must be a string or None.")
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise ValueError(f"prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local tokenizer folder), got "
                             f"{self.tokenizer_name_or_path!r}.")
        if init == "TEXT" and self.prompt_tuning_init_text is None:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text whose tokens start "
                             "the prompt.")
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            raise ValueError(f"tokenizer_kwargs={self.tokenizer_kwargs!r} must be a dict or None.")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ValueError("tokenizer_kwargs are only used with prompt_tuning_init='TEXT'.")


class PromptEmbedding(nn.Module):
    """The prompt P_e as an embedding table of P rows (PEFT's ``PromptEmbedding``: ``embedding.weight``).

    Args:
        num_virtual_tokens: P.
        token_dim: the model's embedding width.
    """

    kind: ClassVar[str] = "embeddings"
    reparameterized = False

    def __init__(self, num_virtual_tokens: int, token_dim: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)  # N(0, 1), PEFT's RANDOM init

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)

    def prompt(self) -> torch.Tensor:
        """P_e, (P, token_dim): the parameter itself."""
        return self.embedding.weight

    @torch.no_grad()
    def load_prompt_embeddings(self, value: torch.Tensor) -> None:
        self.embedding.weight.copy_(value.to(self.embedding.weight))


def total_virtual_tokens(config: PromptTuningConfig) -> int:
    """Rows of the prompt table: P, or 2P for an encoder-decoder model (PEFT's ``num_transformer_submodules=2``,
    kept so PEFT's files fit; the encoder uses the first P)."""
    return config.num_virtual_tokens * (config.num_transformer_submodules or 1)


def _initial_prompt(config: PromptTuningConfig, embeddings: nn.Module) -> torch.Tensor | None:
    """The starting prompt for TEXT / SAMPLE_VOCAB (as PEFT computes it), None for RANDOM or when loading."""
    if config.inference_mode or config.prompt_tuning_init == "RANDOM":
        return None
    vocab = embeddings.weight.shape[0]
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, vocab, (total_virtual_tokens(config),))
    else:
        ids = torch.tensor(_text_token_ids(config, vocab), dtype=torch.long)
    return _embedding_rows(embeddings, ids)


def _embedding_rows(embeddings: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The word embeddings of ``ids``, (P, token_dim), as a float32 copy (PEFT's prompt dtype)."""
    with torch.no_grad():
        return embeddings(ids.to(embeddings.weight.device)).detach().to(torch.float32)


def _text_token_ids(config: PromptTuningConfig, vocab: int) -> list[int]:
    """The init text's token ids with the tokenizer in ``tokenizer_name_or_path``, cut or repeated to P.

    Raises:
        ValueError: the tokenizer folder is missing, the text has no tokens, or a token is outside the vocabulary.
    """
    path = config.tokenizer_name_or_path
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer_name_or_path={path!r} is not a local folder; deltatune reads the tokenizer for "
                         "prompt_tuning_init='TEXT' from a local folder (no Hub download). Save the tokenizer there "
                         "first (tokenizer.save_pretrained(folder)), or start the prompt from a tokenizer object "
                         "with init_prompt_from_text().")
    from transformers import AutoTokenizer

    options = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **options)
    return text_token_ids(config.prompt_tuning_init_text, tokenizer, total_virtual_tokens(config), vocab,
                          tokenizer_source=f"the tokenizer in {path!r}")


def text_token_ids(text: str, tokenizer: Any, num_virtual_tokens: int, vocab_size: int | None = None,
                   tokenizer_source: str = "the model's tokenizer") -> list[int]:
    """The token ids a TEXT prompt starts from: ``tokenizer(text)["input_ids"]`` (special tokens included, as PEFT
    calls it) repeated and cut to exactly P = ``num_virtual_tokens`` ids (PEFT's rule; Lester et al. 2021, 2.1).

    Cheap: a run calls it to refuse a bad text before the model is loaded.

    Args:
        text: the init text, e.g. "Classify the sentiment:".
        tokenizer: the base model's tokenizer, any callable that returns ``{"input_ids": [...]}``.
        num_virtual_tokens: P.
        vocab_size: the model's vocabulary size; ids outside it are refused. None: not checked.
        tokenizer_source: how error messages name the tokenizer.

    Returns:
        P token ids.

    Raises:
        ValueError: ``text`` is not a string, has no tokens, or gives ids outside the vocabulary (the message
            names the text).
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt_tuning_init_text={text!r} must be a string, the text whose tokens start the prompt.")
    ids = [int(i) for i in tokenizer(text)["input_ids"]]
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={text!r} tokenizes to no tokens with {tokenizer_source}; give a "
                         "text with at least one token (or start the prompt another way: RANDOM or SAMPLE_VOCAB).")
    outside = sorted({i for i in ids if vocab_size is not None and not 0 <= i < vocab_size})
    if outside:
        raise ValueError(f"prompt_tuning_init_text={text!r} gives token ids {outside} outside the model's vocabulary "
                         f"of {vocab_size}: {tokenizer_source} does not belong to this model.")
    return (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]


def init_prompt_from_text(model: nn.Module, text: str, tokenizer: Any, adapter_name: str | None = None,
                          tokenizer_name_or_path: str | None = None,
                          tokenizer_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """Start a prompt-tuning adapter from the token embeddings of ``text``, tokenized by a tokenizer object.

    PEFT's TEXT init (Lester et al. 2021, section 2.1) for a model whose tokenizer has no folder to name in
    ``tokenizer_name_or_path`` (one read from a GGUF file, or built in memory): row i of the prompt becomes
    the word-embedding row of the i-th id of :func:`text_token_ids` (the text's ids repeated and cut to P).
    The prompt parameter keeps its identity (an optimizer holding it sees the new values). The adapter's config
    then records what PEFT's own TEXT init records: ``prompt_tuning_init="TEXT"``, the text, and the tokenizer's
    name, so adapter_config.json loads in PEFT (which refuses TEXT without a tokenizer name, and reads the tokenizer
    only to start a new adapter from the config: it loads prompt adapters frozen). Loading in deltatune reads no
    tokenizer either, also with ``is_trainable=True`` (the file's prompt is the start).

    Args:
        model: a ``PeftModel`` with a prompt-tuning adapter (``get_peft_model(base, PromptTuningConfig(...))``).
        text: the init text.
        tokenizer: the base model's tokenizer.
        adapter_name: the adapter to start; None = the active one.
        tokenizer_name_or_path: what the config records as the tokenizer; None = ``tokenizer.name_or_path``,
            else the config's ``base_model_name_or_path``.
        tokenizer_kwargs: recorded with it (e.g. ``{"gguf_file": "model.gguf"}`` for a tokenizer read from a GGUF
            file in that folder).

    Returns:
        The new prompt, (P, token_dim).

    Raises:
        ValueError: not a prompt-tuning adapter, a text without tokens or with ids outside the model's
            vocabulary, or no tokenizer name to record; nothing has been changed.
    """
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise ValueError(f"init_prompt_from_text needs a deltatune PeftModel with a prompt-tuning adapter "
                         f"(get_peft_model(base, PromptTuningConfig(...))), got {type(model).__name__}.")
    name = adapter_name if adapter_name is not None else model.active_adapter
    config = configs.get(name)
    if not isinstance(config, PromptTuningConfig):
        kind = f"a {config.peft_type} adapter" if config is not None else "not an adapter of this model"
        raise ValueError(f"init_prompt_from_text needs a deltatune PROMPT_TUNING adapter; {name!r} is {kind} "
                         f"(adapters: {sorted(configs)}).")
    embeddings = word_embeddings(model.get_base_model())
    ids = text_token_ids(text, tokenizer, total_virtual_tokens(config), embeddings.weight.shape[0])
    recorded = tokenizer_name_or_path or getattr(tokenizer, "name_or_path", None) or config.base_model_name_or_path
    if not recorded or not isinstance(recorded, str):
        raise ValueError("init_prompt_from_text: give tokenizer_name_or_path, the tokenizer's folder or hub id for "
                         "adapter_config.json (PEFT refuses prompt_tuning_init='TEXT' without one); this tokenizer "
                         "has no name_or_path and the config no base_model_name_or_path.")
    prompt = _embedding_rows(embeddings, torch.tensor(ids, dtype=torch.long))
    model.prompt_encoder[name].load_prompt_embeddings(prompt)
    config.prompt_tuning_init = PromptTuningInit.TEXT.value
    config.prompt_tuning_init_text = text
    config.tokenizer_name_or_path = recorded
    config.tokenizer_kwargs = dict(tokenizer_kwargs) if tokenizer_kwargs else None
    return model.prompt_encoder[name].prompt()


def attach(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> PromptEmbedding:
    """Check the model, fill in its dimensions and build the prompt; ``model`` itself is not changed.

    Raises:
        ValueError: a task type the model lacks, too many virtual tokens, a bad init text or tokenizer.
    """
    embeddings = virtual_token_embeddings(model, config)
    width = embeddings.weight.shape[1]
    module = PromptEmbedding(total_virtual_tokens(config), width)  # N(0, 1) drawn first, as in PEFT (same RNG order)
    init = _initial_prompt(config, embeddings)
    if init is not None:
        module.embedding.weight = nn.Parameter(init)
    return module.to(embeddings.weight.device)


CLI = MethodCli(name="prompt", lr=3e-2, options=(
    CliOption("num-virtual-tokens", "num_virtual_tokens", "int", 20, "virtual tokens prepended to the input"),
    CliOption("prompt-init", "prompt_tuning_init", "text", None, "how the virtual tokens start",
              choices=("RANDOM", "SAMPLE_VOCAB")),
    CliOption("prompt-init-text", "prompt_tuning_init_text", "text", None,
              "start the virtual tokens from this text's token embeddings (the model's own tokenizer)"),
))
