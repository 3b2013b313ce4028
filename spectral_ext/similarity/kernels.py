"""The kernel and alignment measures as Measures: cka, hsic, dot_product and
procrustes (docs/references.md [kornblith2019], [gretton2005], [song2012],
[nguyen2021], [lange2023]), on the kernels,
estimators and batched engines.

Kernels: those of _hsic.kernel_matrix ("linear", "rbf", "max", "laplace",
"ortho") and repsim 0.1.5's RBF variants: "rbf_mean" (sigma = bandwidth x
the root mean squared distance between inputs) and "rbf_dualmed" (sigma_ij
= bandwidth x sqrt(m_i m_j), m_i the median distance of input i to the
others); "rbf" is exp(-|x_i - x_j|^2 / (2 sigma^2)) with sigma = bandwidth
x the median distance. median="lower" takes the lower middle value of an
even count (_core's, torch.median's), "midpoint" the mean of the two middle
values (numpy's and repsim's). HSIC estimators: "gretton" (biased,
tr(K H L H) / (N-1)^2), "song" (unbiased HSIC_1, N >= 4), "lange" (the sum
over i > j of (HKH)_ij (HLH)_ij x 2 / (N (N-3)), N >= 4); `unbiased`
picks song (True) or gretton (False) unless `estimator` names one.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from . import _hsic, _layout, _pairwise, _procrustes
from .measure import Measure, check_choice, check_positive, register

KERNELS = _hsic.KERNELS + ("rbf_mean", "rbf_dualmed")
ESTIMATORS = ("gretton", "song", "lange")


def _who(names, i) -> str:
    return names[i] if names is not None else f"the representation at position {i}"


def _median(values: np.ndarray, median: str, what: str) -> float:
    """The median of a 1-D array (a fresh copy is partitioned in place)."""
    n = values.size
    if n == 0:
        raise ValueError(f"too few inputs for the median {what}")
    k = (n - 1) // 2
    if median == "midpoint" and n % 2 == 0:
        values.partition((k, k + 1))
        value = 0.5 * (values[k] + values[k + 1])
    else:
        values.partition(k)
        value = values[k]
    if not value > 0:
        raise ValueError(f"the median {what} between inputs is 0 (most inputs are identical): the kernel's "
                         "bandwidth is 0 and the measure is undefined")
    return float(value)


def _gram(X: torch.Tensor, kernel: str, bandwidth: float, gamma, median: str) -> torch.Tensor:
    """The (N, N) float64 kernel matrix of X (N, D)."""
    n = X.shape[0]
    if kernel in _hsic.KERNELS and not (kernel == "rbf" and median == "midpoint"):
        R = X.reshape(n, -1, 1)
        return (_hsic._gram(R, kernel, bandwidth, gamma) if kernel == "linear"
                else _hsic.kernel_matrix(R, kernel, bandwidth, gamma)).to(torch.float64)
    sq = _hsic._squared_distances(_layout._rescaled(X))  # shift and (median bandwidth) scale invariant
    A = sq.numpy()
    upper = np.triu_indices(n, 1)
    if kernel == "rbf":
        sigma2 = (bandwidth * _median(np.sqrt(A[upper]), median, "distance")) ** 2
        K = sq / (-2.0 * sigma2)
    elif kernel == "rbf_mean":
        mean = float(A[upper].mean()) if n > 1 else 0.0
        if not mean > 0:
            raise ValueError("every input is identical: the rbf_mean kernel's bandwidth is 0 and the measure "
                             "is undefined")
        K = sq / (-2.0 * bandwidth ** 2 * mean)
    else:  # rbf_dualmed
        D = np.sqrt(A[~np.eye(n, dtype=bool)].reshape(n, n - 1))
        if median == "midpoint":
            m = np.median(D, axis=1)
        else:
            m = np.partition(D, (n - 2) // 2, axis=1)[:, (n - 2) // 2]
        if not (m > 0).all():
            raise ValueError("an input's median distance to the others is 0: the rbf_dualmed kernel's bandwidth "
                             "is 0 and the measure is undefined")
        m = torch.from_numpy(m)
        K = sq / (-2.0 * bandwidth ** 2 * torch.outer(m, m))
    K = K.exp_()
    K.diagonal().fill_(1.0)
    return K


class _Reduced:
    """One representation for HSIC: centred features F (N, D) (linear kernels
    when D < N) or its Gram K (N, N), float64; constant: every row equal."""

    __slots__ = ("F", "K", "constant", "n")

    def __init__(self, F=None, K=None, constant=False):
        self.F, self.K, self.constant = F, K, constant
        self.n = (F if F is not None else K).shape[0]

    def gram(self) -> torch.Tensor:
        return self.K if self.K is not None else self.F @ self.F.T


def _centred_gram(K: torch.Tensor, estimator: str) -> torch.Tensor:
    """The matrix whose inner products give the estimator (a float64 copy):
    HKH (gretton), U-centred (song), HKH with a zero diagonal (lange)."""
    K = K.to(torch.float64, copy=True)[None]
    _hsic._centre_gram_(K, estimator == "song")
    if estimator == "lange":
        K.diagonal(dim1=-2, dim2=-1).zero_()
    return K[0]


def _scale(n: int, estimator: str) -> float:
    return 1.0 / (n - 1) ** 2 if estimator == "gretton" else 1.0 / (n * (n - 3))


def _hsic_matrix(reduced: list, estimator: str) -> torch.Tensor:
    """(K, K) HSIC of every pair of reductions: from one product of the stacked
    centred features where all have them, else one GEMM of the stacked
    vectorised centred Grams."""
    n, k = reduced[0].n, len(reduced)
    if all(a.F is not None for a in reduced):
        S = torch.cat([a.F for a in reduced], 1)
        dims = [a.F.shape[1] for a in reduced]
        owner = torch.repeat_interleave(torch.arange(k), torch.tensor(dims))
        T = (S.T @ S).square_()
        trace = torch.zeros(k, T.shape[1], dtype=torch.float64).index_add_(0, owner, T)
        trace = torch.zeros(k, k, dtype=torch.float64).index_add_(1, owner, trace)
        rows = torch.stack([torch.linalg.vecdot(a.F, a.F) for a in reduced])  # K_ii (the features are centred)
        if estimator == "gretton":
            out = trace
        elif estimator == "lange":
            out = trace - rows @ rows.T
        else:
            sums = rows.sum(1)
            out = trace - (rows @ rows.T) * (1 + 2.0 / (n - 2)) + torch.outer(sums, sums) / ((n - 1) * (n - 2))
    else:
        stacked = torch.stack([_centred_gram(a.gram(), estimator).reshape(-1) for a in reduced])
        out = stacked @ stacked.T
    out = out * _scale(n, estimator)
    constant = torch.tensor([a.constant for a in reduced])
    return out.masked_fill_(constant[:, None] | constant[None, :], 0.0)  # exactly 0, not rounding


def _self_hsic(reduced: list, estimator: str) -> torch.Tensor:
    """The diagonal of _hsic_matrix (each representation with itself) without the pairs."""
    return torch.stack([_hsic_matrix([a], estimator)[0, 0] for a in reduced])


class _Kernel(Measure):
    """Options and reductions shared by cka and hsic."""

    kind = "similarity"
    cost = "O(N^2 D) (linear kernel, D < N: O(N D^2))"

    def __init__(self, kernel: str = "linear", unbiased: bool = True, bandwidth: float = 0.5,
                 gamma: float | None = None, estimator: str | None = None, median: str = "lower"):
        self.kernel = check_choice("kernel", kernel, KERNELS)
        if not isinstance(unbiased, bool):
            raise TypeError(f"unbiased must be True or False, got {unbiased!r}")
        self.unbiased = unbiased
        self.bandwidth = check_positive("bandwidth", bandwidth)
        if gamma is not None:
            if kernel != "laplace":
                raise ValueError(f"gamma is the laplace kernel's option; kernel={kernel!r} does not use it")
            gamma = check_positive("gamma", gamma)
        self.gamma = gamma
        if estimator is not None:
            check_choice("estimator", estimator, ESTIMATORS)
            if not unbiased and estimator != "gretton":
                raise ValueError(f"unbiased=False is the gretton estimator; estimator={estimator!r} contradicts it")
        self.estimator = estimator
        self.median = check_choice("median", median, ("lower", "midpoint"))

    @property
    def _estimator(self) -> str:
        return self.estimator or ("song" if self.unbiased else "gretton")

    @property
    def min_samples(self) -> int:
        return 2 if self._estimator == "gretton" else 4

    def footprint(self, n: int, d: int) -> int:
        return 8 * n * (d if self.kernel in ("linear", "ortho") and d < n else n)

    def _reduce(self, X: torch.Tensor) -> _Reduced:
        constant = _hsic._constant(X)
        n, d = X.shape
        if self.kernel in ("linear", "ortho") and d < n:
            R = X.reshape(n, d, 1)
            return _Reduced(F=_hsic._centred_features(R, self.kernel)[0].reshape(n, d), constant=constant)
        return _Reduced(K=_gram(X, self.kernel, self.bandwidth, self.gamma, self.median), constant=constant)


@register
class HSIC(_Kernel):
    """The Hilbert-Schmidt independence criterion of the kernel matrices K, L of
    X and Y (Gretton et al. 2005): estimator "gretton" tr(K H L H) / (N-1)^2
    (unbiased=False), "song" the unbiased HSIC_1 of Song et al. 2012
    (unbiased=True, the default, N >= 4; Nguyen et al. 2021 eq. 3), or
    "lange" (Lange et al. 2023); kernels and bandwidth rules as the module
    says. Not normalised: it scales with the features (|X|^2 |Y|^2 for
    the linear kernel), so it is invariant to orthogonal maps and
    translation, not to scaling; 0 for a constant representation.
    Symmetric. [gretton2005]"""

    name = "hsic"
    invariances = "orthogonal maps, translation (linear/rbf kernels)"
    reference = "gretton2005"

    def reduce(self, X: torch.Tensor) -> _Reduced:
        return self._reduce(X)

    def pair(self, a: _Reduced, b: _Reduced) -> float:
        return float(_hsic_matrix([a, b], self._estimator)[0, 1])

    def matrix(self, reduced: list) -> torch.Tensor:
        return _hsic_matrix(reduced, self._estimator)


@register
class CKA(_Kernel):
    """Centred kernel alignment HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))
    (Kornblith et al. 2019, section 4) with the HSIC estimator of `unbiased`
    / `estimator` (default the unbiased HSIC_1 of Song et al. 2012 as Nguyen
    et al. 2021) and the kernels of the module (linear the default; rbf
    sigma = bandwidth x median distance; max, laplace and ortho as
    spectral_ext.similarity.cka). In [0, 1] for the biased estimator and
    PSD kernels, in [-1, 1] unbiased, 1 for identical inputs, symmetric.
    Invariant to orthogonal maps, isotropic scaling and translation (linear
    and rbf kernels; max/laplace/ortho: permutations and positive scaling
    of single features). A constant representation: ValueError naming it.
    The K x K runs spectral_ext.similarity's batched CKA engine for its own
    kernels and estimators. [kornblith2019]"""

    name = "cka"
    invariances = "orthogonal maps, isotropic scaling, translation (linear/rbf kernels)"
    reference = "kornblith2019"

    @property
    def _core_route(self) -> bool:
        return self.kernel in _hsic.KERNELS and self._estimator != "lange" and \
            not (self.kernel == "rbf" and self.median == "midpoint")

    def reduce(self, X: torch.Tensor):
        if self._core_route:
            return X, _hsic._constant(X)
        return self._reduce(X)

    def pair(self, a, b) -> float:
        return float(self.matrix([a, b])[0, 1])

    def matrix(self, reduced: list) -> torch.Tensor:
        constant = [r[1] for r in reduced] if self._core_route else [r.constant for r in reduced]
        for i, c in enumerate(constant):
            if c:
                raise ValueError(f"{_who(None, i)} is constant: HSIC(K, K) is 0 and CKA is undefined")
        if self._core_route:
            reps = [_layout._rescaled(X).reshape(X.shape[0], -1, 1) for X, _ in reduced]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out = _pairwise._pairwise_cka(reps, list(range(len(reps))), self.kernel, self._estimator == "song",
                                          self.bandwidth, self.gamma, None)
        else:
            h = _hsic_matrix(reduced, self._estimator)
            d = h.diagonal().clone()
            out = h / torch.outer(d.clamp_min(0).sqrt(), d.clamp_min(0).sqrt())
            out[(d <= 0)[:, None] | (d <= 0)[None, :]] = math.nan
        if not torch.isfinite(out).all():
            raise ValueError("an HSIC(K, K) estimate is not positive (too few inputs for the unbiased "
                             "estimator): CKA is undefined; use more inputs or unbiased=False")
        out.diagonal().fill_(1.0)
        return out


@register
class DotProduct(Measure):
    """Dot-product similarity |X' Y|_F^2 = <vec(X X'), vec(Y Y')> (Kornblith
    et al. 2019, section 3, of centred X and Y: centered=True, the default;
    centered=False takes the raw matrices, as repsim 0.1.5's dot_product).
    Not normalised: it scales as |X|^2 |Y|^2. Symmetric; invariant to
    orthogonal maps of either side and (centred) translation. [kornblith2019]"""

    name = "dot_product"
    kind = "similarity"
    invariances = "orthogonal maps, translation (centered)"
    reference = "kornblith2019"
    cost = "O(N D^2)"
    min_samples = 1

    def __init__(self, centered: bool = True):
        if not isinstance(centered, bool):
            raise TypeError(f"centered must be True or False, got {centered!r}")
        self.centered = centered

    def reduce(self, X: torch.Tensor) -> torch.Tensor:
        return X - X.mean(0, keepdim=True) if self.centered else X

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.T @ b).square().sum())

    def matrix(self, reduced: list) -> torch.Tensor:
        k = len(reduced)
        from .cca import _upper_gram

        S = torch.cat(reduced, 1)
        owner = torch.repeat_interleave(torch.arange(k), torch.tensor([F.shape[1] for F in reduced]))
        T = _upper_gram(S).triu_()
        T = (T + T.triu(1).T).square_()  # syrk's triangle mirrored
        rows = torch.zeros(k, T.shape[1], dtype=torch.float64).index_add_(0, owner, T)
        return torch.zeros(k, k, dtype=torch.float64).index_add_(1, owner, rows)


@register
class Procrustes(Measure):
    """Procrustes similarity spectral_ext.similarity.procrustes(X, Y, group,
    centered) in [0, 1]: group="orthogonal" 1 - delta / 2 with delta^2 = 2 -
    2 |X'Y|_* of X, Y scaled to unit Frobenius norm (Ding et al. 2021,
    seed 004 appendix D.7.1); "grelu" definition 5.2 (unit channels, the
    best permutation). Uncentred unless centered=True. Symmetric, 1 for
    identical inputs. Invariant to orthogonal maps and isotropic scaling
    (orthogonal; grelu: permutations and positive scaling of channels), and
    (centered) translation. [ding2021]"""

    name = "procrustes"
    kind = "similarity"
    invariances = "orthogonal maps, isotropic scaling (grelu: permutations, positive channel scaling)"
    reference = "ding2021"
    cost = "O(N D^2 + D^3)"
    min_samples = 1

    def __init__(self, group: str = "orthogonal", centered: bool = False):
        self.group = check_choice("group", group, _procrustes.GROUPS)
        if not isinstance(centered, bool):
            raise TypeError(f"centered must be True or False, got {centered!r}")
        self.centered = centered

    def reduce(self, X: torch.Tensor) -> torch.Tensor:
        return X

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return _procrustes.procrustes(a, b, group=self.group, centered=self.centered)

    def matrix(self, reduced: list) -> torch.Tensor:
        k = len(reduced)
        if k == 1:
            return torch.tensor([[self.pair(reduced[0], reduced[0])]], dtype=torch.float64)
        reps = {i: _layout._rescaled(X).reshape(X.shape[0], -1, 1) for i, X in enumerate(reduced)}
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        values = _pairwise._pairwise_procrustes(reps, pairs, self.group, self.centered, 64)
        out = torch.eye(k, dtype=torch.float64)
        for (i, j), v in zip(pairs, values):
            out[i, j] = out[j, i] = v
        return out
