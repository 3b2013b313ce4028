"""Representational similarity: every measure is a Measure (measure.py:
reduce each representation once, a cross term per pair, a finish), reachable
by one name everywhere (MEASURES, the zoo's --pairs, the compat adapters).

Modules: _layout (feature axes and layouts), _hsic (CKA: kernels, HSIC,
MinibatchCKA), _procrustes (the Procrustes measures), _matrix (the
layer-by-layer similarity matrix of two models), _pairwise (the zoo's
batched pairwise engine and its memory planner), cca (the CCA family and
linear regression), shape (the generalised shape metrics, the permutation
metric, the Bures distance), rsa (RDMs and their comparison), neighbours
(k-NN measures) and baselines (ReSi's cheap baselines)."""
from ._hsic import KERNELS, MinibatchCKA, cka, hsic, kernel_matrix
from ._layout import as_channels, channel_normalize, layer_feature_axis
from ._matrix import SimilarityMatrix, similarity_matrix
from ._pairwise import PairwiseSimilarity, pairwise_similarity
from ._procrustes import GROUPS, CrossMoments, grelu_assignment, procrustes, procrustes_distance
from .measure import MEASURES, Measure, MeasureMatrix, compare, get_measure, measure_matrix, table

__all__ = ["GROUPS", "KERNELS", "MEASURES", "CrossMoments", "Measure", "MeasureMatrix", "MinibatchCKA",
           "PairwiseSimilarity", "SimilarityMatrix", "as_channels",
           "channel_normalize", "cka", "compare", "grelu_assignment", "hsic", "kernel_matrix",
           "get_measure", "layer_feature_axis", "measure_matrix", "pairwise_similarity", "procrustes",
           "procrustes_distance", "similarity_matrix", "table"]
