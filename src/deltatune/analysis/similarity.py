"""Subspace similarity of two LoRA adapters (Hu et al. 2021, "LoRA", section 7.2, Figures 3 and 4).

For the update matrices of two adapters on the same module, with U_a (d, r_a) and U_b (d, r_b) their
singular vectors in descending order of singular value (right-singular vectors of A, or left-singular
vectors of B), the normalized similarity of the top-i and top-j directions is

    phi(i, j) = ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j)   in [0, 1],

1 when one subspace contains the other, and max(i, j) / d in expectation for independent random subspaces.
"""

from __future__ import annotations

import re

import torch

from .adapter import AdapterSource, LoraFactors, load_lora

MATRICES = ("A", "B")


def singular_vectors(factors: LoraFactors, matrix: str = "A") -> torch.Tensor:
    """The (d, r) orthonormal singular vectors, descending: A's right ones (d = in) or B's left ones (d = out).

    Raises:
        ValueError: ``matrix`` is not "A" or "B", or the matrix is all zeros (e.g. B of an untrained adapter),
            whose singular vectors are arbitrary.
    """
    if matrix not in MATRICES:
        raise ValueError(f"matrix must be 'A' or 'B', got {matrix!r}.")
    weight = factors.A.T if matrix == "A" else factors.B  # (d, r) either way
    if not bool(weight.any()):
        raise ValueError(f"the LoRA {matrix} matrix is all zeros (an untrained adapter?): its singular vectors "
                         f"are undefined; compare the other matrix.")
    u, _, _ = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)  # (d, min(d, r))
    return u


def phi_grid(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """phi(i, j) for all i <= r_a, j <= r_b as an (r_a, r_b) float64 tensor; entry [i-1, j-1] is phi(i, j).

    ||U_a[:, :i]^T U_b[:, :j]||_F^2 is the sum of the squared overlaps M[p, q] = (u_a,p . u_b,q)^2 for p <= i,
    q <= j: a cumulative sum over both axes of M.
    """
    overlap = (u_a.T.to(torch.float64) @ u_b.to(torch.float64)).square()  # (r_a, r_b)
    cumulative = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


def chance_grid(r_a: int, r_b: int, d: int) -> torch.Tensor:
    """E[phi(i, j)] = max(i, j) / d for independent uniformly random subspaces of R^d."""
    i = torch.arange(1, r_a + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r_b + 1, dtype=torch.float64)[None, :]
    return torch.maximum(i, j) / d


def common_modules(a: dict[str, LoraFactors], b: dict[str, LoraFactors], module: str | None = None) -> list[str]:
    """Modules both adapters adapt (in a's order), optionally those whose name matches the regex ``module``.

    Raises:
        ValueError: no module in common, a bad regex, a pattern matching no common module, or a module whose
            base shape (in, out) differs between the two adapters.
    """
    names = [name for name in a if name in b]
    if not names:
        raise ValueError(f"the two adapters adapt no module in common (first adapts {_few(a)}, second {_few(b)}).")
    if module is not None:
        try:
            pattern = re.compile(module)
        except re.error as err:
            raise ValueError(f"--module {module!r} is not a valid regular expression ({err}).") from err
        names = [name for name in names if pattern.search(name)]
        if not names:
            raise ValueError(f"--module {module!r} matches none of the modules both adapters adapt: "
                             f"{_few(dict.fromkeys(n for n in a if n in b))}.")
    for name in names:
        shape_a = (a[name].A.shape[1], a[name].B.shape[0])
        shape_b = (b[name].A.shape[1], b[name].B.shape[0])
        if shape_a != shape_b:
            raise ValueError(f"{name} has base shape (in, out) = {shape_a} in the first adapter but {shape_b} in "
                             f"the second: the adapters were trained on different base models.")
    return names


def _few(names: dict[str, object], shown: int = 4) -> str:
    listed = list(names)
    more = f" and {len(listed) - shown} more" if len(listed) > shown else ""
    return ", ".join(listed[:shown]) + more


def subspace_similarity(a: AdapterSource, b: AdapterSource, matrix: str = "A",
                        module: str | None = None) -> dict[str, torch.Tensor]:
    """phi(i, j) grids (Hu et al. 2021, section 7.2) for every module both LoRA adapters adapt.

    Args:
        a, b: adapter folders or PeftModels (their active adapter).
        matrix: "A" compares the right-singular vectors of the A matrices (the input directions, the paper's
            Figure 3); "B" the left-singular vectors of the B matrices (the output directions).
        module: only modules whose name matches this regular expression (``re.search``).

    Returns:
        module name -> (r_a, r_b) float64 tensor, entry [i-1, j-1] = phi(i, j). Swapping a and b transposes it.

    Raises:
        ValueError: see :func:`common_modules`, :func:`singular_vectors` and :func:`~.adapter.load_lora`.
    """
    return similarity_grids(load_lora(a), load_lora(b), matrix, module)


def similarity_grids(factors_a: dict[str, LoraFactors], factors_b: dict[str, LoraFactors], matrix: str = "A",
                     module: str | None = None) -> dict[str, torch.Tensor]:
    """:func:`subspace_similarity` of adapters already read with :func:`~.adapter.load_lora`."""
    if matrix not in MATRICES:
        raise ValueError(f"matrix must be 'A' or 'B', got {matrix!r}.")
    grids = {}
    for name in common_modules(factors_a, factors_b, module):
        try:
            grids[name] = phi_grid(singular_vectors(factors_a[name], matrix), singular_vectors(factors_b[name], matrix))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
    return grids


def similarity_rows(grids: dict[str, torch.Tensor], dims: dict[str, int]) -> list[dict[str, object]]:
    """One CSV row per module: ranks, phi(1, 1), the means of the diagonal and the grid, and chance.

    ``chance`` is the grid mean expected of independent random subspaces of R^d (max(i, j) / d).
    """
    rows = []
    for name, grid in grids.items():
        r_a, r_b = grid.shape
        rows.append({"module": name, "r_a": r_a, "r_b": r_b, "d": dims[name], "phi_1_1": float(grid[0, 0]),
                     "diag_mean": float(grid.diagonal().mean()), "grid_mean": float(grid.mean()),
                     "chance": float(chance_grid(r_a, r_b, dims[name]).mean())})
    return rows
