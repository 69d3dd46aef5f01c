"""Whether deltatune's own autograd Functions may run here: not under ``torch.func`` transforms or forward-mode AD.

deltatune's fast paths (the fused LoRA and DoRA training nodes, sparse dropout, the chunked loss, a quantized
layer's backward) are ``torch.autograd.Function``s with a hand-written backward. ``torch.func`` transforms
(``grad``, ``vmap``, ``jacrev``, ``jvp``: per-sample gradients, meta-learning, influence functions) refuse a Function
without ``setup_context`` and rules of its own, and forward-mode AD (``torch.autograd.forward_ad``) needs a ``jvp``;
PEFT's plain modules work under both. So while one is active each of those paths takes its plain-op form (and
in-place additions into a layer's output, which vmap runs one sample at a time, become out-of-place): the same
values, without the speed-ups.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd import forward_ad


def func_transform_active() -> bool:
    """True inside a ``torch.func`` transform or a ``forward_ad.dual_level()``; cheap enough to ask per layer call."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def outside_func_transforms() -> contextlib.AbstractContextManager:
    """A context that runs its ops outside any active ``torch.func`` transform (a no-op when none is): for
    decoding frozen constants, such as quantized weights, with ops that have no transform rules."""
    return torch._C._DisableFuncTorch() if func_transform_active() else contextlib.nullcontext()
