"""Neighbourhood measures: how far the k nearest neighbours of each input agree
between two representations (the survey's neighbourhood-based family,
docs/references.md [klabunde2025survey] Section 3.4, as benchmarked by ReSi
[klabunde2025resi], and the mutual k-NN alignment of [huh2024]).

Conventions shared by the three measures:

* neighbours by cosine similarity (ReSi's default ``inner="cosine"``; Huh et
  al. L2-normalise the features and rank by inner product, the same order);
  a zero row is normalised to the zero vector (sklearn's and
  torch.nn.functional.normalize's rule), so its cosine with every row is 0;
* each input's own row is never its neighbour (the diagonal of the
  similarity is set to -inf; ReSi drops the first of k + 1 neighbours, which
  is the input itself unless it has an exact duplicate);
* ties: among equal similarities the lower index is the nearer neighbour
  (rows whose k-th and (k+1)-th similarities are equal are re-ranked by a
  stable sort); only exact ties in the computed float64 similarities count;
* k must be smaller than N (a clear ValueError names both).

The reduction of one representation is its (N, k) neighbour index set (and,
for second_order_cosine, its L2-normalised rows); the K x K compares the
index sets of all K representations at once per block of inputs, one
(rows, K k, K k) equality test instead of a loop over pairs.
"""
from __future__ import annotations

import torch

from .measure import Measure, check_choice, check_positive, register

#: elements of one block of an N x N similarity (32 MiB in float64): large N is done in row blocks.
_BLOCK = 1 << 22


def _normalised(X: torch.Tensor) -> torch.Tensor:
    """Rows of X scaled to unit length; zero rows stay zero."""
    norms = X.norm(dim=1, keepdim=True)
    return X / torch.where(norms > 0, norms, torch.ones_like(norms))


def _check_k(k: int, n: int) -> None:
    if k >= n:
        raise ValueError(f"k = {k} neighbours need more inputs than k (each input's own row is excluded), "
                         f"got N = {n}")


def _gram(Z: torch.Tensor) -> torch.Tensor:
    """Z Z^T, symmetric: numpy's matmul of an array with its own transpose is
    one BLAS syrk (half the products of a general matrix product)."""
    Zn = Z.numpy()
    return torch.from_numpy(Zn @ Zn.T)


def knn_indices(X: torch.Tensor, k: int, metric: str = "cosine", with_values: bool = False):
    """The (N, k) int64 indices of each row's k nearest other rows of X (N, D):
    by cosine similarity or by Euclidean distance; the row itself excluded;
    exact ties broken towards the lower index. with_values: also the (N, k)
    similarities (minus squared distances) at those neighbours."""
    n = X.shape[0]
    _check_k(k, n)
    Z = _normalised(X) if metric == "cosine" else X.contiguous()
    sq = (X * X).sum(1) if metric == "euclidean" else None
    out = torch.empty(n, k, dtype=torch.int64)
    out_vals = torch.empty(n, k, dtype=torch.float64)
    whole = n * n <= 4 * _BLOCK  # the N x N at once (one syrk), else blocks of rows
    rows = n if whole else max(1, _BLOCK // n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        S = _gram(Z) if whole else Z[start:stop] @ Z.T
        if metric == "euclidean":  # minus the squared distance: larger = nearer
            S = (2.0 * S - sq[start:stop, None] - sq[None, :]).clamp_(max=0.0)
        r = torch.arange(stop - start)
        S[r, r + start] = -torch.inf
        vals, idx = S.topk(k + 1, dim=1)
        tied = (vals[:, k - 1] == vals[:, k]).nonzero().flatten()
        if len(tied):  # a tie across the k-th place: the lower indices go in
            ranked = torch.sort(S[tied], dim=1, descending=True, stable=True)
            idx[tied], vals[tied] = ranked.indices[:, :k + 1], ranked.values[:, :k + 1]
        out[start:stop], out_vals[start:stop] = idx[:, :k], vals[:, :k]
    return (out, out_vals) if with_values else out


def _blocks(n: int, per_row: int):
    rows = max(1, _BLOCK // max(1, per_row))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _membership(E: torch.Tensor, K: int, k: int) -> torch.Tensor:
    """E (rows, K, k) neighbour indices -> (rows, K, k, K) bool: is the p-th
    neighbour of the input in representation a also among its neighbours in b."""
    rows = E.shape[0]
    flat = E.reshape(rows, K * k)
    eq = flat[:, :, None] == flat[:, None, :]
    return eq.view(rows, K, k, K, k).any(-1)


def intersections(idx: list[torch.Tensor]) -> torch.Tensor:
    """(N, K, K) int64: |kNN_a(i) & kNN_b(i)| for every input i and pair (a, b)
    of K (N, k) index sets (each row's indices distinct)."""
    K = len(idx)
    n, k = idx[0].shape
    E = torch.stack(idx, 1)
    out = torch.empty(n, K, K, dtype=torch.int64)
    for start, stop in _blocks(n, (K * k) ** 2 // 4):
        out[start:stop] = _membership(E[start:stop], K, k).sum(2)
    return out


class _KNNSets(Measure):
    kind = "similarity"
    invariances = "orthogonal transforms, isotropic scaling, permutation of features (not translation)"
    cost = "O(N^2 D) per representation, O(N k^2) per pair"
    min_samples = 2

    def __init__(self, k: int = 10, metric: str = "cosine"):
        self.k = check_positive("k", k, integer=True)
        self.metric = check_choice("metric", metric, ("cosine", "euclidean"))

    def reduce(self, X: torch.Tensor) -> torch.Tensor:
        return knn_indices(X, self.k, self.metric)

    def footprint(self, n: int, d: int) -> int:
        return 8 * n * self.k

    def _finish(self, common: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def matrix(self, reduced: list) -> torch.Tensor:
        return self._finish(intersections(list(reduced)).to(torch.float64))

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float(self.matrix([a, b])[0, 1])


@register
class MutualKNN(_KNNSets):
    """Mutual k-NN alignment (docs/references.md [huh2024], Section 2 and
    Appendix A, code: platonic-rep metrics.py ``mutual_knn``): the mean over
    the N inputs of |kNN_X(i) & kNN_Y(i)| / k, with each input's k nearest
    other inputs by cosine similarity (Huh et al. L2-normalise the features
    and rank by inner product, excluding the input itself; their outlier
    clamping of the features is preprocessing, not done here). Options: k
    (default 10, k < N), metric ("cosine"; "euclidean" ranks by Euclidean
    distance, which adds translation invariance). In [0, 1], 1 for identical
    neighbourhoods, symmetric. Invariant
    to orthogonal transforms, isotropic scaling and feature permutations (any
    map that keeps the cosine order); not to translation."""

    name = "mutual_knn"
    reference = "huh2024"

    def _finish(self, common):
        return common.mean(0) / self.k


@register
class KNNJaccard(_KNNSets):
    """Jaccard similarity of the k-NN sets (docs/references.md
    [klabunde2025resi] Appendix on measures, and [klabunde2025survey] Section
    3.4; code: ReSi repsim/measures/nearest_neighbor.py ``jaccard_similarity``):
    the mean over the N inputs of |kNN_X(i) & kNN_Y(i)| / |kNN_X(i) | kNN_Y(i)|,
    neighbours by cosine similarity as ReSi's default (``metric="euclidean"``
    for Euclidean distance, which adds translation invariance), the input
    itself excluded. Options: k (default 10, k < N), metric. In [0, 1], 1 for
    identical neighbourhoods, symmetric. Invariant to orthogonal transforms,
    isotropic scaling and feature permutations; not to translation (cosine)."""

    name = "knn_jaccard"
    reference = "klabunde2025resi"

    def _finish(self, common):
        return (common / (2 * self.k - common)).mean(0)


@register
class SecondOrderCosine(Measure):
    """Second-order cosine similarity (Hamilton, Leskovec, Jurafsky 2016, as
    defined in docs/references.md [klabunde2025survey] Section 3.4 and
    benchmarked by [klabunde2025resi]; code: ReSi
    repsim/measures/nearest_neighbor.py ``second_order_cosine_similarity``):
    for each input i, U_i = kNN_X(i) | kNN_Y(i) (cosine neighbours, i itself
    excluded), and the cosine of the vectors (s_X(i, j))_{j in U_i} and
    (s_Y(i, j))_{j in U_i}; the mean over the N inputs. ``values="similarities"``
    (default, the survey's and Hamilton et al.'s definition) uses the cosine
    similarities s = cos(x_i, x_j); ``values="distances"`` uses the cosine
    distances 1 - cos clipped to [0, 2], which is what ReSi's code computes
    (sklearn pairwise_distances(metric="cosine")) and gives its numbers. Where
    an input's vector of values is all zero (zero rows, or neighbours all
    orthogonal to it; ReSi's scipy cosine gives NaN there), its cosine is 1 if
    the other vector is all zero too (they are equal) and 0 otherwise. Options: k
    (default 10, k < N), values. In [-1, 1] ([0, 1] with distances), 1 for
    identical inputs, symmetric. Invariant to orthogonal transforms, isotropic
    scaling and feature permutations; not to translation."""

    name = "second_order_cosine"
    kind = "similarity"
    invariances = "orthogonal transforms, isotropic scaling, permutation of features (not translation)"
    reference = "klabunde2025resi"
    cost = "O(N^2 D) per representation, O(N k (k + D)) per pair"
    min_samples = 2

    def __init__(self, k: int = 10, values: str = "similarities"):
        self.k = check_positive("k", k, integer=True)
        self.values = check_choice("values", values, ("similarities", "distances"))

    def reduce(self, X: torch.Tensor):
        idx, sims = knn_indices(X, self.k, "cosine", with_values=True)
        return _normalised(X), idx, sims

    def footprint(self, n: int, d: int) -> int:
        return 8 * n * (d + self.k)

    def pair(self, a, b) -> float:
        return float(self.matrix([a, b])[0, 1])

    def matrix(self, reduced: list) -> torch.Tensor:
        Zs = [r[0] for r in reduced]
        E = torch.stack([r[1] for r in reduced], 1)  # (N, K, k)
        own_sims = torch.stack([r[2] for r in reduced], 1)  # (N, K, k): s_a at a's own neighbours
        n, K, k = E.shape
        d = max(z.shape[1] for z in Zs)
        # the similarities s_b(i, j) at every representation's neighbours j of i:
        # gathered rows (K k D per input) when that is cheaper than the N x N block
        gather = 8 * K * k < n
        total = torch.zeros(K, K, dtype=torch.float64)
        # gathered blocks small enough to stay in cache (a fresh 100 MB block costs its page faults)
        per_row = max((K * k) ** 2 // 4, K * K * k * 2, 16 * K * k * d if gather else n)
        for start, stop in _blocks(n, per_row):
            rows = stop - start
            Eb = E[start:stop].reshape(rows, K * k)
            V = torch.empty(rows, K, k, K, dtype=torch.float64)
            for b, Z in enumerate(Zs):
                if gather:  # b's similarities at the other representations' neighbours; its own are known
                    others = [a for a in range(K) if a != b]
                    Eo = E[start:stop, others]
                    V[:, others, :, b] = (Z[Eo] * Z[start:stop, None, None, :]).sum(-1)
                    V[:, b, :, b] = own_sims[start:stop, b]
                else:
                    V[:, :, :, b] = (Z[start:stop] @ Z.T).gather(1, Eb).view(rows, K, k)
            if self.values == "distances":
                V = (1.0 - V).clamp_(0.0, 2.0)
            inside = _membership(E[start:stop], K, k)  # (rows, K, k, K)
            own = torch.diagonal(V, dim1=1, dim2=3).permute(0, 2, 1)  # own[i, a, p] = V[i, a, p, a]
            # the union counted from both sides: each common neighbour at half weight per side
            half = own[..., None] * V * (1.0 - 0.5 * inside)
            T = half.sum(2)
            dot = T + T.transpose(1, 2)
            self_sq = (own * own).sum(2)  # (rows, K)
            extra = ((V * V) * (~inside)).sum(2)  # extra[i, a, b]: b's values at a's neighbours outside b's set
            na = self_sq[:, :, None] + extra.transpose(1, 2)
            nb = self_sq[:, None, :] + extra
            denom = (na * nb).sqrt()
            # a zero vector: cosine 1 with another zero vector (they are equal), else 0
            degenerate = ((na == 0) & (nb == 0)).to(torch.float64)
            total += torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), degenerate).sum(0)
        out = total / n
        return (out + out.T) / 2
