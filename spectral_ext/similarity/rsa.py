"""Representational similarity analysis: representational dissimilarity
matrices (RDMs) and their comparison (Kriegeskorte et al. 2008,
docs/references.md [kriegeskorte2008]), with rsatoolbox 0.3.2's conventions
(compat/rsatoolbox.py is the drop-in for its calc_rdm and compare), and the
norm of the difference of two representational similarity matrices
(Klabunde et al. 2023 [klabunde2023], section 4).

An RDM holds N(N-1)/2 entries: it is O(N^2) memory per representation (N =
1000: 499,500 float64, 4 MB; N = 10,000: 400 MB), so measure_matrix over K
representations keeps K of them."""
from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

from .._linalg import _matmul
from .measure import Measure, check_choice, register, representation

RDM_METRICS = ("euclidean", "correlation", "cosine")
COMPARE = ("spearman", "pearson", "kendall_tau_a", "cosine")
RSMS = ("linear", "euclidean")

# A pattern whose centred (correlation) or raw (cosine) norm is below this
# fraction of its raw norm is constant up to rounding: its distance is undefined.
_FLAT = 1e-13


# ---------------------------------------------------------------------------------------------
# RDMs


@functools.lru_cache(maxsize=4)
def _triu_index(n: int) -> torch.Tensor:
    """Flat indices of the strict upper triangle of an n x n matrix, row by row
    (scipy's squareform and rsatoolbox's order)."""
    i, j = torch.triu_indices(n, n, 1)
    return i * n + j


def _rdm_one(X: torch.Tensor, metric: str, raise_on_flat: str | None = None, scaled: bool = True) -> torch.Tensor:
    """The RDM of X (N, D) float64 as its N(N-1)/2 upper triangle, computed as
    rsatoolbox 0.3.2 computes it (one Gram product; one representation at a
    time, so the N x N stays in cache). raise_on_flat: None lets a constant
    pattern give NaN (rsatoolbox's behaviour, with numpy's warning); a name
    raises a ValueError naming it. scaled=False leaves out the euclidean
    RDM's division by D (for comparisons that ignore a positive scale)."""
    n, d = X.shape
    idx = _triu_index(n)
    if metric == "euclidean":
        sq = (X * X).sum(1)
        # (|x_i|^2 + |x_j|^2) - 2 x_i.x_j rounded as rsatoolbox's numpy expression; the Gram by _matmul
        # (numpy's syrk for X X^T where OpenBLAS is the faster BLAS); addmm with an N x N input was 3x slower
        full = torch.add(sq[:, None], sq[None, :]).sub_(_matmul(X, X.T), alpha=2)
        v = full.view(-1).index_select(0, idx)
        return v.div_(d) if scaled else v
    Z = X - X.mean(1, keepdim=True) if metric == "correlation" else X
    norms = torch.linalg.vector_norm(Z, dim=1)
    flat = norms <= _FLAT * torch.linalg.vector_norm(X, dim=1) if raise_on_flat else norms == 0
    if bool(flat.any()):
        if raise_on_flat:
            rows = flat.nonzero()[:, 0].tolist()
            what = "zero variance across its features" if metric == "correlation" else "zero norm"
            raise ValueError(f"{raise_on_flat}: input pattern(s) (rows) {rows[:10]} have {what}, so the "
                             f"{metric} distance is undefined; use rdm_metric='euclidean' or drop them")
        warnings.warn("invalid value encountered in divide", RuntimeWarning, stacklevel=3)
    Z = Z / norms[:, None]
    return (Z @ Z.T).view(-1).index_select(0, idx).neg_().add_(1)


def rdm(X, metric: str = "euclidean") -> torch.Tensor:
    """The representational dissimilarity matrix of X ((N, ...) tensor or
    array, flattened per input to (N, D)), as its strict upper triangle row by
    row (scipy's squareform order), float64 of length N(N-1)/2: O(N^2) memory.

    Conventions as rsatoolbox 0.3.2's calc_rdm: "euclidean" is the squared
    Euclidean distance divided by D (||x_i - x_j||^2 / D, from the Gram
    matrix, clamped at 0 where rounding gives a tiny negative); "correlation"
    is 1 - the Pearson correlation of the two patterns across features;
    "cosine" (not in rsatoolbox's calc_rdm; scipy's pdist "cosine") is 1 - the
    cosine of the two patterns. A constant pattern (correlation) or a zero
    pattern (cosine) raises a ValueError naming its row."""
    check_choice("metric", metric, RDM_METRICS)
    X = representation("X", X, 2)
    out = _rdm_one(X, metric, raise_on_flat="X")
    return out.clamp_min_(0) if metric == "euclidean" else out


# ---------------------------------------------------------------------------------------------
# ranks and Kendall's tau


def _sort(v: torch.Tensor):
    """(sorted keys, order) of float64 v (no NaN): keys are int64 with the
    same order and ties as v (equal keys for equal values). torch sorts 1-D
    integers by radix, int32 2x faster than int64 and int64 4x faster than
    float64 here, so v is sorted by a 31-bit key (the top bits of key - min key)
    and the few runs that share one (about 260 of an RDM's 499,500 entries)
    are sorted again by the full key: 6.6 ms against 8.4 ms for the int64
    sort (a float32 key crowded more values into shared keys on RDMs)."""
    key = (v + 0.0).view(torch.int64)  # + 0.0 makes -0.0 into +0.0 (equal floats, equal keys)
    if key.numel() < 2:  # aminmax refuses an empty vector
        return key, torch.arange(key.numel())
    lo, hi = (int(x) for x in torch.aminmax(key))
    if lo < 0:  # negative floats: flip their magnitude bits so the int64 order is the float order
        key = torch.where(key < 0, key ^ 0x7FFFFFFFFFFFFFFF, key)
        lo, hi = (int(x) for x in torch.aminmax(key))
    shift = max(0, (hi - lo).bit_length() - 30)
    # shifted before the subtraction: key - lo can overflow int64; the result is below 2^31
    coarse, order = torch.sort(((key >> shift) - (lo >> shift)).to(torch.int32))
    full = key.index_select(0, order)
    if shift:
        run = (coarse[1:] == coarse[:-1]).nonzero().flatten()
        if run.numel() > v.numel() // 64:  # many ties or a crowded key: one sort by the full key
            full, order = torch.sort(key)
        elif run.numel():
            # every member of a shared key's run: sorted by the full key, they keep the runs' order
            P = torch.cat([run, run + 1]).unique()
            full[P], o = torch.sort(full.index_select(0, P))
            order[P] = order.index_select(0, P).index_select(0, o)
    return full, order


def _sorted_ranks(v: torch.Tensor):
    """(order, ranks of the sorted values, tied): v[order] is sorted and
    ranks_sorted[i] the average rank (1..M, scipy.stats.rankdata's) of
    v[order[i]]; ranks_sorted is None when no two values tie."""
    keys, order = _sort(v)
    m = v.numel()
    new = torch.ones(m, dtype=torch.bool)
    torch.ne(keys[1:], keys[:-1], out=new[1:])  # on the keys: no gather of the values
    if bool(new.all()):
        return order, None
    pos = torch.arange(m, dtype=torch.float64)
    # a tie group spans [first, last] of the sorted values: its rank is (first + last) / 2 + 1
    first = torch.where(new, pos, torch.zeros_like(pos)).cummax(0).values
    end = torch.ones(m, dtype=torch.bool)
    end[:-1] = new[1:]
    last = torch.where(end, pos, torch.full_like(pos, m)).flip(0).cummin(0).values.flip(0)
    return order, (first + last) / 2 + 1


def _average_ranks(V: torch.Tensor) -> torch.Tensor:
    """Ranks 1..M along the last axis of V (K, M), ties given their average
    rank (scipy.stats.rankdata's default), float64."""
    out = torch.empty(V.shape, dtype=torch.float64)
    for k in range(V.shape[0]):
        order, ranks = _sorted_ranks(V[k])
        if ranks is None:
            ranks = torch.arange(1, V.shape[1] + 1, dtype=torch.float64)
        out[k].scatter_(0, order, ranks)
    return out


@functools.lru_cache(maxsize=4)
def _unit_ranks(m: int) -> torch.Tensor:
    """The ranks 1..m centred and normalised (Spearman's reduction without ties)."""
    r = torch.arange(1, m + 1, dtype=torch.float64) - (m + 1) / 2
    return r / math.sqrt(m * (m * m - 1) / 12)


def _spearman_unit(v: torch.Tensor) -> torch.Tensor | None:
    """v's average ranks centred and normalised; None when v is constant."""
    m = v.numel()
    order, ranks = _sorted_ranks(v)
    if ranks is None:
        return torch.empty(m, dtype=torch.float64).scatter_(0, order, _unit_ranks(m))
    ranks = ranks - (m + 1) / 2  # the mean of average ranks is always (m + 1) / 2
    norm = torch.linalg.vector_norm(ranks)
    if not norm > 0:
        return None
    return torch.empty(m, dtype=torch.float64).scatter_(0, order, ranks / norm)


try:  # scipy's Fenwick-tree count of discordant pairs (the one rsatoolbox and kendalltau use)
    from scipy.stats._stats import _kendall_dis
except ImportError:  # pragma: no cover - a scipy without it: tau-b gives con - dis back
    _kendall_dis = None


class _Tau:
    """One vector's reduction for Kendall's tau: its order (stable sort), its
    dense ranks 1..R and the number of tied pairs."""

    def __init__(self, v: np.ndarray):
        self.v = v
        self.size = v.size
        self.order = np.argsort(v, kind="mergesort")
        s = v[self.order]
        step = np.r_[True, s[1:] != s[:-1]]
        dense_sorted = step.cumsum(dtype=np.intp)
        self.dense = np.empty(v.size, np.intp)
        self.dense[self.order] = dense_sorted
        self.dense_sorted = dense_sorted
        cnt = np.diff(np.r_[np.nonzero(step)[0], v.size]).astype(np.int64)
        self.ties = int((cnt * (cnt - 1) // 2).sum())


def _con_minus_dis(a: _Tau, b: _Tau) -> int:
    """Concordant minus discordant pairs of a and b (ties in either count in
    neither), exactly, in O(M log M) from the reductions."""
    tot = a.size * (a.size - 1) // 2
    if a.ties == tot or b.ties == tot:
        return 0
    x = a.dense_sorted
    y = b.dense[a.order]
    if _kendall_dis is None:  # pragma: no cover
        from scipy.stats import kendalltau
        tau_b = kendalltau(a.v, b.v).statistic
        return int(round(tau_b * math.sqrt(tot - a.ties) * math.sqrt(tot - b.ties)))
    dis = int(_kendall_dis(x, y))
    joint = 0
    if a.ties and b.ties:  # pairs tied in both
        key = np.sort(x.astype(np.int64) * (int(y.max()) + 1) + y)
        step = np.r_[True, key[1:] != key[:-1], True]
        cnt = np.diff(np.nonzero(step)[0]).astype(np.int64)
        joint = int((cnt * (cnt - 1) // 2).sum())
    return tot - a.ties - b.ties + joint - 2 * dis


def _tau(a: _Tau, b: _Tau, variant: str = "a") -> float:
    """Kendall's tau-a ((con - dis) / (M(M-1)/2): ties count as neither) or
    tau-b (scipy.stats.kendalltau's, NaN when either vector is constant),
    clipped to [-1, 1] as scipy and rsatoolbox do."""
    tot = a.size * (a.size - 1) // 2
    if variant == "b" and (a.ties == tot or b.ties == tot):
        return math.nan
    cmd = _con_minus_dis(a, b)
    tau = cmd / tot if variant == "a" else cmd / math.sqrt(tot - a.ties) / math.sqrt(tot - b.ties)
    return min(1.0, max(-1.0, tau))


# ---------------------------------------------------------------------------------------------
# measures


@register
class RSA(Measure):
    """Representational similarity analysis (Kriegeskorte et al. 2008
    [kriegeskorte2008]; Klabunde et al. 2023 [klabunde2023], section
    4): the RDM of each representation (see ``rdm``: rdm_metric
    "correlation", 1 - Pearson correlation of the input patterns, the
    default as in Kriegeskorte et al. and ReSi; "euclidean", rsatoolbox's
    squared Euclidean distance / D; "cosine", 1 - cosine), compared by
    ``compare`` as rsatoolbox.rdm.compare names the statistics: "spearman"
    (default; Pearson correlation of average ranks, rsatoolbox's
    "spearman"), "pearson" (rsatoolbox's "corr"), "kendall_tau_a"
    (rsatoolbox's "tau-a": (concordant - discordant) / (M(M-1)/2) over the
    M = N(N-1)/2 entries, tied pairs counting as neither) or "cosine". Each
    RDM is reduced once (ranked, centred and normalised, so a pair is one
    dot product and the K x K one matmul; for tau-a its sort order and
    dense ranks, a pair O(M log M)). Memory O(N^2) per representation. A
    constant input pattern under the correlation RDM, a zero pattern under
    the cosine RDM, or a constant RDM (all inputs equidistant) raises a
    ValueError: the value is undefined there (rsatoolbox gives NaN or 0).
    Invariances: those of the RDM up to a positive scale (rank-based
    comparisons: up to any increasing map): euclidean RDM, orthogonal maps,
    isotropic scaling and translation of the features; cosine RDM,
    orthogonal maps and isotropic or per-input scaling; correlation RDM,
    isotropic or per-input scaling, per-input shifts and the orthogonal
    maps that fix the all-ones vector (feature permutations among them),
    not general orthogonal maps."""

    name = "rsa"
    kind = "similarity"
    invariances = ("isotropic scaling; feature permutations (correlation RDM, default), orthogonal maps "
                   "(euclidean/cosine RDM), translation (euclidean RDM)")
    reference = "kriegeskorte2008"
    cost = "O(N^2 D + N^2 log N)"
    min_samples = 3

    def __init__(self, rdm_metric: str = "correlation", compare: str = "spearman"):
        self.rdm_metric = check_choice("rdm_metric", rdm_metric, RDM_METRICS)
        self.compare = check_choice("compare", compare, COMPARE)

    def footprint(self, n: int, d: int) -> int:
        m = n * (n - 1) // 2
        return 8 * m * (4 if self.compare == "kendall_tau_a" else 1)  # tau-a: values, order, two rank arrays

    def reduce(self, X: torch.Tensor):
        # every comparison here ignores a positive scale: the euclidean RDM's 1/D is left out
        v = _rdm_one(X, self.rdm_metric, raise_on_flat="a representation", scaled=False)
        if self.compare == "kendall_tau_a":
            t = _Tau(v.numpy())
            if t.ties == t.size * (t.size - 1) // 2:
                raise ValueError("rsa: a representation has a constant RDM (all inputs equidistant); "
                                 "its rank correlation is undefined")
            return t
        if self.compare == "spearman":
            v = _spearman_unit(v)
            if v is None:
                raise ValueError("rsa: a representation has a constant RDM (all inputs equidistant or identical); "
                                 "its spearman comparison is undefined")
            return v
        if self.compare == "pearson":
            v = v - v.mean()
        norm = torch.linalg.vector_norm(v)
        if not norm > 0:
            raise ValueError(f"rsa: a representation has a constant RDM (all inputs equidistant or identical); "
                             f"its {self.compare} comparison is undefined")
        return v / norm

    def pair(self, a, b) -> float:
        if self.compare == "kendall_tau_a":
            return _tau(a, b, "a")
        return float(torch.dot(a, b).clamp(-1, 1))

    def matrix(self, reduced: list) -> torch.Tensor:
        if self.compare == "kendall_tau_a":
            return super().matrix(reduced)
        # the Gram of the stacked unit RDMs, stacked a block of entries at a time (in cache)
        k, m = len(reduced), reduced[0].numel()
        G = torch.zeros(k, k, dtype=torch.float64)
        step = max(1, (1 << 21) // k)
        for start in range(0, m, step):
            block = torch.stack([r[start:start + step] for r in reduced])
            G += _matmul(block, block.T)  # numpy's syrk where OpenBLAS is faster: half the flops of addmm
        return G.clamp_(-1, 1)


@register
class RSMNormDifference(Measure):
    """The norm of the difference of two representational similarity
    matrices (Klabunde et al. 2023 [klabunde2023], section 4, "RSM norm
    difference"; with the linear kernel it is Yin and Shen's 2018 PIP loss):
    ||S_X - S_Y||_F over the full N x N matrices, a distance (0 for equal
    RSMs). rsm "linear" (default): S = X X^T, uncentred, unnormalised (so
    it scales with the representations' size); "euclidean": S_ij = ||x_i -
    x_j||, the Euclidean distance matrix as in ReSi's rsm_norm_diff (whose
    code takes numpy's ord=2 norm of the N x N matrix, i.e. its largest
    singular value; we take the Frobenius norm the survey writes, which is
    sqrt(2) times the 2-norm of the pdist vectors of ReSi's earlier code).
    The reduction is the RSM (O(N^2) memory); the K x K uses one matmul of
    the stacked RSMs and redoes by subtraction each pair whose value the
    expansion ||S||^2 + ||S'||^2 - 2<S, S'> cannot resolve. Invariances:
    orthogonal maps of the features (both); translation too (euclidean)."""

    name = "rsm_norm_difference"
    kind = "distance"
    invariances = "orthogonal maps; translation (rsm='euclidean')"
    reference = "klabunde2023"
    cost = "O(N^2 D)"
    min_samples = 2

    def __init__(self, rsm: str = "linear"):
        self.rsm = check_choice("rsm", rsm, RSMS)

    def footprint(self, n: int, d: int) -> int:
        return 8 * n * n

    def reduce(self, X: torch.Tensor) -> torch.Tensor:
        if self.rsm == "linear":
            return X @ X.T
        # the direct differences: exact 0 for equal inputs, no Gram cancellation
        return torch.cdist(X, X, compute_mode="donot_use_mm_for_euclid_dist")

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(a - b))

    def matrix(self, reduced: list) -> torch.Tensor:
        k = len(reduced)
        V = torch.stack(reduced).reshape(k, -1)
        G = V @ V.T
        sq = G.diagonal().clone()
        D2 = sq[:, None] + sq[None, :] - 2 * G
        out = D2.clamp_min(0).sqrt_()
        # where D2 is within rounding of the norms (about 1e-8 relative), recompute directly
        unsure = D2 <= 1e-6 * (sq[:, None] + sq[None, :])
        for i, j in unsure.triu(1).nonzero().tolist():
            out[i, j] = self.pair(reduced[i], reduced[j])
        out = out.triu(1)
        return out + out.T
