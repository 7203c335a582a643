"""Pruning: global magnitude pruning, fine-tuning, sparse export."""
from components.prune.unstructured import (apply_global_magnitude, load_sparse, make_permanent, prunable_parameters,
                                           save_sparse, sparsity_report)

__all__ = ["apply_global_magnitude", "load_sparse", "make_permanent", "prunable_parameters", "save_sparse",
           "sparsity_report"]
