"""A new LoRA adapter made from weighted existing ones: ``PeftModel.add_weighted_adapter``, as HF PEFT does it.

Each combination acts layer by layer on the adapters found there, with the weights w_i the caller gives:

- "cat": A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], so B A = sum_i w_i s_i B_i A_i exactly;
  the ranks add up.
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": A and B are combined separately, each with
  the weights sqrt(|w_i s_i|) (the sign goes on A), by task arithmetic (a weighted sum; Ilharco et al. 2023),
  TIES-merging (keep each tensor's largest ``density`` fraction, elect a sign per entry, average the entries
  that agree with it; Yadav et al. 2023, section 3), DARE (keep a random ``density`` fraction, rescaled by
  1 / density; Yu et al. 2024, section 3), or magnitude pruning. Cheap but approximate: sum_i B_i A_i is not
  (sum_i B_i)(sum_i A_i). Needs equal ranks.
- "svd" and the "*_svd" variants: the same weightings applied to the updates s_i B_i A_i themselves, then the
  best rank-k approximation of the result by SVD (k = ``svd_rank``, default the largest input rank).

The new adapter has scaling 1 (lora_alpha = r), as in PEFT. Where its rank differs between layers (inputs with
``rank_pattern``, an SVD truncated by a small layer), the config records it in ``rank_pattern`` /
``alpha_pattern``, so the adapter saves and loads again (PEFT's own result cannot be reloaded then).
Every check runs before the model changes; a failure after the adapter is attached takes it off again.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any

import torch
from torch import nn

from ..adapter_layer import adapter_layers, inside_adapter_layer
from ..config import is_real_number
from ..targets import find_targets, resolve_pattern
from .lora import LoraLayer

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*SVD_TYPES[:1], "linear", "cat", *FACTOR_TYPES[1:], *SVD_TYPES[1:])
SIGN_METHODS = ("total", "frequency")
# how each weighting prunes a tensor first: (method, rescale by 1 / density) or None
_PRUNING = {"linear": None, "ties": ("magnitude", False), "magnitude_prune": ("magnitude", False),
            "dare_linear": ("random", True), "dare_ties": ("random", True)}


@dataclasses.dataclass
class _Plan:
    """What ``add_weighted_adapter`` will do, worked out (and checked) before the model changes."""

    kind: str  # the combination type, "linear" for a single adapter (PEFT's rule)
    config: Any  # the new adapter's LoraConfig
    layers: dict[str, list[tuple[str, float]]]  # layer path -> the (adapter, weight) pairs it holds, in order
    ranks: dict[str, int]  # layer path -> the new adapter's rank there


def add_weighted_adapter(
    model: Any, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd",
    svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
    svd_driver: str | None = None, density: float | None = None, majority_sign_method: str = "total",
) -> None:
    """Add LoRA adapter ``adapter_name`` combining ``adapters`` with ``weights`` (not activated, frozen).

    Args:
        model: a deltatune ``PeftModel`` holding the LoRA adapters.
        adapters: names of the adapters to combine.
        weights: one weight per adapter; negative weights subtract an adapter's effect.
        adapter_name: name of the new adapter (must be new).
        combination_type: one of ``COMBINATION_TYPES`` (see the module docstring); with a single adapter
            every type is "linear", as in PEFT.
        svd_rank: rank of an SVD result; None = the largest input rank.
        svd_clamp: clamp an SVD result's factors to this quantile of their absolute entries (None: no clamp).
        svd_full_matrices, svd_driver: passed to ``torch.linalg.svd`` (the driver works on CUDA only).
        density: fraction of entries kept by the pruning types ("ties", "dare_*", "magnitude_prune*"), in (0, 1].
        majority_sign_method: how TIES elects the sign of an entry: "total" (sign of the sum) or "frequency"
            (the sign most tensors have).

    Raises:
        ValueError: unknown adapters or combination type, a non-LoRA adapter, weights that do not match the
            adapters, unequal ranks where the type needs equal ones, a density outside (0, 1]; the model is
            left unchanged.
    """
    plan = _plan(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_driver,
                 density, majority_sign_method)
    model.add_adapter(adapter_name, plan.config)
    try:
        layers = dict(adapter_layers(model.get_base_model()))
        with torch.no_grad():
            for path, pairs in plan.layers.items():
                layer = layers[path]
                if plan.kind == "cat":
                    a, b = _cat(layer, pairs)
                elif plan.kind in SVD_TYPES:
                    a, b = _svd(layer, pairs, plan.kind, plan.ranks[path], density, majority_sign_method,
                                svd_clamp, svd_full_matrices, svd_driver)
                else:
                    a, b = _factor_combination(layer, pairs, plan.kind, density, majority_sign_method)
                new_a, new_b = _factors(layer, adapter_name)
                if new_a.shape != a.shape or new_b.shape != b.shape:  # the plan's ranks disagree with the math
                    raise RuntimeError(f"{path}: combined shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit the "
                                       f"new adapter's {tuple(new_a.shape)}, {tuple(new_b.shape)}.")
                new_a.copy_(a)
                new_b.copy_(b)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


# ---- checks and the plan ---------------------------------------------------------------------------------------

def _plan(model: Any, adapters: Any, weights: Any, adapter_name: str, combination_type: Any, svd_rank: Any,
          svd_clamp: Any, svd_driver: Any, density: Any, majority_sign_method: Any) -> _Plan:
    """Check every argument against the model and work out the new adapter's config and per-layer ranks."""
    adapters, weights = _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank,
                                         svd_clamp, density, majority_sign_method)
    kind = "linear" if len(adapters) == 1 else combination_type
    root = model.get_base_model()
    layers: dict[str, list[tuple[str, float]]] = {}
    for path, layer in adapter_layers(root):
        if hasattr(layer, "original_module"):  # modules_to_save: two trained copies cannot be combined
            held = [a for a in dict.fromkeys(adapters) if a in layer.adapter_names()]
            if len(held) > 1:
                raise ValueError(f"Adapters {held} each train their own copy of {path} (modules_to_save); such "
                                 "copies cannot be combined. Combine adapters of which at most one has it.")
            continue
        pairs = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.adapter_names()]
        if not pairs:
            continue
        if not isinstance(layer, LoraLayer):
            raise ValueError(f"{path} holds adapter {pairs[0][0]!r} in a {type(layer).__name__}, not a LoRA layer.")
        layers[path] = pairs
    if not layers:
        raise ValueError(f"The adapters {adapters} adapt no layer of this model; nothing to combine.")
    new_rank = _new_rank([model.peft_config[a] for a in adapters], kind, svd_rank)
    ranks = _layer_ranks(root, layers, kind, new_rank)
    if svd_driver is not None and kind in SVD_TYPES:
        path, pairs = next(iter(layers.items()))
        device = _factors(dict(adapter_layers(root))[path], pairs[0][0])[0].device
        if device.type != "cuda":
            raise ValueError(f"svd_driver={svd_driver!r} works on CUDA only (torch.linalg.svd); the adapters are on "
                             f"{device}. Leave svd_driver at None.")
    config = _new_config(model, root, adapters, layers, ranks, new_rank)
    return _Plan(kind, config, layers, ranks)


def _check_arguments(model: Any, adapters: Any, weights: Any, adapter_name: str, combination_type: Any,
                     svd_rank: Any, svd_clamp: Any, density: Any, majority_sign_method: Any
                     ) -> tuple[list[str], list[float]]:
    """The arguments and the adapters' configs: raise a ValueError naming the first one that is wrong."""
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}.")
    unknown = [a for a in adapters if a not in model.peft_config]
    if unknown:
        raise ValueError(f"No adapter named {unknown}; this model has {sorted(model.peft_config)}.")
    if adapter_name in model.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} exists already; pick another name for the combination.")
    for name in dict.fromkeys(adapters):
        config = model.peft_config[name]
        if config.peft_type != "LORA":
            raise ValueError(f"Adapter {name!r} is a {config.peft_type} adapter; only LoRA adapters can be combined.")
        if getattr(config, "use_dora", False):
            raise ValueError(f"Adapter {name!r} is a DoRA adapter; its magnitude vectors cannot be combined. Combine "
                             "plain LoRA adapters.")
    weights = check_weighting(len(adapters), weights, combination_type, density, majority_sign_method, svd_rank,
                              svd_clamp)
    return list(adapters), weights


def check_weighting(count: int, weights: Any, combination_type: Any, density: Any = None,
                    majority_sign_method: Any = "total", svd_rank: Any = None, svd_clamp: Any = None) -> list[float]:
    """Check the arguments of a combination of ``count`` adapters that need no model (``merge-adapters`` calls this
    before loading one).

    Returns:
        The weights as floats.

    Raises:
        ValueError: the first argument that is wrong, saying what it takes.
    """
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != count:
        given = len(weights) if hasattr(weights, "__len__") and not isinstance(weights, str) else weights
        raise ValueError(f"weights must hold one number per adapter: {count} adapters, got {given!r} weights.")
    weights = [float(w) if is_real_number(w) else w for w in weights]
    bad = [w for w in weights if not is_real_number(w) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers, got {bad[0]!r}.")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Unknown combination_type {combination_type!r}; choose one of "
                         f"{', '.join(COMBINATION_TYPES)}.")
    if density is not None and (not is_real_number(density) or not 0 < density <= 1):
        raise ValueError(f"density must be a number in (0, 1] (the fraction of entries kept), got {density!r}.")
    kind = "linear" if count == 1 else combination_type
    if density is None and (_PRUNING.get(kind) or kind in SVD_TYPES[1:]):
        raise ValueError(f"combination_type={kind!r} prunes each adapter: give density, the fraction of entries "
                         "kept, in (0, 1] (e.g. 0.5).")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}.")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive integer or None, got {svd_rank!r}.")
    if svd_clamp is not None and (not is_real_number(svd_clamp) or not 0 <= svd_clamp <= 1):
        raise ValueError(f"svd_clamp must be a quantile in [0, 1] or None, got {svd_clamp!r}.")
    return weights


def _new_rank(configs: list[Any], kind: str, svd_rank: int | None) -> int:
    """The config's r, by PEFT's rule from each input's largest rank: their sum for "cat", ``svd_rank`` or the
    largest for SVD, the (largest) common one otherwise."""
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if kind == "cat":
        return sum(ranks)
    if kind in SVD_TYPES:
        return svd_rank or max(ranks)
    return max(ranks)


def _layer_ranks(root: nn.Module, layers: dict[str, list[tuple[str, float]]], kind: str,
                 new_rank: int) -> dict[str, int]:
    """The new adapter's rank in each layer: the common rank (weightings of A and B), the sum ("cat"), or the SVD
    rank ``new_rank`` (at most the update's smaller side).

    Raises:
        ValueError: a weighting of A and B over adapters whose ranks differ in some layer (PEFT's rule, checked per
            layer: inputs with rank_pattern combine where their ranks agree), or "cat" / SVD on a grouped conv.
    """
    modules = dict(adapter_layers(root))
    ranks = {}
    for path, pairs in layers.items():
        layer = modules[path]
        found = [layer.r[a] for a, _ in pairs]
        groups = getattr(layer.base_layer, "groups", 1) if layer.kind == "conv" else 1
        if kind in FACTOR_TYPES:
            if len(set(found)) > 1:
                raise ValueError(
                    f"combination_type={kind!r} combines A and B entry by entry, which needs adapters of equal rank; "
                    f"at {path} the ranks are {dict((a, layer.r[a]) for a, _ in pairs)}. Use 'cat' or 'svd', which "
                    "combine any ranks.")
            ranks[path] = found[0]
        elif groups > 1:
            raise ValueError(f"combination_type={kind!r} cannot combine adapters on {path}, a convolution with "
                             f"groups={groups}; use 'linear' (equal ranks) or leave such layers out.")
        elif kind == "cat":
            ranks[path] = sum(found)
        else:
            a, b = _factors(layer, pairs[0][0])
            ranks[path] = min(new_rank, b.shape[0], a[0].numel())
    return ranks


def _new_config(model: Any, root: nn.Module, adapters: list[str], layers: dict[str, list[tuple[str, float]]],
                ranks: dict[str, int], new_rank: int) -> Any:
    """PEFT's config for the result: the first adapter's, with r = lora_alpha = the new rank (scaling 1), the union of
    the target modules, and per-layer ranks in rank_pattern / alpha_pattern where they differ from r.

    Where the union of ``target_modules`` (PEFT's rule) would adapt other layers than the inputs hold (other
    ``layers_to_transform``, "all-linear" mixed with names), the config names the layers by their full paths.
    """
    configs = [model.peft_config[a] for a in adapters]
    rank_pattern = _exact_keys(ranks, new_rank)
    config = dataclasses.replace(copy.deepcopy(configs[0]), r=new_rank, lora_alpha=new_rank, use_rslora=False,
                                 target_modules=_union_targets(configs), rank_pattern=rank_pattern,
                                 alpha_pattern=dict(rank_pattern))
    if _targets(root, config) != set(layers):
        config = dataclasses.replace(config, target_modules=sorted(layers), exclude_modules=None,
                                     layers_to_transform=None, layers_pattern=None)
    return config


def _union_targets(configs: list[Any]) -> Any:
    """PEFT's union of target_modules: the names of every list, or the regexes joined with "|"."""
    targets = [copy.deepcopy(c.target_modules) for c in configs]
    if all(t == targets[0] for t in targets):  # e.g. "all-linear" for all: no regex of regexes needed
        return targets[0]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if all(isinstance(t, (list, set, tuple)) for t in targets):
        return sorted({name for t in targets for name in t})
    return targets[0]  # a mix: _new_config falls back to the full paths


def _targets(root: nn.Module, config: Any) -> set[str]:
    """The layers ``config`` would adapt in ``root`` (empty when it matches none)."""
    try:
        return set(find_targets(root, config.target_modules, exclude_modules=config.exclude_modules,
                                layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
                                skip_inside=inside_adapter_layer(root), skip=config.modules_to_save or ()))
    except ValueError:
        return set()


def _exact_keys(ranks: dict[str, int], default: int) -> dict[str, int]:
    """rank_pattern for the layers whose rank is not ``default``, keyed by full path; regex-escaped where a path would
    also match another layer (PEFT and deltatune read the keys as regexes matching the end of a module's name)."""
    plain = {path: rank for path, rank in ranks.items() if rank != default}
    if all(resolve_pattern(plain, path, default) == rank for path, rank in ranks.items()):
        return plain
    return {re.escape(path): rank for path, rank in plain.items()}


# ---- the arithmetic, per layer -----------------------------------------------------------------------------------

def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter ``name``'s (A, B) tensors in this layer: A (r, in, ...), B (out, r, ...)."""
    if layer.kind == "embedding":
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _cat(layer: LoraLayer, pairs: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [w_i s_i A_i] stacked by rows, B = [B_i] side by side: B A = sum_i w_i s_i B_i A_i."""
    a_parts, b_parts = [], []
    for name, weight in pairs:
        a, b = _factors(layer, name)
        a_parts.append(a.detach() * weight * layer.scaling[name])
        b_parts.append(b.detach())
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def _factor_combination(layer: LoraLayer, pairs: list[tuple[str, float]], kind: str, density: float | None,
                        sign_method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B each combined by ``kind`` with weights sqrt(|w_i s_i|), the sign of w_i s_i on A's only (a sign on
    both would cancel)."""
    a_list, b_list, a_weights, b_weights = [], [], [], []
    for name, weight in pairs:
        a, b = _factors(layer, name)
        scaled = weight * layer.scaling[name]
        a_weights.append(math.sqrt(abs(scaled)) * (1 if scaled >= 0 else -1))
        b_weights.append(math.sqrt(abs(scaled)))
        a_list.append(a.detach())
        b_list.append(b.detach())
    dtype, device = a_list[0].dtype, a_list[0].device
    a = combine_tensors(a_list, torch.tensor(a_weights).to(device), kind, density, sign_method)
    b = combine_tensors(b_list, torch.tensor(b_weights).to(device), kind, density, sign_method)
    return a.to(dtype), b.to(dtype)


def _svd(layer: LoraLayer, pairs: list[tuple[str, float]], kind: str, rank: int, density: float | None,
         sign_method: str, clamp: float | None, full_matrices: bool, driver: str | None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The updates s_i B_i A_i combined by ``kind`` (without "_svd"), then U_k S_k and V_k^T of their SVD as B and A."""
    deltas = [layer.delta_weight(name).detach() for name, _ in pairs]  # shaped like the base weight
    weights = torch.tensor([w for _, w in pairs]).to(deltas[0].device)
    delta = combine_tensors(deltas, weights, "linear" if kind == "svd" else kind[:-len("_svd")], density, sign_method)
    a_shape, b_shape = _factors(layer, pairs[0][0])
    if layer.kind == "conv":
        delta = delta.flatten(1)  # (out, in * kernel)
    if layer.fan_in_fan_out or layer.kind == "embedding":
        delta = delta.T  # back to B A's orientation: (out, in), for an embedding (dim, num_embeddings)
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u = u[:, :rank] @ torch.diag(s[:rank])  # (out, k)
    vh = vh[:rank, :]  # (k, in)
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    if layer.kind == "conv":
        u = u.reshape(u.shape[0], rank, *([1] * (b_shape.dim() - 2)))
        vh = vh.reshape(rank, *a_shape.shape[1:])
    return vh, u


def combine_tensors(tensors: list[torch.Tensor], weights: torch.Tensor, kind: str, density: float | None = None,
                    sign_method: str = "total") -> torch.Tensor:
    """One weighted combination of same-shaped tensors (PEFT's ``merge_utils``).

    "linear": sum_i w_i t_i (task arithmetic). "magnitude_prune": the same after keeping each t_i's
    ``int(density * numel)`` largest entries. "dare_linear": after keeping each entry with probability ``density``
    and dividing by it (so the expectation is t_i). "ties" / "dare_ties": pruned as magnitude_prune / dare, then
    each entry's sign is elected (sign of sum_i t_i for "total", of sum_i sign(t_i) for "frequency") and the
    weighted entries that agree with it are averaged.

    Args:
        tensors: n tensors of one shape.
        weights: (n,) weights.

    Returns:
        The combined tensor, of the tensors' shape.
    """
    pruning = _PRUNING[kind]
    if pruning is not None:
        tensors = [_prune(t, density, *pruning) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # (n, *shape)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else sign.sum(dim=0)
    agrees = sign == torch.where(votes >= 0, 1, -1)  # (n, *shape)
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


def _prune(tensor: torch.Tensor, density: float, method: str, rescale: bool) -> torch.Tensor:
    """Keep the ``density`` fraction of entries: the largest by magnitude, or random ones (divided by density when
    ``rescale``). Random draws come from torch's global generator, in PEFT's order, so a seed gives PEFT's result."""
    if density >= 1:
        return tensor
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    kept = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return kept / density if rescale else kept
