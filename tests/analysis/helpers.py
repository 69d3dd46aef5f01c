"""Adapters for the analysis tests: tiny Llama LoRA adapters (perturbed, as if trained) and one-layer models."""

from __future__ import annotations

import torch
from torch import nn

import deltatune
from tests.conftest import make_model, perturb


class OneLayer(nn.Module):
    """A single Linear(d_in, d_out) named ``proj``: room for a d ~ 256 chance-level check."""

    def __init__(self, d_in: int = 256, d_out: int = 256) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def llama_adapter(seed: int = 3, **lora) -> deltatune.PeftModel:
    """A tiny Llama with a LoRA adapter (q_proj, v_proj, r=4 unless given) whose A and B are random."""
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora}
    model = deltatune.get_peft_model(make_model("llama"), deltatune.LoraConfig(**settings))
    perturb(model, seed=seed)
    return model


def one_layer_adapter(seed: int, r: int = 8, d_in: int = 256, d_out: int = 256) -> deltatune.PeftModel:
    """LoRA on ``proj`` with A and B independent standard Gaussians drawn from ``seed``."""
    torch.manual_seed(0)
    model = deltatune.get_peft_model(OneLayer(d_in, d_out), deltatune.LoraConfig(r=r, target_modules=["proj"]))
    perturb(model, seed=seed)
    return model


def saved(model: deltatune.PeftModel, folder) -> str:
    model.save_pretrained(str(folder))
    return str(folder)
