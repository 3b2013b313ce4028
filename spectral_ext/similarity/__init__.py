"""Representational similarity: every measure is a Measure (measure.py:
reduce each representation once, a cross term per pair, a finish), reachable
by one name everywhere (MEASURES, the zoo's --pairs, the compat adapters).

Modules: _core (CKA with its kernels and Procrustes, the layer-by-layer
similarity matrix of two models and the zoo's batched pairwise engine),
cca (the CCA family and linear regression), shape (the generalised shape
metrics, the permutation metric, the Bures distance), rsa (RDMs and their
comparison), neighbours (k-NN measures) and baselines (ReSi's cheap
baselines)."""
from ._core import (GROUPS, KERNELS, CrossMoments, MinibatchCKA, as_channels, channel_normalize, cka,
                    grelu_assignment, hsic, kernel_matrix, layer_feature_axis, pairwise_similarity, procrustes,
                    procrustes_distance, similarity_matrix)
from .measure import MEASURES, Measure, compare, get_measure, measure_matrix, table

__all__ = ["GROUPS", "KERNELS", "MEASURES", "CrossMoments", "Measure", "MinibatchCKA", "as_channels",
           "channel_normalize", "cka", "compare", "grelu_assignment", "hsic", "kernel_matrix",
           "get_measure", "layer_feature_axis", "measure_matrix", "pairwise_similarity", "procrustes",
           "procrustes_distance", "similarity_matrix", "table"]
