"""The CCA family and linear regression as Measures: mean_cca, mean_r2_cca,
svcca, pwcca and linear_regression (docs/references.md [kornblith2019],
[raghu2017], [morcos2018]).

Every representation is reduced once to an orthonormal basis of its centred
column space: X - mean (columns centred over the N inputs), its thin SVD
U S V', and the directions with s > rtol * max(s) kept (rtol = 1e-12 by
default, repsim 0.1.5's threshold). A constant column carries no variance
after centring, so the rank step drops it; a duplicated or linearly
dependent column likewise. No ridge is added: the basis is exact where the
rank is. A representation of rank 0 (every column constant) has no
canonical direction: ValueError naming it (X / Y, or its position in the
list). The canonical correlations of a pair are the singular values of
Q_X' Q_Y (Bjorck and Golub), min(r_X, r_Y) of them; the K x K of K
representations stacks the bases, takes every Q_i' Q_j from one product
of the stacked matrix with itself and the singular values of the blocks
in batched calls.

Few inputs: once r_X + r_Y > N - 1, at least r_X + r_Y - (N - 1) canonical
correlations are 1 by dimension counting (two subspaces of the (N - 1)-dim
centred space must meet); with N - 1 <= D every one is, whatever the
inputs, and mean_cca is 1. The measures do not refuse this (nor does
repsim); reduce D first (svcca with dims= or variance=, or more inputs).
"""
from __future__ import annotations

import torch

from .measure import Measure, check_choice, check_positive, register

_SUMMARIES = ("mean", "yanai", "pillai")
_DENOMINATORS = ("rank", "raw_rank")


class _Basis:
    """One representation's reduction: Q (N, r) orthonormal basis of the kept
    centred directions, r, raw_rank (the rank of the uncentred X, for
    denominator="raw_rank"), and where asked B = Q' Xc (r, D) (PWCCA's
    projection of the neurons) or Xc itself (linear regression)."""

    __slots__ = ("Q", "rank", "raw_rank", "B", "Xc", "norm2")

    def __init__(self, Q, raw_rank=None, B=None, Xc=None):
        self.Q, self.rank, self.raw_rank, self.B, self.Xc = Q, Q.shape[1], raw_rank, B, Xc
        self.norm2 = None if Xc is None else float(torch.dot(Xc.reshape(-1), Xc.reshape(-1)))


def _rtol(value) -> float:
    value = check_positive("rtol", value)
    if value >= 1:
        raise ValueError(f"rtol must be below 1, got {value!r}")
    return value


def _svd(X: torch.Tensor, rtol: float):
    """(U, s, Vh) of X truncated to its numerical rank (s > rtol * max s)."""
    U, s, Vh = torch.linalg.svd(X, full_matrices=False)
    r = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return U[:, :r], s[:r], Vh[:r]


def _raw_rank(X: torch.Tensor, rtol: float) -> int:
    s = torch.linalg.svdvals(X)
    return int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0


def _centred(X: torch.Tensor) -> torch.Tensor:
    return X - X.mean(0, keepdim=True)


def _who(names, i) -> str:
    return names[i] if names is not None else f"the representation at position {i}"


def _check_ranks(reduced, names=None, what="CCA"):
    for i, a in enumerate(reduced):
        if a.rank == 0:
            raise ValueError(f"{_who(names, i)} has rank 0 after centring (every column is constant): "
                             f"{what} is undefined")


def _offsets(reduced):
    starts = [0]
    for a in reduced:
        starts.append(starts[-1] + a.rank)
    return starts


def _block_sums(values: torch.Tensor, rows: list, cols: list) -> torch.Tensor:
    """(len(rows), len(cols)) sums of the blocks of `values` whose row / column
    sizes are rows / cols."""
    # two products with 0/1 membership matrices: 20x faster than index_add_ on a 1800 x 1800 (svcca's K x K)
    def members(sizes):
        owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
        return (owner[None, :] == torch.arange(len(sizes))[:, None]).to(values.dtype)

    return members(rows) @ values @ members(cols).T


def _upper_gram(S: torch.Tensor) -> torch.Tensor:
    """The upper triangle of S'S (the lower one unspecified) by BLAS syrk: half a matmul's flops."""
    from ._hsic import _syrk

    G = _syrk(S.contiguous(), outer=False)
    return S.T @ S if G is None else G


def _cross(reduced) -> tuple[torch.Tensor, list]:
    """Every Q_i' Q_j, i < j, as blocks of the upper triangle of one product of
    the stacked bases (R x R, R = sum of ranks; the blocks at or below the
    diagonal are not to be read)."""
    return _upper_gram(torch.cat([a.Q for a in reduced], 1)), _offsets(reduced)


def _pair_groups(reduced, pairs):
    """The pairs (i, j) grouped by their blocks' shapes (one batched call per group)."""
    groups = {}
    for i, j in pairs:
        groups.setdefault((reduced[i].rank, reduced[j].rank), []).append((i, j))
    return groups.values()


def _upper(k):
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


class _CCA(Measure):
    """The shared reduction and K x K of the CCA summaries."""

    kind = "similarity"
    min_samples = 2
    summary = "mean"

    def _init(self, rtol, denominator):
        self.rtol = _rtol(rtol)
        self.denominator = check_choice("denominator", denominator, _DENOMINATORS)

    def _basis(self, X: torch.Tensor) -> torch.Tensor:
        return _svd(_centred(X), self.rtol)[0]

    def reduce(self, X: torch.Tensor) -> _Basis:
        raw = _raw_rank(X, self.rtol) if self.denominator == "raw_rank" else None
        return _Basis(self._basis(X), raw)

    def _denom(self, a: _Basis, b: _Basis) -> int:
        return min(a.raw_rank, b.raw_rank) if self.denominator == "raw_rank" else min(a.rank, b.rank)

    def _value(self, M: torch.Tensor) -> torch.Tensor:
        """The summed summary of a batch of cross blocks Q_X' Q_Y (..., r_X, r_Y)."""
        if self.summary == "yanai":
            return M.square().sum((-2, -1))  # sum rho^2 = |Q_X' Q_Y|_F^2
        return torch.linalg.svdvals(M).clamp_(max=1.0).sum(-1)  # sum rho (rounding can pass 1 by 1e-16)

    def pair(self, a: _Basis, b: _Basis) -> float:
        _check_ranks([a, b], ["X", "Y"])
        return float(self._value(a.Q.T @ b.Q)) / self._denom(a, b)

    def matrix(self, reduced: list) -> torch.Tensor:
        _check_ranks(reduced)
        k = len(reduced)
        out = torch.empty(k, k, dtype=torch.float64)
        for i, a in enumerate(reduced):
            out[i, i] = self._value(torch.eye(a.rank, dtype=torch.float64)) / self._denom(a, a)
        if k == 1:
            return out
        G, starts = _cross(reduced)
        if self.summary == "yanai":
            sums = _block_sums(G.square(), [a.rank for a in reduced], [a.rank for a in reduced])
            for i, j in _upper(k):
                out[i, j] = out[j, i] = sums[i, j] / self._denom(reduced[i], reduced[j])
            return out
        for group in _pair_groups(reduced, _upper(k)):
            blocks = torch.stack([G[starts[i]:starts[i + 1], starts[j]:starts[j + 1]] for i, j in group])
            for (i, j), v in zip(group, self._value(blocks).tolist()):
                out[i, j] = out[j, i] = v / self._denom(reduced[i], reduced[j])
        return out


@register
class MeanCCA(_CCA):
    """Mean canonical correlation rho-bar = (1 / m) sum_i rho_i over the
    m = min(r_X, r_Y) canonical correlations of the centred X and Y (the
    singular values of Q_X' Q_Y, Q an orthonormal basis of each centred
    column space, null directions dropped at relative tolerance `rtol`),
    in [0, 1], 1 for identical inputs, symmetric. Invariant to invertible
    linear maps of either side's features (so to orthogonal maps and
    isotropic scaling) and to translation. denominator="rank" divides by m
    (the paper's mean); "raw_rank" by the smaller rank of the uncentred
    inputs (repsim 0.1.5's convention, its summary_type="pillai").
    Kornblith et al. 2019 section 3 [kornblith2019]."""

    name = "mean_cca"
    invariances = "invertible linear maps, translation"
    reference = "kornblith2019"
    cost = "O(N D^2 + D^3)"

    def __init__(self, rtol: float = 1e-12, denominator: str = "rank"):
        self._init(rtol, denominator)


@register
class MeanR2CCA(_CCA):
    """Mean squared canonical correlation R^2_CCA = (1 / m) sum_i rho_i^2 =
    |Q_X' Q_Y|_F^2 / m = tr(P_X P_Y) / min(r_X, r_Y) (Yanai's generalised
    coefficient of determination with the min-rank normalisation), P the
    projections onto the centred column spaces; in [0, 1], 1 for
    identical inputs, symmetric. Invariant to invertible linear maps and
    translation. rtol and denominator as mean_cca ("raw_rank": repsim
    0.1.5's summary_type="yanai"). Kornblith et al. 2019 section 3
    [kornblith2019]."""

    name = "mean_r2_cca"
    invariances = "invertible linear maps, translation"
    reference = "kornblith2019"
    cost = "O(N D^2)"
    summary = "yanai"

    def __init__(self, rtol: float = 1e-12, denominator: str = "rank"):
        self._init(rtol, denominator)


@register
class SVCCA(_CCA):
    """SVCCA (Raghu et al. 2017, section 2): each centred representation
    reduced by its SVD to the leading directions that keep a fraction
    `variance` of its variance (the fewest k with sum_{i<=k} s_i^2 >=
    variance * sum s_i^2; or the `dims` leading ones, an int, not both),
    then CCA of the reduced pair summarised by summary="mean" (the paper's
    mean canonical correlation, the default), "yanai" (mean rho^2) or
    "pillai" (repsim 0.1.5's name for the mean rho: its nuclear norm of
    Q_X' Q_Y over the min rank; Pillai's trace in statistics is sum rho^2),
    over min(k_X, k_Y) correlations (denominator="rank") or repsim's
    min raw rank ("raw_rank"). svd_input="centred" takes the SVD of the
    centred activations (the paper); "whitened" of the centred orthonormal
    basis of the raw column space (repsim 0.1.5: every direction carries
    the same variance there, so the threshold drops the mean direction and,
    past 100 dimensions, directions its SVD orders arbitrarily). Symmetric;
    invariant to orthogonal maps, isotropic scaling and translation (not
    to general linear maps: they change which directions the SVD keeps).
    [raghu2017]"""

    name = "svcca"
    invariances = "orthogonal maps, isotropic scaling, translation"
    reference = "raghu2017"
    cost = "O(N D^2 + D^3)"

    def __init__(self, variance: float = 0.99, dims: int | None = None, summary: str = "mean",
                 rtol: float = 1e-12, denominator: str = "rank", svd_input: str = "centred"):
        self.variance = check_positive("variance", variance)
        if self.variance > 1:
            raise ValueError(f"variance must be a fraction in (0, 1], got {variance!r}")
        if dims is not None:
            if variance != 0.99:
                raise ValueError("give svcca either variance= or dims=, not both")
            dims = check_positive("dims", dims, integer=True)
        self.dims = dims
        self.summary = check_choice("summary", summary, _SUMMARIES)
        self.svd_input = check_choice("svd_input", svd_input, ("centred", "whitened"))
        self._init(rtol, denominator)

    def _basis(self, X: torch.Tensor) -> torch.Tensor:
        if self.svd_input == "whitened":
            X = _svd(X, self.rtol)[0]  # the raw column space, orthonormal
        U, s, _ = _svd(_centred(X), self.rtol)
        if self.dims is not None:
            return U[:, :self.dims]
        share = torch.cumsum(s.square(), 0)
        # the fewest leading directions whose share reaches `variance` (repsim's loop: cum / total < variance)
        k = int((share / share[-1] < self.variance).sum()) + 1 if s.numel() else 0
        return U[:, :min(k, s.numel())]


@register
class PWCCA(Measure):
    """Projection-weighted CCA (Morcos et al. 2018, section 2.2): sum_i
    alpha_i rho_i over the canonical correlations of the centred X and Y,
    alpha_i proportional to sum_j |<h_i, x_j>|, h_i the i-th canonical
    variate of X in sample space (orthonormal: Q_X L_i, L the left singular
    vectors of Q_X' Q_Y) and x_j the j-th centred neuron (column) of X, so
    the directions X uses most weigh most. Asymmetric: compare(X, Y) takes
    the weights from X (the first argument, the paper's and repsim's
    pair), and matrix()[i, j] from the i-th representation (row i weights);
    symmetric=True averages both sides (repsim 0.1.5's M x M). In [0, 1],
    1 for identical inputs (the matrix diagonal is set to exactly 1).
    Invariant to translation and isotropic scaling, to permuting and
    flipping the sign of the weighting side's neurons (not to its other
    orthogonal maps: the weights are l1 sums over neurons) and to any
    invertible linear map of the other side (symmetric=True: permutations,
    sign flips, scaling of either). Null directions dropped at relative
    tolerance `rtol`. [morcos2018]"""

    name = "pwcca"
    kind = "similarity"
    invariances = "permutations and sign flips of neurons, isotropic scaling, translation"
    reference = "morcos2018"
    cost = "O(N D^2 + D^3)"
    min_samples = 2

    def __init__(self, symmetric: bool = False, rtol: float = 1e-12):
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
        self.symmetric = symmetric
        self.rtol = _rtol(rtol)

    def reduce(self, X: torch.Tensor) -> _Basis:
        U, s, Vh = _svd(_centred(X), self.rtol)
        return _Basis(U, B=s[:, None] * Vh)  # B = U' Xc: each neuron's coordinates in the basis

    @staticmethod
    def _both(M, Bx, By):
        """(weights from X, weights from Y) of a batch of cross blocks M = Q_X' Q_Y."""
        L, rho, Rh = torch.linalg.svd(M, full_matrices=False)
        rho = rho.clamp(0.0, 1.0)
        wx = (L.mT @ Bx).abs().sum(-1)
        wy = (Rh @ By).abs().sum(-1)
        return (wx * rho).sum(-1) / wx.sum(-1), (wy * rho).sum(-1) / wy.sum(-1)

    def pair(self, a: _Basis, b: _Basis) -> float:
        _check_ranks([a, b], ["X", "Y"], "PWCCA")
        xy, yx = self._both(a.Q.T @ b.Q, a.B, b.B)
        return float((xy + yx) / 2 if self.symmetric else xy)

    def matrix(self, reduced: list) -> torch.Tensor:
        _check_ranks(reduced, what="PWCCA")
        k = len(reduced)
        out = torch.eye(k, dtype=torch.float64)
        if k == 1:
            return out
        G, starts = _cross(reduced)
        groups = {}
        for i, j in _upper(k):
            key = (reduced[i].rank, reduced[j].rank, reduced[i].B.shape[1], reduced[j].B.shape[1])
            groups.setdefault(key, []).append((i, j))
        for group in groups.values():
            M = torch.stack([G[starts[i]:starts[i + 1], starts[j]:starts[j + 1]] for i, j in group])
            Bx = torch.stack([reduced[i].B for i, _ in group])
            By = torch.stack([reduced[j].B for _, j in group])
            xy, yx = self._both(M, Bx, By)
            for (i, j), v, w in zip(group, xy.tolist(), yx.tolist()):
                out[i, j], out[j, i] = ((v + w) / 2,) * 2 if self.symmetric else (v, w)
        return out


@register
class LinearRegression(Measure):
    """Linear regression fit (Kornblith et al. 2019, section 3): the R^2 of Y
    predicted from X by least squares, 1 - min_B |Yc - Xc B|_F^2 / |Yc|_F^2
    = |Q_X' Yc|_F^2 / |Yc|_F^2 (Q_X an orthonormal basis of the centred
    column space of X, null directions dropped at relative tolerance
    `rtol`; Xc, Yc centred, i.e. with an intercept; centered=False fits
    the raw matrices without one, as repsim 0.1.5's core_LinReg).
    Asymmetric: compare(X, Y) is Y from X, matrix()[i, j] the j-th
    representation from the i-th; symmetric=True averages both directions
    (repsim's convention). In [0, 1], 1 when Y is a linear function of X.
    Invariant to invertible linear maps of X, to orthogonal maps and
    isotropic scaling of Y, and (centred) to translation. A constant
    representation (zero after centring) has nothing to explain or fit
    with: ValueError naming it. [kornblith2019]"""

    name = "linear_regression"
    kind = "similarity"
    invariances = "invertible linear maps of X; orthogonal maps, isotropic scaling of Y; translation"
    reference = "kornblith2019"
    cost = "O(N D^2)"
    min_samples = 2

    def __init__(self, symmetric: bool = False, centered: bool = True, rtol: float = 1e-12):
        for option, value in (("symmetric", symmetric), ("centered", centered)):
            if not isinstance(value, bool):
                raise TypeError(f"{option} must be True or False, got {value!r}")
        self.symmetric, self.centered = symmetric, centered
        self.rtol = _rtol(rtol)

    def reduce(self, X: torch.Tensor) -> _Basis:
        Xc = _centred(X) if self.centered else X
        return _Basis(_svd(Xc, self.rtol)[0], Xc=Xc)

    @staticmethod
    def _check(reduced, names=None):
        for i, a in enumerate(reduced):
            if not a.norm2 > 0:
                raise ValueError(f"{_who(names, i)} is constant{' (zero)' if a.rank == 0 else ''}: "
                                 "the linear regression R^2 is undefined")

    def pair(self, a: _Basis, b: _Basis) -> float:
        self._check([a, b], ["X", "Y"])
        xy = float((a.Q.T @ b.Xc).square().sum()) / b.norm2
        if not self.symmetric:
            return xy
        return (xy + float((b.Q.T @ a.Xc).square().sum()) / a.norm2) / 2

    def matrix(self, reduced: list) -> torch.Tensor:
        self._check(reduced)
        SQ = torch.cat([a.Q for a in reduced], 1)
        SX = torch.cat([a.Xc for a in reduced], 1)
        sums = _block_sums((SQ.T @ SX).square_(), [a.rank for a in reduced], [a.Xc.shape[1] for a in reduced])
        out = sums / torch.tensor([a.norm2 for a in reduced], dtype=torch.float64)[None, :]
        if self.symmetric:
            out = (out + out.T) / 2
        out.diagonal().fill_(1.0)  # Y from itself: exactly 1
        return out
