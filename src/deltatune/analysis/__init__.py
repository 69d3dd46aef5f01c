"""Looking inside models and adapters (issue 12): subspace similarity and spectra of LoRA updates, intrinsic
dimension, memory estimates.

Library functions return tensors; :mod:`.report` writes the plots, CSV and JSON of ``deltatune analyze``.
matplotlib is imported only when a plot is drawn.
"""

from .adapter import LoraFactors, load_lora
from .intrinsic import Fastfood, IntrinsicModel, IntrinsicResult, find_d90, intrinsic_dimension, train_run
from .intrinsic_tasks import IntrinsicSettings
from .memory import MemoryEstimate, estimate_memory, saved_tensor_bytes
from .report import intrinsic_report, similarity_report, spectrum_report
from .similarity import chance_grid, phi_grid, similarity_grids, singular_vectors, subspace_similarity
from .spectrum import effective_rank, energy_share, spectrum, update_svdvals

__all__ = [
    "Fastfood",
    "IntrinsicModel",
    "IntrinsicResult",
    "IntrinsicSettings",
    "LoraFactors",
    "MemoryEstimate",
    "chance_grid",
    "effective_rank",
    "energy_share",
    "find_d90",
    "intrinsic_dimension",
    "intrinsic_report",
    "estimate_memory",
    "load_lora",
    "phi_grid",
    "saved_tensor_bytes",
    "similarity_grids",
    "similarity_report",
    "singular_vectors",
    "spectrum",
    "spectrum_report",
    "subspace_similarity",
    "train_run",
    "update_svdvals",
]
