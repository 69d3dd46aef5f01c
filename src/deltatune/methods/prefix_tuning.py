"""Prefix tuning: trainable key/value prefixes for every layer, passed to the model as its KV cache.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", section 4.2: the activations at P
prefix positions, h_i = P_theta[i, :] for every layer, are free parameters the real tokens attend to, while the
language model stays frozen. Section 4.3 (parametrization): optimising P_theta directly is unstable, so
P_theta[i, :] = MLP_theta(P'_theta[i, :]) with a smaller P'_theta; "once training is complete, these
reparametrization parameters can be dropped, and only the prefix P_theta needs to be saved". PEFT's
``prefix_projection=True`` is that MLP (Linear-Tanh-Linear); the saved tensor is always the plain prefix,
``prompt_embeddings`` (P, num_layers * 2 * token_dim). Names and defaults are PEFT's ``PrefixTuningConfig`` /
``PrefixEncoder``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..prompt_learning import PromptLearningConfig, cache_argument, check_model, fill_model_dims, word_embeddings
from .options import CliOption, MethodCli


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning settings; field names and defaults are HF PEFT's ``PrefixTuningConfig``.

    Attributes:
        init_weights: None (random N(0, 1) prefixes) or "zero" (zero prefixes, or a zero last projection layer).
        encoder_hidden_size: the projection MLP's hidden width; None takes token_dim.
        prefix_projection: train the prefixes through the reparameterization MLP (section 4.3).
    """

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        self.peft_type = "PREFIX_TUNING"
        super().__post_init__()  # runs validate()

    def validate(self) -> None:
        """Raises ValueError naming a field whose value is of the wrong type or out of range."""
        super().validate()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights={self.init_weights!r} must be None (random) or 'zero'.")
        hidden = self.encoder_hidden_size
        if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0):
            raise ValueError(f"encoder_hidden_size={hidden!r} must be a positive int, or None for token_dim.")
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection={self.prefix_projection!r} must be True or False.")


class PrefixEncoder(nn.Module):
    """The prefixes (PEFT's ``PrefixEncoder``): ``embedding`` (P, L*2*token_dim), or with the projection
    ``embedding`` (P, token_dim) fed through ``transform``. Built with ``inference_mode`` it holds the plain prefix.
    """

    kind: ClassVar[str] = "prefix"

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        dim, flat = config.token_dim, config.num_layers * 2 * config.token_dim
        self.reparameterized = config.prefix_projection and not config.inference_mode
        if self.reparameterized:
            self.embedding = nn.Embedding(config.num_virtual_tokens, dim)
            self.transform = nn.Sequential(nn.Linear(dim, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, flat))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, flat)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        tokens = self.embedding(prefix)
        return self.transform(tokens) if self.reparameterized else tokens

    def prompt(self) -> torch.Tensor:
        """The flat prefixes (P, num_layers * 2 * token_dim)."""
        if not self.reparameterized:
            return self.embedding.weight
        return self.forward(torch.arange(self.num_virtual_tokens, device=self.embedding.weight.device))

    @torch.no_grad()
    def load_prompt_embeddings(self, value: torch.Tensor) -> None:
        """Hold ``value`` as the plain prefix; the projection MLP is dropped (section 4.3)."""
        if self.reparameterized:
            warnings.warn("Loading saved prompt_embeddings into a prefix encoder with prefix_projection: the "
                          "projection is dropped and the prefix itself is kept (and trains, if trainable).",
                          stacklevel=4)
            device = self.embedding.weight.device
            self.embedding = nn.Embedding(*value.shape, device=device)
            del self.transform
            self.reparameterized = False
        self.embedding.weight.copy_(value.to(self.embedding.weight))


def attach(model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> PrefixEncoder:
    """Check the model, fill in its dimensions and build the prefixes; ``model`` itself is not changed.

    Raises:
        ValueError: a task type the model lacks, too many virtual tokens, a model without a KV cache, gradient
            checkpointing switched on (PEFT refuses it too: the cache does not survive recomputation), or
            dimensions that do not split into heads.
    """
    config.validate()
    check_model(model, config)
    name = type(model).__name__
    if cache_argument(model) is None:
        raise ValueError(f"{name}.forward takes no KV cache ('cache' or 'past_key_values'), which prefix tuning "
                         "passes the prefixes in.")
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError(f"PREFIX_TUNING does not work with gradient checkpointing, which {name} has switched on "
                         "(gradient_checkpointing_disable() first).")
    fill_model_dims(model, config, kv_heads=True)
    if config.token_dim % config.num_attention_heads:
        raise ValueError(f"token_dim={config.token_dim} does not split into num_attention_heads="
                         f"{config.num_attention_heads} heads.")
    return PrefixEncoder(config).to(word_embeddings(model).weight.device)


CLI = MethodCli(name="prefix", lr=1e-2, options=(
    CliOption("num-virtual-tokens", "num_virtual_tokens", "int", 20, "key/value prefix length per layer"),
    CliOption("prefix-projection", "prefix_projection", "bool", None, "train the prefixes through an MLP"),
    CliOption("encoder-hidden-size", "encoder_hidden_size", "int", None, "width of the projection MLP"),
))
