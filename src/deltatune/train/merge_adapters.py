"""``deltatune merge-adapters``: combine saved LoRA adapters into one new adapter folder.

The adapters are loaded on their base model (found as ``deltatune merge`` finds it: ``--model``, else what the
adapters record, the bundled SmolLM2 for a default run), combined with ``PeftModel.add_weighted_adapter`` and
written as a PEFT adapter folder that deltatune, PEFT and vLLM load like any other.
"""

from __future__ import annotations

import os

from ..config import CONFIG_NAME, read_config_dict
from ..formats.models import load_model
from ..methods.lora_combine import check_weighting
from ..model import PeftModel
from .infer import base_model_of, base_source
from .outputs import check_output


def merge_adapters(adapters: list[str], weights: list[float], output: str, combination_type: str = "svd",
                   density: float | None = None, svd_rank: int | None = None, model: str | None = None,
                   overwrite: bool = False) -> str:
    """Combine the LoRA adapters in folders ``adapters`` with ``weights`` and write the result to ``output``.

    Args:
        combination_type, density, svd_rank: as in ``PeftModel.add_weighted_adapter``.
        model: the base model (HF folder or .gguf file); None = the one the adapters record.
        overwrite: allow ``output`` to hold an adapter or a model already (refused otherwise).

    Returns:
        ``output``.

    Raises:
        FileNotFoundError / ValueError: a folder that is not an adapter, a non-LoRA adapter, weights that do not
            match the adapters, adapters that record different base models (without ``model``), an output that
            exists (without ``overwrite``) or is one of the inputs, or any refusal of ``add_weighted_adapter``;
            all but the last are checked before the base model is loaded. Nothing is written then.
    """
    if not adapters:
        raise ValueError("Give at least one adapter folder to combine.")
    weights = check_weighting(len(adapters), weights, combination_type, density, svd_rank=svd_rank)
    bases = {}
    for adapter in adapters:
        bases[adapter] = base_model_of(adapter, model)  # an adapter folder with a readable config, or a clear error
        peft_type = read_config_dict(adapter).get("peft_type")
        if peft_type != "LORA":
            raise ValueError(f"{os.path.join(adapter, CONFIG_NAME)}: a {peft_type} adapter; only LoRA adapters can be "
                             "combined.")
    if len(set(bases.values())) > 1:
        listed = ", ".join(f"{a}: {b!r}" for a, b in bases.items())
        raise ValueError(f"The adapters were trained on different base models ({listed}); pass --model PATH to "
                         "combine them on one.")
    source = base_source(adapters[0], model)
    protected = {source.directory: "the base model's folder", **{a: "an input adapter's folder" for a in adapters}}
    check_output(output, protected, overwrite, command="merge-adapters")

    base, _ = load_model(source)
    names = [f"input_{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(base, adapters[0], adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(adapter, adapter_name=name)
    peft_model.add_weighted_adapter(names, weights, "default", combination_type=combination_type,
                                    svd_rank=svd_rank, density=density)
    if model is not None:
        peft_model.peft_config["default"].base_model_name_or_path = source.name
    peft_model.save_pretrained(output, selected_adapters=["default"])
    return output
