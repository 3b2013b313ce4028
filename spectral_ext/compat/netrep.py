"""netrep's call shapes (github.com/ahwillia/netrep, Williams et al. 2021;
not on the package index), computed by spectral_ext: change
`from netrep.metrics import LinearMetric, PermutationMetric` and
`from netrep.multiset import pairwise_distances` to
`from spectral_ext.compat.netrep import ...`.

Offered: `LinearMetric(alpha=1.0, center_columns=True, zero_pad=True,
score_method="angular")` and `PermutationMetric(center_columns=True,
zero_pad=True, score_method="angular")` with netrep's methods (`fit`,
`transform`, `score`, `fit_score`, `partial_fit`, `finalize_fit`,
`pairwise_distances(train_data, test_data=None, processes=None,
verbose=True)`), fitted attributes (`mx_`, `my_`, `Wx_`, `Wy_`; `Px_`,
`Py_`) and error messages; and `pairwise_distances(metric, traindata,
testdata=None, verbose=True, enable_caching=False)` of netrep.multiset,
returning D_train, or (D_train, D_test) when testdata is given (the metric
is fitted on each training pair and scored on the test pair). netrep's
conventions throughout (similarity.shape: the partial whitening with
eigenvalues of X^T X raised to 1e-7 and the total variance preserved, zero
padding before whitening, distances not divided by sqrt(N)). Checked
against netrep at commit 0186b8a (python_tests/data/netrep_values.json).

The K x K is batched: each representation centred and whitened once, the
cross products of all pairs from one half-Gram of the stacked whitened
matrices, the nuclear norms (or, with test data, the full SVDs giving the
alignments) and the permutation metric's assignments in one batched call
each, where netrep fits every pair anew in a loop (or a process pool).
`processes` and `enable_caching` are accepted and have no effect;
`verbose=True` shows a progress bar over the representations. Other
metrics passed to pairwise_distances (e.g. netrep's own objects) are run
pair by pair through their fit and score, as netrep does. Not offered:
netrep's stochastic, kernel and CKA metrics, cross_distances and the
multiset barycentres. Differences: when an alignment is not unique
(zero-padded or rank-deficient cross-covariances) the fitted W/P matrices
may be another optimal choice than netrep's LAPACK gives; the training
distances are the same, the test distances of such pairs may differ.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..similarity.shape import _finish, assignment_values, check_alpha, cross_blocks, nuclear_norms, whitening

_SCORES = ("euclidean", "angular")


def _check_score_method(score_method):
    if score_method not in _SCORES:
        raise ValueError("Expected `score_method` parameter to be in {'angular','euclidean'}. " +
                         f"Found instead score_method == '{score_method}'.")
    return score_method


def _array(X) -> np.ndarray:
    X = np.asarray(X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else X)
    if X.dtype.kind not in "biuf":
        raise TypeError(f"expected an array of real numbers, got dtype {X.dtype}")
    X = X.astype(np.float64, copy=False)
    if X.ndim == 2 and not np.isfinite(X).all():
        raise ValueError("Input contains NaN or infinity.")
    return X


def _equal_shapes(X, Y, zero_pad: bool) -> tuple[np.ndarray, np.ndarray]:
    """netrep.validation.check_equal_shapes(X, Y, nd=2, zero_pad)."""
    X, Y = _array(X), _array(Y)
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError("Expected {}d arrays, but shapes were {} and {}.".format(2, X.shape, Y.shape))
    if X.shape != Y.shape:
        if zero_pad and X.shape[0] == Y.shape[0]:
            n = max(X.shape[1], Y.shape[1])
            X = np.pad(X, ((0, 0), (0, n - X.shape[1])))
            Y = np.pad(Y, ((0, 0), (0, n - Y.shape[1])))
        else:
            raise ValueError("Expected arrays with equal dimensions, but got arrays with shapes {} and {}."
                             "".format(X.shape, Y.shape))
    return X, Y


def _angular(X: np.ndarray, Y: np.ndarray) -> float:
    """netrep.utils.angular_distance."""
    corr = np.dot(X.ravel(), Y.ravel()) / (np.linalg.norm(X.ravel()) * np.linalg.norm(Y.ravel()))
    return float(np.arccos(np.clip(corr, -1.0, 1.0)))


class _Metric:
    """fit / transform / score / fit_score / pairwise_distances shared by both metrics."""

    def fit(self, X, Y):
        """Fits the alignment of X and Y ((num_samples, num_neurons) arrays; zero-padded to equal widths
        when zero_pad)."""
        X, Y = _equal_shapes(X, Y, self.zero_pad)
        return self.finalize_fit(self.partial_fit(X), self.partial_fit(Y))

    def transform(self, X, Y):
        """X and Y in the aligned space (the fitted centring and alignment applied)."""
        X, Y = _equal_shapes(X, Y, self.zero_pad)
        return self._transform_X(X), self._transform_Y(Y)

    def score(self, X, Y) -> float:
        """The angular or Euclidean distance of X and Y in the aligned space."""
        tX, tY = self.transform(X, Y)
        if self.score_method == "angular":
            return _angular(tX, tY)
        return float(np.linalg.norm(np.subtract(tX, tY), ord="fro"))

    def fit_score(self, X, Y) -> float:
        """fit(X, Y) then score(X, Y)."""
        return self.fit(X, Y).score(X, Y)

    def _fitted(self, attr: str):
        if not hasattr(self, attr):
            raise AttributeError(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                                 "appropriate arguments before using this estimator.")
        return getattr(self, attr)

    def _transform(self, X, W, m):
        if X.shape[1] != (W.shape[0] if W.ndim == 2 else len(W)):
            raise ValueError("Array with wrong shape passed to transform. Expected matrix with {} columns, "
                             "but got array with shape {}.".format(W.shape[0] if W.ndim == 2 else len(W),
                                                                   np.shape(X)))
        Xc = X - m[None, :] if self.center_columns else X
        return Xc @ W if W.ndim == 2 else Xc[:, W]

    def pairwise_distances(self, train_data, test_data=None, processes: Optional[int] = None,
                           verbose: bool = True):
        """netrep's method: (D_train, D_test), D_test np.inf off the diagonal when test_data is None;
        computed batched (processes is accepted and unused)."""
        D_train, D_test = _batched(self, train_data, test_data, verbose)
        if D_test is None:
            D_test = np.full_like(D_train, np.inf)
            np.fill_diagonal(D_test, 0.0)
        return D_train, D_test

    def __repr__(self):
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._params)
        return f"{type(self).__name__}({args})"

    def get_params(self, deep: bool = True) -> dict:
        return {k: getattr(self, k) for k in self._params}

    def set_params(self, **params):
        for k, v in params.items():
            if k not in self._params:
                raise ValueError(f"Invalid parameter {k!r} for estimator {self!r}.")
            setattr(self, k, v)
        return self


class LinearMetric(_Metric):
    """netrep.metrics.LinearMetric: the distance of two representations after
    their optimal alignment by rotations of their (partially) whitened forms;
    alpha = 1 rotations only (Procrustes), alpha = 0 any invertible linear
    map (the angle of the mean canonical correlation)."""
    _params = ("alpha", "center_columns", "zero_pad", "score_method")

    def __init__(self, alpha: float = 1.0, center_columns: bool = True, zero_pad: bool = True,
                 score_method: str = "angular"):
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and (alpha > 1 or alpha < 0):
            raise ValueError("Regularization parameter `alpha` must be between zero and one.")
        check_alpha(alpha)
        _check_score_method(score_method)
        self.alpha = alpha
        self.center_columns = center_columns
        self.zero_pad = zero_pad
        self.score_method = score_method

    def partial_fit(self, X):
        """(mx, Xw, Zx): the column means (zeros without center_columns), the
        partially whitened X and the whitening matrix, Xw = (X - mx) @ Zx."""
        X = torch.from_numpy(np.ascontiguousarray(_array(X)))
        mx = X.mean(0) if self.center_columns else torch.zeros(X.shape[1], dtype=torch.float64)
        Xc = X - mx
        _, white = whitening(Xc, float(self.alpha), project=False)
        Z = white.Z(X.shape[1], X.shape[1])
        return mx.numpy(), (Xc if white.exact else Xc @ Z).numpy(), Z.numpy()

    def finalize_fit(self, cache_X, cache_Y):
        """Fits Wx_, Wy_ (and keeps mx_, my_) from two partial_fit caches."""
        self.mx_, Xw, Zx = cache_X
        self.my_, Yw, Zy = cache_Y
        U, S, Vt = np.linalg.svd(Xw.T @ Yw)
        self.Wx_ = Zx @ U
        self.Wy_ = Zy @ Vt.T
        # the training distance, for fit_score (score(X, Y) of the same data, without the transforms)
        sx, sy = np.sum(Xw * Xw), np.sum(Yw * Yw)
        self._fit_distance = float(_finish(self.score_method, torch.tensor(S.sum()), torch.tensor(sx),
                                           torch.tensor(sy)))
        return self

    def fit_score(self, X, Y) -> float:
        """fit(X, Y) then score(X, Y): the distance from the fit's singular values (the same number
        as scoring the transformed X and Y, without computing them)."""
        return self.fit(X, Y)._fit_distance

    def _transform_X(self, X):
        return self._transform(X, self._fitted("Wx_"), self.mx_)

    def _transform_Y(self, Y):
        return self._transform(Y, self._fitted("Wy_"), self.my_)


class PermutationMetric(_Metric):
    """netrep.metrics.PermutationMetric: the distance of two (centred)
    representations after the permutation of Y's features that best matches
    X's (a linear assignment)."""
    _params = ("center_columns", "zero_pad", "score_method")

    def __init__(self, center_columns: bool = True, zero_pad: bool = True, score_method: str = "angular"):
        _check_score_method(score_method)
        self.center_columns = center_columns
        self.zero_pad = zero_pad
        self.score_method = score_method

    def partial_fit(self, X):
        """(mx, X - mx): the column means (zeros without center_columns) and the centred X."""
        X = _array(X)
        mx = X.mean(0) if self.center_columns else np.zeros(X.shape[1])
        return mx, X - mx[None, :]

    def finalize_fit(self, cache_X, cache_Y):
        """Fits the index arrays Px_, Py_ (X[:, Px_] matches Y[:, Py_]) from two partial_fit caches."""
        from .._ops import linear_sum_assignment

        self.mx_, X = cache_X
        self.my_, Y = cache_Y
        self.Px_, self.Py_ = linear_sum_assignment(X.T @ Y, maximize=True)
        return self

    def _transform_X(self, X):
        return self._transform(X, self._fitted("Px_"), self.mx_)

    def _transform_Y(self, Y):
        return self._transform(Y, self._fitted("Py_"), self.my_)


def _batched(metric, traindata, testdata, verbose):
    """(D_train, D_test or None) of one of this module's metrics, batched."""
    from tqdm.auto import tqdm

    train = [_array(X) for X in traindata]
    test = None if testdata is None else [_array(X) for X in testdata]
    K = len(train)
    if test is not None and len(test) != K:
        raise ValueError(f"testdata must hold one matrix per network: {len(test)} for {K} in traindata")
    for k, X in enumerate(train + (test or [])):
        if X.ndim != 2:
            raise ValueError(f"Expected 2d arrays, but shapes were {X.shape}.")
    widths = [X.shape[1] for X in train]
    if len({X.shape[0] for X in train}) > 1 or (test and len({X.shape[0] for X in test}) > 1):
        raise ValueError("every network's matrix must hold the same inputs (rows)")
    if test is not None and [X.shape[1] for X in test] != widths:
        raise ValueError("each network's test matrix must have as many columns as its train matrix")
    if len(set(widths)) > 1 and not metric.zero_pad:
        raise ValueError(f"Expected arrays with equal dimensions, but got widths {sorted(set(widths))} "
                         "(zero_pad=False)")
    linear = isinstance(metric, LinearMetric)
    alpha = float(metric.alpha) if linear else 1.0
    tr, te, whites = [], [], []
    for k in tqdm(range(K), desc="reduce", disable=not verbose, leave=False):
        X = torch.from_numpy(np.ascontiguousarray(train[k]))
        mx = X.mean(0) if metric.center_columns else torch.zeros(X.shape[1], dtype=torch.float64)
        Xw, white = whitening(X - mx, alpha)
        tr.append(Xw)
        whites.append(white)
        if test is not None:  # the test matrix through the train fit's centring and whitening (eigenbasis)
            Xt = torch.from_numpy(np.ascontiguousarray(test[k])) - mx
            te.append(Xt if white.exact else (Xt @ white.V) * white.d)
    D_train = np.zeros((K, K))
    D_test = None if test is None else np.zeros((K, K))
    if K < 2:
        return D_train, D_test
    M, i, j = cross_blocks(tr)
    scales = torch.tensor([[whites[a].scale(widths[a], max(widths[a], widths[b])),
                            whites[b].scale(widths[b], max(widths[a], widths[b]))]
                           for a, b in zip(i.tolist(), j.tolist())], dtype=torch.float64)
    s2 = scales[:, 0] * scales[:, 1]
    sq = torch.stack([(X * X).sum() for X in tr])
    if linear:
        if test is None:
            inner = nuclear_norms(M, (sq[i] * sq[j]).sqrt())
        else:
            U, S, Vh = torch.linalg.svd(M)
            inner = S.sum(-1)
    else:
        sizes = torch.maximum(torch.tensor(widths)[i], torch.tensor(widths)[j])
    if test is not None:
        Ct, _, _ = cross_blocks(te)
    if not linear:
        inner, *rest = assignment_values(M, sizes, *([Ct] if test is not None else []))
    vals = _finish(metric.score_method, inner * s2, sq[i] * scales[:, 0] ** 2, sq[j] * scales[:, 1] ** 2)
    D_train[i, j] = D_train[j, i] = vals.numpy()
    if test is not None:
        if linear:  # tr(U^T Ct V): the test cross-covariance in the train fit's alignment
            inner_t = (U * (Ct @ Vh.mT)).sum((-2, -1))
        else:
            inner_t = rest[0]
        sqt = torch.stack([(X * X).sum() for X in te])
        vals = _finish(metric.score_method, inner_t * s2, sqt[i] * scales[:, 0] ** 2, sqt[j] * scales[:, 1] ** 2)
        D_test[i, j] = D_test[j, i] = vals.numpy()
    return D_train, D_test


def pairwise_distances(metric, traindata, testdata=None, verbose: bool = True, enable_caching: bool = False):
    """netrep.multiset.pairwise_distances: the (K, K) distances of K networks
    (traindata: K (m, n_k) matrices of the same m inputs), or (D_train,
    D_test) when testdata (K (p, n_k) matrices) is given: each pair's
    alignment fitted on traindata and scored on testdata. Batched for this
    module's metrics; any other metric object is fitted and scored pair by
    pair as netrep does (enable_caching: its partial_fit caches)."""
    if isinstance(metric, (LinearMetric, PermutationMetric)):
        D_train, D_test = _batched(metric, traindata, testdata, verbose)
        return D_train if testdata is None else (D_train, D_test)
    m = len(traindata)
    D_train = np.zeros((m, m))
    D_test = None if testdata is None else np.zeros((m, m))
    caches = [metric.partial_fit(X) for X in traindata] if enable_caching else None
    for a in range(m):
        for b in range(a + 1, m):
            if enable_caching:
                metric.finalize_fit(caches[a], caches[b])
            else:
                metric.fit(traindata[a], traindata[b])
            D_train[a, b] = D_train[b, a] = metric.score(traindata[a], traindata[b])
            if testdata is not None:
                D_test[a, b] = D_test[b, a] = metric.score(testdata[a], testdata[b])
    return D_train if testdata is None else (D_train, D_test)
