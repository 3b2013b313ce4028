"""ReSi's cheap baselines (docs/references.md [klabunde2025resi]; code:
repsim/measures/eigenspace_overlap.py and statistics.py): the eigenspace
overlap score of May et al. [may2019] and two descriptive statistics
compared by their absolute difference (the survey's "descriptive statistics"
family, [klabunde2025survey] Section 3.6). Each reduces a representation to
a basis or a number, so the K x K is one product or one broadcast. None of
them centres the features (as ReSi), so none is invariant to translation.
"""
from __future__ import annotations

import torch

from .measure import Measure, register

_EPS = torch.finfo(torch.float64).eps


@register
class EigenspaceOverlap(Measure):
    """Eigenspace overlap score (May, Zhang, Dao, Re 2019, docs/references.md
    [may2019] Section 3; as ReSi's ``eigenspace_overlap_score``,
    [klabunde2025resi]): ||U_X^T U_Y||_F^2 / max(D_X, D_Y), where U_X (N, r_X)
    holds the left singular vectors of the uncentred X (N, D_X) with singular
    values above numpy's matrix_rank tolerance s_max * max(N, D_X) * eps, so
    r_X is X's numerical rank. Normalised by the feature counts D (not the
    ranks), as ReSi: in [0, 1], equal to min(r_X, r_Y) / max(D_X, D_Y) when
    one column space holds the other, so it is 1 for identical inputs only
    when X has full column rank (rank D <= N); an all-zero X has r = 0 and
    overlap 0. Symmetric. Invariant to invertible linear maps of the features
    (they keep the column space and D), hence to orthogonal transforms and
    scaling; not to translation (no centring)."""

    name = "eigenspace_overlap"
    kind = "similarity"
    invariances = "invertible linear transforms (incl. orthogonal, scaling) of the features (not translation)"
    reference = "may2019"
    cost = "O(N D min(N, D)) per representation, O(N D^2) per pair"
    min_samples = 1

    def reduce(self, X: torch.Tensor):
        n, d = X.shape
        U, s, _ = torch.linalg.svd(X, full_matrices=False)
        tol = s.max() * max(n, d) * _EPS if len(s) else 0.0
        rank = int((s > tol).sum())
        return U[:, :rank].contiguous(), d

    def footprint(self, n: int, d: int) -> int:
        return 8 * n * min(n, d)

    def pair(self, a, b) -> float:
        (Ua, da), (Ub, db) = a, b
        return float((Ua.T @ Ub).square().sum() / max(da, db))

    def matrix(self, reduced: list) -> torch.Tensor:
        K = len(reduced)
        bases = [U for U, _ in reduced]
        dims = torch.tensor([d for _, d in reduced], dtype=torch.float64)
        ranks = torch.tensor([U.shape[1] for U in bases])
        owner = torch.repeat_interleave(torch.arange(K), ranks)  # which representation each column is
        out = torch.zeros(K, K, dtype=torch.float64)
        if int(ranks.sum()) == 0:
            return out
        stacked = torch.cat(bases, 1)
        offsets = torch.cumsum(ranks, 0) - ranks
        for a in range(K):  # one product per row block: the pairs (a, b >= a)
            if ranks[a] == 0:
                continue
            start = int(offsets[a])
            sq = (bases[a].T @ stacked[:, start:]).square().sum(0)
            out[a].index_add_(0, owner[start:], sq)
        out = torch.triu(out) + torch.triu(out, 1).T
        return out / torch.maximum(dims[:, None], dims[None, :])


class _Statistic(Measure):
    kind = "distance"
    min_samples = 1
    cost = "O(N D)"

    def pair(self, a, b) -> float:
        return abs(float(a) - float(b))

    def footprint(self, n: int, d: int) -> int:
        return 8

    def matrix(self, reduced: list) -> torch.Tensor:
        v = torch.tensor([float(r) for r in reduced], dtype=torch.float64)
        return (v[:, None] - v[None, :]).abs()


@register
class MagnitudeDifference(_Statistic):
    """Magnitude difference (docs/references.md [klabunde2025resi], ReSi's
    ``magnitude_difference``; the survey's magnitude statistic,
    [klabunde2025survey] Section 3.6): |‖mean_i x_i‖_2 - ‖mean_i y_i‖_2|, the
    difference of the Euclidean norms of the two mean vectors, unnormalised
    (as ReSi's code), in the units of the features. A distance: 0 for
    identical inputs (and for any two with equally long mean vectors: a weak
    baseline), symmetric, >= 0. Invariant to orthogonal transforms and
    permutations of the features and of the inputs; not to scaling or
    translation."""

    name = "magnitude_difference"
    invariances = "orthogonal transforms, permutation of features or inputs (not scaling, not translation)"
    reference = "klabunde2025resi"

    def reduce(self, X: torch.Tensor) -> float:
        return float(X.mean(0).norm())


@register
class ConcentricityDifference(_Statistic):
    """Concentricity difference (docs/references.md [klabunde2025resi], ReSi's
    ``concentricity_difference``; [klabunde2025survey] Section 3.6):
    |mean_i cos(x_i, x_mean) - mean_i cos(y_i, y_mean)|, the difference of the
    mean cosine similarities of the inputs to their mean vector. A zero row
    or a zero mean vector has cosine 0 (sklearn's rule, which ReSi's
    pairwise_distances(metric="cosine") follows). A distance in [0, 2]: 0 for
    identical inputs (and whenever the two mean concentricities agree: a weak
    baseline), symmetric. Invariant to orthogonal transforms, nonzero scaling
    and permutations of the features or the inputs; not to translation."""

    name = "concentricity_difference"
    invariances = "orthogonal transforms, nonzero scaling, permutation of features or inputs (not translation)"
    reference = "klabunde2025resi"

    def reduce(self, X: torch.Tensor) -> float:
        m = X.mean(0)
        m_norm = m.norm()
        norms = X.norm(dim=1)
        if m_norm == 0:
            return 0.0
        cos = (X @ m) / torch.where(norms > 0, norms, 1.0) / m_norm
        return float(cos.clamp(-1.0, 1.0).mean())  # clipped as sklearn's cosine distances
