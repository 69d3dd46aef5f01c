"""P-tuning: virtual tokens produced by a small prompt encoder, prepended to the input embeddings.

Liu et al. 2021, "GPT Understands, Too", section 3.2 (optimization): optimising the prompt embeddings h_i directly
works badly (they are discrete-ish and their elements should depend on each other), so they are produced by a
prompt encoder, h_i = MLP([LSTM(h_{0:i}); LSTM(h_{i:m})]) - a bidirectional LSTM followed by a ReLU MLP. PEFT's
``encoder_reparameterization_type`` chooses that (LSTM) or a plain 3-layer MLP (its default). Only the output is
needed at inference, so the saved tensor is the encoder's output, ``prompt_embeddings`` (P, token_dim), and a loaded
adapter holds just that. Names and defaults are PEFT's ``PromptEncoderConfig`` / ``PromptEncoder``.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import is_real_number
from ..prompt_learning import PromptLearningConfig, virtual_token_embeddings
from .options import CliOption, MethodCli


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The prompt encoder: a 3-layer ReLU MLP, or the paper's bidirectional LSTM + 2-layer MLP."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning settings; field names and defaults are HF PEFT's ``PromptEncoderConfig``.

    Attributes:
        encoder_reparameterization_type: "MLP" (Linear-ReLU-Linear-ReLU-Linear) or "LSTM".
        encoder_hidden_size: the encoder's hidden width; None takes token_dim.
        encoder_num_layers: LSTM layers (the MLP always has 3 layers; another value is warned about, as in PEFT).
        encoder_dropout: dropout between LSTM layers.
    """

    encoder_reparameterization_type: str = PromptEncoderReparameterizationType.MLP.value
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.peft_type = "P_TUNING"
        if isinstance(self.encoder_reparameterization_type, PromptEncoderReparameterizationType):
            self.encoder_reparameterization_type = self.encoder_reparameterization_type.value
        super().__post_init__()  # runs validate()

    def validate(self) -> None:
        """Raises ValueError naming a field whose value is of the wrong type or out of range."""
        super().validate()
        kind = self.encoder_reparameterization_type
        if kind not in PromptEncoderReparameterizationType.__members__:
            raise ValueError(f"encoder_reparameterization_type={kind!r} must be 'MLP' or 'LSTM'.")
        hidden = self.encoder_hidden_size
        if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0):
            raise ValueError(f"encoder_hidden_size={hidden!r} must be a positive int, or None for token_dim.")
        layers = self.encoder_num_layers
        if not isinstance(layers, int) or isinstance(layers, bool) or layers <= 0:
            raise ValueError(f"encoder_num_layers={layers!r} must be a positive int.")
        dropout = self.encoder_dropout
        if not is_real_number(dropout) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"encoder_dropout={dropout!r} must be a number in [0, 1).")


class PromptEncoder(nn.Module):
    """The prompt encoder (PEFT's ``PromptEncoder``): ``embedding`` (T, token_dim) fed through ``mlp_head``
    (and ``lstm_head`` first, for LSTM). Built with ``inference_mode`` it holds only ``embedding``, the saved output.
    T = P * num_transformer_submodules: an encoder-decoder adapter has 2P rows, as in PEFT (the LSTM runs over all
    of them; the first P outputs are the virtual tokens).
    """

    kind: ClassVar[str] = "embeddings"

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.total_virtual_tokens = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
        self.encoder_type = config.encoder_reparameterization_type
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(self.total_virtual_tokens, dim)
        self.reparameterized = not config.inference_mode
        if not self.reparameterized:
            return
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn(f"encoder_num_layers={config.encoder_num_layers} is ignored for the MLP encoder: it "
                              "always has 3 layers (as in PEFT).", stacklevel=3)
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if not self.reparameterized:
            return embeds
        if self.encoder_type == "LSTM":
            embeds = self.lstm_head(embeds)[0]  # (B, P, 2 * hidden): both directions
        return self.mlp_head(embeds)

    def prompt(self) -> torch.Tensor:
        """The virtual tokens (T, token_dim): the encoder's output, or the saved output once folded."""
        if not self.reparameterized:
            return self.embedding.weight
        return self.forward(torch.arange(self.total_virtual_tokens, device=self.embedding.weight.device)[None])[0]

    @torch.no_grad()
    def load_prompt_embeddings(self, value: torch.Tensor) -> None:
        """Hold ``value`` as the plain prompt; the encoder network is dropped (its inputs cannot be recovered from
        its output), so training goes on from the prompt itself."""
        if self.reparameterized:
            warnings.warn("Loading saved prompt_embeddings into a P-tuning encoder: the encoder network is dropped "
                          "and the prompt itself is kept (and trains, if trainable).", stacklevel=4)
            for name in ("lstm_head", "mlp_head"):
                if hasattr(self, name):
                    delattr(self, name)
            self.reparameterized = False
        self.embedding.weight.copy_(value.to(self.embedding.weight))


def attach(model: nn.Module, config: PromptEncoderConfig, adapter_name: str) -> PromptEncoder:
    """Check the model, fill in its dimensions and build the encoder; ``model`` itself is not changed.

    Raises:
        ValueError: a task type the model lacks, too many virtual tokens, a token_dim that is not the model's.
    """
    embeddings = virtual_token_embeddings(model, config)
    return PromptEncoder(config).to(embeddings.weight.device)


CLI = MethodCli(name="ptuning", lr=1e-2, options=(
    CliOption("num-virtual-tokens", "num_virtual_tokens", "int", 20, "virtual tokens prepended to the input"),
    CliOption("encoder-type", "encoder_reparameterization_type", "text", None, "the prompt encoder",
              choices=("MLP", "LSTM")),
    CliOption("encoder-hidden-size", "encoder_hidden_size", "int", None, "width of the prompt encoder"),
))
