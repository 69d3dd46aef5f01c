"""Looking inside trained adapters: subspace similarity and spectra of LoRA updates (issue 12).

Library functions return tensors; :mod:`.report` writes the plots, CSV and JSON of ``deltatune analyze``.
matplotlib is imported only when a plot is drawn.
"""

from .adapter import LoraFactors, load_lora
from .report import similarity_report, spectrum_report
from .similarity import chance_grid, phi_grid, similarity_grids, singular_vectors, subspace_similarity
from .spectrum import effective_rank, energy_share, spectrum, update_svdvals

__all__ = [
    "LoraFactors",
    "chance_grid",
    "effective_rank",
    "energy_share",
    "load_lora",
    "phi_grid",
    "similarity_grids",
    "similarity_report",
    "singular_vectors",
    "spectrum",
    "spectrum_report",
    "subspace_similarity",
    "update_svdvals",
]
