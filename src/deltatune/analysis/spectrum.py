"""The spectrum of a LoRA adapter's learned update delta W = scaling * B @ A, per module.

Hu et al. 2021 (section 7) argue that the update has a very low intrinsic rank; the singular values of
delta W show how many directions carry it. Summaries: the energy share of the top k directions,
sum_{i<=k} s_i^2 / sum_i s_i^2, and the effective rank of Roy & Vetterli (2007), exp(H(p)) with
p_i = s_i / sum_j s_j and H(p) = -sum_i p_i log p_i (between 1 and r; equal to r for a flat spectrum).
"""

from __future__ import annotations

import math

import torch

from .adapter import AdapterSource, LoraFactors, load_lora


def update_svdvals(factors: LoraFactors) -> torch.Tensor:
    """Singular values of scaling * B @ A in float64, descending, without forming the (out, in) product.

    With B = Q_b R_b and A^T = Q_a R_a (reduced QR; Q_b, Q_a have orthonormal columns), B @ A =
    Q_b (R_b R_a^T) Q_a^T, so its singular values are those of the small (r, r) core R_b R_a^T.
    Cost O((out + in) r^2) instead of O(out in r).
    """
    _, r_b = torch.linalg.qr(factors.B.to(torch.float64))  # B (out, r) -> R_b (r, r)
    _, r_a = torch.linalg.qr(factors.A.T.to(torch.float64))  # A^T (in, r) -> R_a (r, r)
    return torch.linalg.svdvals(r_b @ r_a.T) * abs(factors.scaling)


def spectrum(adapter: AdapterSource) -> dict[str, torch.Tensor]:
    """Singular values (float64, descending) of every module's update scaling * B @ A of a LoRA adapter.

    Args:
        adapter: an adapter folder or a PeftModel (its active adapter). scaling is lora_alpha / r, or
            lora_alpha / sqrt(r) with use_rslora, with r and alpha taken per module from rank_pattern and
            alpha_pattern.

    Raises:
        ValueError: not a LoRA adapter, non-finite weights (see :func:`~.adapter.load_lora`).
    """
    return {name: update_svdvals(factors) for name, factors in load_lora(adapter).items()}


def energy_share(s: torch.Tensor, k: int) -> float:
    """sum_{i<=k} s_i^2 / sum_i s_i^2 for descending singular values s; 0.0 for an all-zero update."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    energy = s.to(torch.float64).square()
    total = float(energy.sum())
    return float(energy[:k].sum()) / total if total > 0 else 0.0


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp(H(p)), p = s / sum(s), H(p) = -sum p log p (0 log 0 = 0); 0.0 for s = 0."""
    s = s.to(torch.float64)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def spectrum_rows(spectra: dict[str, torch.Tensor], top: int = 4) -> list[dict[str, object]]:
    """One CSV/JSON row per module: r, the top singular values, energy share top-1/top-4, effective rank."""
    rows = []
    for name, s in spectra.items():
        row: dict[str, object] = {"module": name, "r": len(s)}
        row.update({f"sigma_{i + 1}": float(s[i]) if i < len(s) else None for i in range(top)})
        row.update({"energy_top1": energy_share(s, 1), "energy_top4": energy_share(s, 4),
                    "effective_rank": effective_rank(s)})
        rows.append(row)
    return rows
