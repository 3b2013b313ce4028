"""Shape metrics: distances between representations after their optimal
alignment by a group of transformations (docs/references.md [williams2021];
netrep, github.com/ahwillia/netrep, is the authors' code and the convention
followed here), the permutation metric, and the Bures distance between the
representations' input-by-input kernels [harvey2023].

Every measure here is a metric (symmetric, 0 on a representation and itself,
the triangle inequality) on representations modulo its group, and every one
has the same core: the optimal alignment of X (N, Dx) and Y (N, Dy) by an
orthogonal map has the value ||X^T Y||_* (the nuclear norm: the sum of the
singular values of the cross-covariance), by a permutation the optimal
assignment of X^T Y. The reductions are the centred, (partially) whitened
representations; the K x K stacks them, computes the upper triangle of their
Gram matrix in one BLAS syrk (half the flops of one full product),
and takes the singular values of all K (K - 1) / 2 cross blocks in one
batched call (eigvalsh of the blocks' Gram, with a fall-back to svdvals for
the blocks whose small singular values that route cannot give to ~1e-13:
rank-deficient or zero-padded blocks), or solves all their assignments in one batched
linear_sum_assignment.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .measure import Measure, check_choice, register

#: netrep's whiten: eigenvalues of Xc^T Xc (not divided by N) are raised to
#: this floor before the whitening weights (alpha + (1 - alpha) lam^-1/2).
EIGVAL_TOL = 1e-7
#: eigvalsh of M^T M gives the singular values of M to ~eps * s_max^2 / (2 * s_i): blocks whose
#: nuclear norm could be off by more than this (relative, a bound ~1e3 above the errors measured)
#: are redone by svdvals (rank-deficient and zero-padded blocks)
_EIG_TOL = 1e-10
#: pairs with 1 - cos below this take the SVD route (see nuclear_norms)
_NEAR = 1e-4
#: stacked widths above which the Gram is one BLAS syrk (below, one matmul)
_LEAF = 256


def check_alpha(alpha) -> float:
    """alpha checked in [0, 1], naming the option."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) \
            or not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] (0: any invertible linear map, 1: rotations only), "
                         f"got {alpha!r}")
    return float(alpha)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _variance(lam: torch.Tensor, alpha: float) -> torch.Tensor:
    """Total variance of X Z in the eigenbasis: sum lam d^2 (netrep's new_var)."""
    return (alpha ** 2 * lam + 2 * alpha * (1 - alpha) * lam.sqrt() + (1 - alpha) ** 2).sum()


@dataclass
class Whitening:
    """netrep's whiten(X, alpha, preserve_variance=True) of a centred X, kept
    so that zero padding to P >= D columns can be applied afterwards: netrep
    pads before whitening, which adds P - D clipped eigenvalues (EIGVAL_TOL)
    to the variance it preserves, so the scale depends on the pair's P.

    V, d: eigenvectors of Xc^T Xc and the whitening weights (before the
    scale); lam_sum, var: the sums of the clipped eigenvalues and of lam d^2;
    exact: alpha so close to 1 that netrep does not whiten (Z = I)."""
    V: torch.Tensor | None
    d: torch.Tensor | None
    lam_sum: float
    var: float
    alpha: float
    exact: bool

    def scale(self, D: int, P: int) -> float:
        """The variance-preserving factor of netrep's Z for X padded to P columns."""
        if self.exact:
            return 1.0
        extra = P - D
        a, t = self.alpha, EIGVAL_TOL
        var_tol = a * a * t + 2 * a * (1 - a) * math.sqrt(t) + (1 - a) ** 2  # _variance of one clipped eigenvalue
        return math.sqrt((self.lam_sum + extra * t) / (self.var + extra * var_tol))

    def Z(self, D: int, P: int) -> torch.Tensor:
        """netrep's (P, P) whitening matrix: X_padded @ Z is the whitened X."""
        if self.exact:
            return torch.eye(P, dtype=torch.float64)
        s = self.scale(D, P)
        out = torch.zeros(P, P, dtype=torch.float64)
        out[:D, :D] = (self.V * (self.d * s)) @ self.V.T
        if P > D:  # the padded coordinates: eigenvalue 0 raised to EIGVAL_TOL
            out[D:, D:].fill_diagonal_(s * (self.alpha + (1 - self.alpha) * EIGVAL_TOL ** -0.5))
        return out


def whitening(Xc: torch.Tensor, alpha: float, project: bool = True) -> tuple[torch.Tensor | None, Whitening]:
    """Xc (N, D) centred (or not) -> (Xc V diag(d), the Whitening): the
    whitened representation in the eigenbasis of Xc^T Xc, unscaled (a
    rotation of netrep's X Z, which changes no distance); None in its place
    without project."""
    if alpha > 1 - EIGVAL_TOL:
        return Xc, Whitening(None, None, 0.0, 0.0, alpha, True)
    lam, V = torch.linalg.eigh(Xc.T @ Xc)
    lam = lam.clamp(min=EIGVAL_TOL)
    d = alpha + (1 - alpha) * lam.rsqrt()
    white = Whitening(V, d, float(lam.sum()), float(_variance(lam, alpha)), alpha, False)
    return ((Xc @ V) * d if project else None), white


def cross_blocks(mats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cross products mats[i]^T mats[j] (i < j) of K (N, D_i) matrices,
    zero-padded to P = max D_i: (B, P, P) with B = K (K - 1) / 2, and the
    pairs' indices (i, j): the upper triangle of the Gram of the stacked
    matrices, by one BLAS syrk (half the flops of a full product)."""
    K = len(mats)
    P = max(m.shape[1] for m in mats)
    N = mats[0].shape[0]
    St = torch.zeros(K * P, N, dtype=torch.float64)
    for k, m in enumerate(mats):
        St[k * P:k * P + m.shape[1]] = m.T
    if K * P > _LEAF:  # BLAS syrk: one triangle, half the flops (torch has none); scipy's OpenBLAS
        from scipy.linalg import blas

        G = torch.from_numpy(blas.dsyrk(1.0, St.numpy().T, trans=1))  # St read in Fortran order is St^T
    else:
        G = St @ St.T
    i, j = torch.triu_indices(K, K, 1)
    return G.view(K, P, K, P)[i, :, j, :], i, j


def nuclear_norms(M: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the singular values of each (P, P) block of M (B, P, P):
    eigvalsh of M^T M (faster than an SVD), and svdvals for the blocks where
    that route would lose accuracy (a small singular value: rank-deficient or
    zero-padded blocks) or where its ~1e-14 matters: norms (B,) = ||X|| ||Y||
    of each block's pair, and a nuclear norm within 1e-4 of it (nearly
    aligned representations, whose distance sqrt(2 (1 - cos)) magnifies the
    error to ~1e-7) is redone."""
    if M.shape[0] == 0:
        return M.new_zeros(0)
    lam = torch.linalg.eigvalsh(M.mT @ M)
    s = lam.clamp(min=0).sqrt()
    out = s.sum(-1)
    # an eigenvalue's error is about P eps lam_max (conservative), a singular value's then
    # min(that / (2 s), its square root); redo the blocks where the sum could be off by > _EIG_TOL
    dl = M.shape[-1] * torch.finfo(M.dtype).eps * lam[:, -1:].clamp(min=0)
    err = torch.minimum(dl / (2 * s), dl.sqrt()).sum(-1)
    poor = ~(err <= _EIG_TOL * out)
    if norms is not None:
        poor |= out > (1 - _NEAR) * norms
    if poor.any():
        out[poor] = torch.linalg.svdvals(M[poor]).sum(-1)
    return out


def assignment_values(M: torch.Tensor, sizes: torch.Tensor | None = None, *others: torch.Tensor):
    """The optimal assignment's total of each block of M (B, P, P), maximised,
    with the block cut to its own size (netrep pads a pair to max(Dx, Dy):
    a larger zero padding would let a feature go unmatched), and the same
    assignment's totals in each of ``others`` (B, P, P) (test data)."""
    from .._ops import linear_sum_assignment

    B, P, _ = M.shape
    sizes = torch.full((B,), P) if sizes is None else sizes
    outs = [M.new_zeros(B) for _ in range(1 + len(others))]
    for p in sizes.unique().tolist():
        idx = (sizes == p).nonzero().flatten()
        _, cols = linear_sum_assignment(M[idx, :p, :p].contiguous(), maximize=True)
        for out, A in zip(outs, (M,) + others):
            out[idx] = A[idx, :p, :p].gather(2, cols[:, :, None])[..., 0].sum(-1)
    return outs


def _finish(distance: str, inner: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """angular: arccos(inner / (|X| |Y|)); euclidean: sqrt(|X|^2 + |Y|^2 - 2 inner)
    (sx, sy: squared norms)."""
    if distance == "angular":
        return torch.arccos((inner / (sx * sy).sqrt()).clamp(-1.0, 1.0))
    return (sx + sy - 2.0 * inner).clamp(min=0.0).sqrt()


@dataclass
class Aligned:
    """A reduction: the centred (whitened) representation, its squared norm
    (before the pair's padding scale), its own D, and its whitening."""
    X: torch.Tensor
    sq: float
    D: int
    white: Whitening | None = None


def _center(X: torch.Tensor, center: bool) -> torch.Tensor:
    return X - X.mean(0, keepdim=True) if center else X


class _Aligned(Measure):
    """Shared K x K of the alignment measures: blocks of the stacked Gram, a
    batched alignment value per block, the finish."""
    kind = "distance"
    min_samples = 2
    distance = "angular"
    zero_pad = True

    def _aligned(self, X: torch.Tensor, white: Whitening | None = None) -> Aligned:
        sq = float((X * X).sum())
        if sq == 0.0 and self.distance == "angular":
            raise ValueError(f"{self.name}: a representation is zero (constant features"
                             f"{' after centring' if getattr(self, 'center_columns', False) else ''}): "
                             "its angular distance to anything is undefined")
        return Aligned(X, sq, X.shape[1], white)

    def _values(self, M: torch.Tensor, sizes: torch.Tensor | None = None,
                norms: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P, P) -> the optimal alignments' inner products (zero padding changes no nuclear norm)."""
        return nuclear_norms(M, norms)

    def _check_pad(self, a: Aligned, b: Aligned) -> None:
        if a.D != b.D and not self.zero_pad:
            raise ValueError(f"{self.name}: the representations have D = {a.D} and {b.D} features; "
                             "pass zero_pad=True to pad the smaller with zero columns")

    def _scales(self, a: Aligned, b: Aligned) -> tuple[float, float]:
        P = max(a.D, b.D)
        return (a.white.scale(a.D, P) if a.white else 1.0), (b.white.scale(b.D, P) if b.white else 1.0)

    def pair(self, a: Aligned, b: Aligned) -> float:
        self._check_pad(a, b)
        if a is b or (a.X.shape == b.X.shape and torch.equal(a.X, b.X)):
            return 0.0
        P = max(a.D, b.D)
        C = torch.zeros(P, P, dtype=torch.float64)
        C[:a.D, :b.D] = a.X.T @ b.X
        sa, sb = self._scales(a, b)
        inner = self._values(C[None], None, torch.tensor([math.sqrt(a.sq * b.sq)], dtype=torch.float64))[0]
        inner = inner * (sa * sb)
        def t(v):
            return torch.tensor(v, dtype=torch.float64)
        return float(_finish(self.distance, inner, t(a.sq * sa * sa), t(b.sq * sb * sb)))

    def matrix(self, reduced: list) -> torch.Tensor:
        K = len(reduced)
        for r in reduced[1:]:
            self._check_pad(reduced[0], r)
        out = torch.zeros(K, K, dtype=torch.float64)
        if K < 2:
            return out
        M, i, j = cross_blocks([r.X for r in reduced])
        widths = torch.tensor([r.D for r in reduced])
        sq = torch.tensor([r.sq for r in reduced], dtype=torch.float64)
        inner = self._values(M, torch.maximum(widths[i], widths[j]), (sq[i] * sq[j]).sqrt())
        s = torch.tensor([self._scales(reduced[a], reduced[b]) for a, b in zip(i.tolist(), j.tolist())],
                         dtype=torch.float64)
        vals = _finish(self.distance, inner * s[:, 0] * s[:, 1], sq[i] * s[:, 0] ** 2, sq[j] * s[:, 1] ** 2)
        out[i, j] = vals
        out[j, i] = vals
        return out


@register
class ShapeMetric(_Aligned):
    """Generalised shape metric of Williams et al. [williams2021] (Section 2,
    eq. 5-6 and the partial whitening of Section 3.1), netrep's LinearMetric:
    each representation is centred (center_columns) and partially whitened,
    Xw = Xc Z with Z = V diag(alpha + (1 - alpha) lam^-1/2) V^T from the
    eigendecomposition Xc^T Xc = V diag(lam) V^T (not divided by N;
    eigenvalues below 1e-7 raised to 1e-7, netrep's regularisation, which
    also makes a rank-deficient covariance usable at alpha = 0), rescaled so
    that the total variance ||Xw||_F^2 = ||Xc||_F^2 (netrep's
    preserve_variance). The distance between Xw and Yw minimised over
    rotations Q is, with the nuclear norm n = ||Xw^T Yw||_*, angular:
    arccos(n / (||Xw|| ||Yw||)) in [0, pi]; euclidean: min_Q ||Xw - Yw Q||_F
    = sqrt(||Xw||^2 + ||Yw||^2 - 2 n) (not divided by sqrt(N), as in netrep).
    Representations of different D are zero-padded to the larger (zero_pad,
    netrep's convention; the padding adds clipped eigenvalues to the
    preserved variance, as netrep does). alpha = 1: Procrustes; alpha = 0:
    the mean canonical correlation's angle (any invertible linear map).
    Invariances: orthogonal transforms, translation (center_columns); the
    angular distance also isotropic scaling at alpha = 0 or 1 (between them
    the weights alpha + (1 - alpha) lam^-1/2 mix scales: netrep's partial
    whitening depends on the scale and on N) and, at alpha = 0, any
    invertible linear map (the Euclidean distance keeps ||Xc||, so it
    changes with the map)."""
    name = "shape_metric"
    invariances = ("orthogonal transforms; translation (center_columns); angular only: isotropic scaling at "
                   "alpha=0 or 1, any invertible linear map at alpha=0")
    reference = "williams2021"
    cost = "O(N D^2 + D^3)"

    def __init__(self, alpha: float = 1.0, distance: str = "angular", center_columns: bool = True,
                 zero_pad: bool = True):
        self.alpha = check_alpha(alpha)
        self.distance = check_choice("distance", distance, ("angular", "euclidean"))
        self.center_columns = check_flag("center_columns", center_columns)
        self.zero_pad = check_flag("zero_pad", zero_pad)

    def reduce(self, X: torch.Tensor) -> Aligned:
        Xw, white = whitening(_center(X, self.center_columns), self.alpha)
        return self._aligned(Xw, white)


@register
class PermutationMetric(_Aligned):
    """Permutation shape metric [williams2021] (Section 2, the group of
    permutations; netrep's PermutationMetric): each representation centred
    (center_columns), not whitened (netrep's PermutationMetric has no
    alpha), the features of Y matched to those of X by the assignment that
    maximises t = sum_k (Xc^T Yc)[k, pi(k)] (linear_sum_assignment); angular:
    arccos(t / (||Xc|| ||Yc||)); euclidean: sqrt(||Xc||^2 + ||Yc||^2 - 2 t).
    Different D: zero-padded to the larger (zero_pad), so every feature of
    the narrower representation is matched. Invariances:
    permutations of the features, translation (center_columns), isotropic
    scaling for the angular distance; not rotations."""
    name = "permutation_metric"
    invariances = "permutations of features; translation (center_columns); isotropic scaling (angular)"
    reference = "williams2021"
    cost = "O(N D^2 + D^3)"

    def __init__(self, distance: str = "angular", center_columns: bool = True, zero_pad: bool = True):
        self.distance = check_choice("distance", distance, ("angular", "euclidean"))
        self.center_columns = check_flag("center_columns", center_columns)
        self.zero_pad = check_flag("zero_pad", zero_pad)

    def reduce(self, X: torch.Tensor) -> Aligned:
        return self._aligned(_center(X, self.center_columns))

    def _values(self, M: torch.Tensor, sizes: torch.Tensor | None = None,
                norms: torch.Tensor | None = None) -> torch.Tensor:
        return assignment_values(M, sizes)[0]


@register
class BuresDistance(_Aligned):
    """Bures distance between the representations' input-by-input kernels
    [harvey2023] (Section 2-3): K_X = Xc Xc^T / N (N x N, features centred
    when center_columns, divided by N), d_B^2 = tr K_X + tr K_Y
    - 2 F(K_X, K_Y) with the fidelity F = tr (K_X^1/2 K_Y K_X^1/2)^1/2. By
    the duality of the paper, F = ||Xc^T Yc||_* / N, so d_B is the
    Procrustes distance min_Q ||Xc - Yc Q||_F / sqrt(N) (Q with orthonormal
    columns; any D, no padding needed), computed that way (D x D, not N x
    N). distance="angular": the Bures angle arccos(NBS), NBS = F /
    sqrt(tr K_X tr K_Y) the normalised Bures similarity, equal to the
    Procrustes angular shape distance. Invariances: orthogonal transforms
    (any width), translation (center_columns), isotropic scaling for the
    angle."""
    name = "bures_distance"
    invariances = "orthogonal transforms; translation (center_columns); isotropic scaling (angular)"
    reference = "harvey2023"
    cost = "O(N D^2 + D^3)"

    def __init__(self, distance: str = "euclidean", center_columns: bool = True):
        self.distance = check_choice("distance", distance, ("euclidean", "angular"))
        self.center_columns = check_flag("center_columns", center_columns)

    def reduce(self, X: torch.Tensor) -> Aligned:
        return self._aligned(_center(X, self.center_columns) / math.sqrt(X.shape[0]))
