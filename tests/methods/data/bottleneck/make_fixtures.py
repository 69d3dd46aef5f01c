"""Make the AdapterHub reference data that tests/methods/test_bottleneck.py checks deltatune against.

Run it in a SEPARATE virtual environment, never in deltatune's (AdapterHub pins an older transformers):

    python3 -m venv /tmp/ah-venv
    /tmp/ah-venv/bin/pip install torch==2.13.0               # the CPU build
    /tmp/ah-venv/bin/pip install adapters==1.3.0 safetensors numpy   # pulls transformers 4.57.6
    /tmp/ah-venv/bin/python tests/methods/data/bottleneck/make_fixtures.py

Versions used for the committed files: adapters 1.3.0, transformers 4.57.6, torch 2.13.0+cpu (recorded in
``fixtures.json`` too).

What it writes next to itself (about 0.2 MB):
    fixtures.json                  model arguments, the AdapterHub configs used, versions
    {bert,llama}_base.safetensors  the random base weights (tiny BertForMaskedLM, tiny LlamaForCausalLM)
    {bert,llama}_{name}/           each adapter as AdapterHub saves it (``model.save_adapter(..., with_head=False,
                                   use_safetensors=True)``: adapter_config.json + model_adapter.safetensors)
    reference.safetensors          input_ids, attention_mask, and the logits of each model: without an
                                   adapter ("<model>.base"), with each adapter active alone ("<model>.<name>"),
                                   and with two stacked (``Stack(*STACKS[model])``, "<model>.stack")

The adapters (``ADAPTERS`` below), each added with ``model.add_adapter(name, config)`` after
``adapters.init(model)``, then given random weights (N(0, 0.3^2), seeded) so that they change the output a
lot, and activated alone with ``model.set_active_adapters(name)``:
    pfeiffer          SeqBnConfig(reduction_factor=4)                       (relu, bert init, scaling 1.0)
    houlsby           DoubleSeqBnConfig(reduction_factor=4)                 (swish, bert init, scaling 1.0)
    pfeiffer_variant  SeqBnConfig(reduction_factor=8, non_linearity="gelu", scaling=2.0, leave_out=[0])

Which AdapterHub options deltatune's BottleneckConfig reproduces exactly:
    placement="pfeiffer"  = SeqBnConfig       (mh_adapter=False, output_adapter=True, original_ln_before=True)
    placement="houlsby"   = DoubleSeqBnConfig (mh_adapter=True,  output_adapter=True, original_ln_before=False)
    both with AdapterHub's preset values of original_ln_after=True, residual_before_ln=True,
    adapter_residual_before_ln=False, ln_before=False, ln_after=False, is_parallel=False, use_gating=False,
    phm_layer=False, inv_adapter=None, cross_adapter=False, stochastic_depth=0.0; and these free options:
    reduction_factor (a number: bottleneck = int(hidden // reduction_factor)) or bottleneck_size,
    non_linearity (relu, gelu, gelu_new, swish, silu, tanh, sigmoid, leakyrelu), scaling (a float),
    dropout, init_weights ("bert", "houlsby", "mam_adapter"), leave_out = the layers not in
    layers_to_transform.
"""

from __future__ import annotations

import json
import os
import shutil

import adapters
import torch
import transformers
from adapters import DoubleSeqBnConfig, SeqBnConfig, Stack
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 96
MODEL_ARGS = {
    "bert": {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 48, "max_position_embeddings": 64},
    "llama": {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
}
# name -> (AdapterHub config class, its keyword arguments)
ADAPTERS = {
    "pfeiffer": (SeqBnConfig, {"reduction_factor": 4}),
    "houlsby": (DoubleSeqBnConfig, {"reduction_factor": 4}),
    "pfeiffer_variant": (SeqBnConfig, {"reduction_factor": 8, "non_linearity": "gelu", "scaling": 2.0,
                                       "leave_out": [0]}),
}
# two adapters applied one after the other (AdapterHub's Stack; deltatune: set_adapter([first, second]))
STACKS = {"bert": ("pfeiffer", "houlsby"), "llama": ("pfeiffer", "pfeiffer_variant")}


def build(kind: str) -> torch.nn.Module:
    """The tiny random base model (eager attention, as deltatune's test builds it)."""
    torch.manual_seed(0)
    if kind == "bert":
        model = BertForMaskedLM(BertConfig(**MODEL_ARGS["bert"], attn_implementation="eager"))
    else:
        model = LlamaForCausalLM(LlamaConfig(**MODEL_ARGS["llama"], attn_implementation="eager"))
    return model.eval()


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0  # one right-padded row
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def randomize(model: torch.nn.Module, name: str, seed: int) -> None:
    """Non-trivial adapter weights: every tensor of adapter ``name`` drawn from N(0, 0.3^2)."""
    generator = torch.Generator().manual_seed(seed)
    for key, param in sorted(model.named_parameters()):
        if f".adapters.{name}." in key:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def main() -> None:
    reference = inputs()
    out: dict[str, torch.Tensor] = dict(reference)
    for kind in MODEL_ARGS:
        model = build(kind)
        base_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if kind == "bert":
            base_state.pop("cls.predictions.decoder.weight")  # tied to the word embeddings
            base_state.pop("cls.predictions.decoder.bias", None)  # tied to cls.predictions.bias
        save_file(base_state, os.path.join(HERE, f"{kind}_base.safetensors"))
        with torch.no_grad():
            out[f"{kind}.base"] = model(**reference).logits
        adapters.init(model)
        for seed, (name, (config_class, kwargs)) in enumerate(ADAPTERS.items()):
            model.add_adapter(name, config=config_class(**kwargs))
            randomize(model, name, seed=10 + seed)
            model.set_active_adapters(name)
            with torch.no_grad():
                out[f"{kind}.{name}"] = model(**reference).logits
            folder = os.path.join(HERE, f"{kind}_{name}")
            shutil.rmtree(folder, ignore_errors=True)
            model.save_adapter(folder, name, with_head=False, use_safetensors=True)
        model.set_active_adapters(Stack(*STACKS[kind]))
        with torch.no_grad():
            out[f"{kind}.stack"] = model(**reference).logits
        model.set_active_adapters(None)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(HERE, "reference.safetensors"))
    meta = {
        "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "model_args": MODEL_ARGS,
        "stacks": STACKS,
        "adapters": {name: {"class": cls.__name__, "kwargs": kwargs} for name, (cls, kwargs) in ADAPTERS.items()},
    }
    with open(os.path.join(HERE, "fixtures.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main()
