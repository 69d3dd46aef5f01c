"""An adapted layer's input, rebuilt in backward from tensors autograd keeps anyway, instead of kept.

LoRA's A gradient needs the layer's input ``x``; a frozen layer (the floor) never keeps it. In a transformer block
most adapted inputs are cheap products of tensors that the block's own backward keeps regardless: q/k/v and
gate/up read ``RMSNorm(h) = w * (h * rsqrt(mean(h^2) + eps))``, whose multiplications keep ``w``, ``h`` and the
rsqrt for their own gradients, and down_proj reads ``act(gate) * up``, whose multiplication keeps both factors. So
instead of ``x`` (2,688 floats per token and block on SmolLM2's shape: nearly all a LoRA step kept over the floor,
685 against 525 MiB at 4 x 128 tokens, now 529) the fused nodes keep references to those factors, and multiply
them again in backward: a few elementwise products, bit for bit the same ``x``.

Only chains of ``torch.mul`` are rebuilt (read from ``x.grad_fn``: ``MulBackward0`` and what it saved, see
PyTorch's "saved tensors" notes); anything else, a chain whose replay has not matched ``x`` exactly the first
time its shape was seen, an ``x`` changed in place since it was made, or a forward under saved-tensor hooks
(activation checkpointing, ``save_on_cpu``) or ``torch.compile``, keeps ``x`` as before. The factors are kept
through ``save_for_backward``, so an in-place change to one of them is an error in backward, as it would be in the
multiplication's own backward.

Layers that read the same input share one :class:`RebuiltInput` (q/k/v read one RMSNorm output, gate/up another):
the first of their backwards rebuilds it and the others reuse it: a Llama block rebuilds its two RMSNorm outputs
twice instead of five times.
"""

from __future__ import annotations

import threading
import weakref

import torch

_MAX_DEPTH = 3  # RMSNorm's output is two multiplications deep
_CHECKED: dict[tuple, bool] = {}  # a chain's signature -> whether its replay matched x exactly the first time
_LAST = threading.local()  # .entry: weak references to the last rebuildable input seen and to its RebuiltInput


class RebuiltInput:
    """How to rebuild one adapted input in backward, shared by the fused nodes that read it.

    Why: q, k and v each multiplied the same RMSNorm factors again in backward (and gate and up), five rebuilds per
    Llama block where two do (all rebuilds took about 2% of an all-linear step at 4 x 128 tokens). The first
    backward that needs the input rebuilds it and holds it for the nodes still to come (``readers``, counted in
    forward); the last one lets it go. A node whose backward never runs (``torch.autograd.grad`` on part of the
    graph) leaves it held until the graph is freed; a second backward over a retained graph rebuilds it for each
    node.
    """

    def __init__(self, structure: tuple) -> None:
        self.structure = structure
        self.readers = 0
        self._value: torch.Tensor | None = None

    def take(self, leaves: tuple[torch.Tensor, ...] | list[torch.Tensor], features: int,
             dtype: torch.dtype) -> torch.Tensor:
        """The flat (tokens, ``features``) input in ``dtype``, from this node's saved ``leaves`` (the same tensors
        for every reader)."""
        if self._value is None or self._value.dtype != dtype:
            self._value = replay(self.structure, leaves).reshape(-1, features).to(dtype)
        value = self._value
        self.skip()
        return value

    def skip(self) -> None:
        """One reader done (also one whose backward did not need the input: A frozen); the last lets it go."""
        self.readers -= 1
        if self.readers <= 0:
            self._value = None


def saved_tensor_hooks_active() -> bool:
    """Whether saved tensors are being packed by hooks here (non-reentrant activation checkpointing, ``save_on_cpu``):
    reading a node's saved tensors would then run the unpack hook (for checkpointing: recompute the block in
    forward), and what is kept is the hooks' business. PyTorch has no public query for it; where the private one is
    missing, the answer is "yes" and inputs are kept as before."""
    query = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if query is None:
        return True
    try:
        return query(False) is not None
    except TypeError:  # older signature without the tracing flag
        return query() is not None


def _chain(node: object, depth: int, leaves: list[torch.Tensor]) -> tuple | None:
    """The multiplication chain that produced a tensor with grad_fn ``node``, as a nested (left, right) tuple of
    indices into ``leaves`` (the saved factors, appended here in order), or None."""
    if node is None or depth > _MAX_DEPTH or type(node).__name__ != "MulBackward0":
        return None
    parts = []
    for saved_name, (child, _) in zip(("_saved_self", "_saved_other"), node.next_functions, strict=True):
        try:
            saved = getattr(node, saved_name, None)
        except RuntimeError:  # freed by a backward that already ran through this product
            return None
        if isinstance(saved, torch.Tensor):
            leaves.append(saved)
            parts.append(len(leaves) - 1)
            continue
        inner = _chain(child, depth + 1, leaves)
        if inner is None:
            return None
        parts.append(inner)
    return tuple(parts)


def replay(structure: tuple, leaves: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """The product ``structure`` describes, of ``leaves``.

    A product made here is this function's own, so the next multiplication writes into it when the shapes and dtype
    allow: one fresh tensor per rebuild instead of one per product. As the right factor (RMSNorm's ``w * (h * r)``)
    only when both factors are full tensors of one dtype: then the product is the same bits either way round, where
    a bf16 tensor times a 0-dim fp32 one is not (PyTorch treats the 0-dim operand as a scalar by position).
    """
    left, right = (leaves[p] if isinstance(p, int) else replay(p, leaves) for p in structure)
    for index, (own, other) in enumerate(((left, right), (right, left))):
        if (not isinstance(structure[index], int) and not (own.requires_grad and torch.is_grad_enabled())
                and own.dtype == torch.result_type(own, other)
                and own.shape == torch.broadcast_shapes(own.shape, other.shape)
                and (index == 0 or (other.dtype == own.dtype and other.dim() > 0))):
            return own.mul_(other)
    return left * right


def rebuildable_input(x: torch.Tensor) -> tuple[RebuiltInput, list[torch.Tensor]] | None:
    """(how, factors) to rebuild ``x`` in backward, or None to keep ``x`` itself; each call counts one more reader
    of the same ``x`` (the layers that read it are called one after another, so the last ``x`` is remembered)."""
    # version 0: x is as the multiplication wrote it (an in-place edit, even under no_grad, leaves grad_fn as it was)
    # (torch.compile first: reading grad_fn while dynamo traces breaks its graph)
    if torch.compiler.is_compiling() or x.grad_fn is None or x._version != 0 or saved_tensor_hooks_active():
        return None
    leaves: list[torch.Tensor] = []
    structure = _chain(x.grad_fn, 0, leaves)
    if structure is None:
        return None
    last = getattr(_LAST, "entry", None)
    shared = None if last is None or last[0]() is not x else last[1]()  # the nodes that read x hold it, not _LAST
    if shared is None:
        shared = _checked_rebuild(x, structure, leaves)
        if shared is None:
            return None
        _LAST.entry = (weakref.ref(x), weakref.ref(shared))
    shared.readers += 1
    return shared, leaves


def _checked_rebuild(x: torch.Tensor, structure: tuple, leaves: list[torch.Tensor]) -> RebuiltInput | None:
    """A new RebuiltInput for ``x``, or None where this chain's replay did not give ``x`` exactly the first time its
    signature was seen."""
    signature = (structure, tuple((t.shape, t.stride(), t.dtype, t.device) for t in leaves),
                 (x.shape, x.stride(), x.dtype))
    matched = _CHECKED.get(signature)
    if matched is None:
        with torch.no_grad():
            again = replay(structure, leaves)
        # bit for bit (a NaN in the first batch must not switch the rebuild off for good)
        matched = again.dtype == x.dtype and again.shape == x.shape and torch.allclose(again, x, rtol=0.0, atol=0.0,
                                                                                       equal_nan=True)
        if len(_CHECKED) > 4096:
            _CHECKED.clear()
        _CHECKED[signature] = matched
    return RebuiltInput(structure) if matched else None
