"""Prompt tuning: P trainable virtual-token embeddings prepended to the input embeddings.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", section 2: the embedded input
X_e (n x e) is extended to [P_e; X_e] ((p + n) x e) with a learned prompt P_e (p x e); the model is frozen and only
P_e trains. Section 2.1 (initialization): from the embeddings of real vocabulary tokens rather than at random;
PEFT's TEXT init takes the tokens of a text, cut or repeated to length P, and SAMPLE_VOCAB random vocabulary
tokens. Names, defaults and the saved tensor (``prompt_embeddings``, (P, token_dim)) are PEFT's.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..prompt_learning import PromptLearningConfig, virtual_token_embeddings
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
        tokenizer_name_or_path: a local tokenizer folder for "TEXT" (deltatune does not download from the Hub).
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


def _initial_prompt(config: PromptTuningConfig, embeddings: nn.Module) -> torch.Tensor | None:
    """The starting prompt for TEXT / SAMPLE_VOCAB (as PEFT computes it), None for RANDOM or when loading."""
    if config.inference_mode or config.prompt_tuning_init == "RANDOM":
        return None
    vocab = embeddings.weight.shape[0]
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, vocab, (config.num_virtual_tokens,))
    else:
        ids = torch.tensor(_text_token_ids(config, vocab), dtype=torch.long)
    with torch.no_grad():
        return embeddings(ids.to(embeddings.weight.device)).detach().to(torch.float32)


def _text_token_ids(config: PromptTuningConfig, vocab: int) -> list[int]:
    """The init text's token ids, cut or repeated to P (PEFT's rule).

    Raises:
        ValueError: the tokenizer folder is missing, the text has no tokens, or a token is outside the vocabulary.
    """
    path = config.tokenizer_name_or_path
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer_name_or_path={path!r} is not a local folder; deltatune reads the tokenizer for "
                         "prompt_tuning_init='TEXT' from a local folder (no Hub download). Save the tokenizer there "
                         "first (tokenizer.save_pretrained(folder)).")
    from transformers import AutoTokenizer

    options = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **options)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    text = config.prompt_tuning_init_text
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={text!r} tokenizes to no tokens with the tokenizer in {path!r}; "
                         "give a text with at least one token, or use prompt_tuning_init='RANDOM'.")
    outside = sorted({i for i in ids if not 0 <= i < vocab})
    if outside:
        raise ValueError(f"prompt_tuning_init_text={text!r} gives token ids {outside} outside the model's vocabulary "
                         f"of {vocab}: the tokenizer in {path!r} does not belong to this model.")
    total = config.num_virtual_tokens
    return (ids * math.ceil(total / len(ids)))[:total]


def attach(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> PromptEmbedding:
    """Check the model, fill in its dimensions and build the prompt; ``model`` itself is not changed.

    Raises:
        ValueError: a task type the model lacks, too many virtual tokens, a bad init text or tokenizer.
    """
    embeddings = virtual_token_embeddings(model, config)
    width = embeddings.weight.shape[1]
    module = PromptEmbedding(config.num_virtual_tokens, width)  # N(0, 1) drawn first, as in PEFT (same RNG order)
    init = _initial_prompt(config, embeddings)
    if init is not None:
        module.embedding.weight = nn.Parameter(init)
    return module.to(embeddings.weight.device)


CLI = MethodCli(name="prompt", lr=3e-2, options=(
    CliOption("num-virtual-tokens", "num_virtual_tokens", "int", 20, "virtual tokens prepended to the input"),
    CliOption("prompt-init", "prompt_tuning_init", "text", None, "how the virtual tokens start",
              choices=("RANDOM", "SAMPLE_VOCAB")),
))
