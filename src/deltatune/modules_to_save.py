"""Whole modules trained next to an adapter (PEFT's ``modules_to_save``), e.g. a new classifier head.

Each adapter gets its own full copy of the module; the original stays untouched so that switching
or disabling adapters gives the base model back.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .adapter_layer import BASE_ADAPTER, check_batch_size, replace_module, rows_by_adapter
from .targets import name_matches


class ModulesToSaveWrapper(nn.Module):
    """Holds ``original_module`` and one trainable copy per adapter in ``modules_to_save``.

    The attribute names are PEFT's, so the model's state dict keys are the same in both libraries.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.batch_adapter_names: list[str] | None = None

    @property
    def base_layer(self) -> nn.Module:
        return self.original_module

    @property
    def weight(self) -> torch.Tensor:
        return self._current().weight

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Nothing to fold: the copy simply replaces the original on merge_and_unload."""

    def unmerge(self) -> None:
        """Nothing was folded."""

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[adapter_name].state_dict(keep_vars=True))

    def unwrapped(self, merge: bool) -> nn.Module:
        """The active adapter's trained copy, merged or not (as PEFT's unload and merge_and_unload keep it).

        The copy is what the adapter trained, so dropping it on ``unload()`` would silently lose that
        training. The original comes back only when no active adapter has a copy of this module.
        """
        active = self._active_copy()
        return active if active is not None else self.original_module

    def _active_copy(self) -> nn.Module | None:
        for name in self.active_adapters:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return None

    def _current(self) -> nn.Module:
        copy_ = None if self.disabled else self._active_copy()
        return copy_ if copy_ is not None else self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.batch_adapter_names is None or self.disabled:
            return self._current()(x, *args, **kwargs)
        check_batch_size(self.batch_adapter_names, x.shape[0])
        result = None
        for name, rows in rows_by_adapter(self.batch_adapter_names, x.device).items():
            module = self.modules_to_save[name] if name != BASE_ADAPTER and name in self.modules_to_save \
                else self.original_module
            out = module(x[rows], *args, **kwargs)
            if result is None:
                result = out.new_zeros((x.shape[0], *out.shape[1:]))
            result = result.index_copy(0, rows, out)
        return result


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> None:
    """Give adapter ``adapter_name`` its own trainable copy of each module named in ``names``.

    Names follow the list rule of target_modules. As in PEFT, a name that matches nothing is
    fine as long as one name matches (SEQ_CLS asks for both 'classifier' and 'score').

    Raises:
        ValueError: when no name matches any module (checked before anything changes).
    """
    matches: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or not name_matches(name, names):
            continue
        if any(name.startswith(done + ".") for done, _ in matches):
            continue  # inside a module already chosen (or inside its wrapper)
        matches.append((name, module))
    if not matches:
        raise ValueError(
            f"modules_to_save={names!r} matched no module of {type(model).__name__}; "
            "give names of modules that exist (e.g. 'lm_head', 'classifier')."
        )
    for name, module in matches:
        if isinstance(module, ModulesToSaveWrapper):
            if adapter_name not in module.modules_to_save:
                module.add_adapter(adapter_name)
            continue
        wrapper = ModulesToSaveWrapper(module)
        wrapper.add_adapter(adapter_name)
        replace_module(model, name, wrapper)
