"""repsim 0.1.5's functions with its call shapes: change ``import repsim`` to
``from spectral_ext.compat import repsim`` for

- ``cca(mats, summary_type=None)``, ``svcca(mats, summary_type=None)``: the
  mean_r2_cca ("yanai", the default) / mean_cca ("pillai") and svcca measures
  with repsim's conventions (the rank of the uncentred inputs as the
  denominator; SVCCA's 99% variance threshold on the centred orthonormal
  basis of the raw column space)
- ``pwcca(mats)``: the pwcca measure, both weighting sides averaged
- ``cka(mats, kernel_type=None, estimator=None)``, ``hsic(...)``: the cka /
  hsic measures with repsim's kernels ("rbf": sigma = the median distance,
  midpoint of an even count; "rbf_mean"; "rbf_dualmed"; "linear") and HSIC
  estimators ("gretton", "song", "lange"; below 4 inputs gretton, as repsim);
  its CKA divides by the gretton self-HSICs whatever the estimator
- ``dot_product(mats)``: the dot_product measure on the raw matrices
- ``repsim_kernels()``, ``repsim_hsic()``, ``__version__``

Same arguments, the same (M, M) float64 numpy arrays (to rounding: 1e-12
relative on the tests' inputs), the same TypeErrors / ValueErrors for bad
``mats`` and options. Differences: where repsim returns 0, NaN or clamps a
degenerate input (a constant or zero representation, a zero median distance)
these raise a ValueError naming the representation; SVCCA of a representation
of rank above 100 keeps the same number of directions as repsim but, where
its threshold splits equal singular values, possibly other ones (repsim's
choice there is Eigen's rounding); PWCCA where canonical correlations tie
may weigh them otherwise (the canonical directions are not unique there).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np
import torch

from ..similarity import cca as _cca  # noqa: F401  (registers the measures)
from ..similarity import kernels as _kernels
from ..similarity.measure import MEASURES

__version__ = "0.1.5"
__all__ = ["__version__", "repsim_kernels", "repsim_hsic", "cca", "cka", "dot_product", "hsic", "pwcca", "svcca"]

_BANDWIDTH = {"linear": 0.5, "rbf": 1.0, "rbf_mean": 2 ** -0.5, "rbf_dualmed": 1.0}  # repsim's sigma rules


def repsim_hsic():
    """The HSIC estimators: ["gretton", "song", "lange"]."""
    return ["gretton", "song", "lange"]


def repsim_kernels():
    """The kernels: ["linear", "rbf", "rbf_mean", "rbf_dualmed"]."""
    return ["linear", "rbf", "rbf_mean", "rbf_dualmed"]


def _aux_checker(mats, func_name):
    """repsim's input checks, with its exception types and messages."""
    if not isinstance(mats, (list, tuple)):
        raise TypeError(f"{func_name}(): `mats` must be a list or tuple of array-like 2D matrices")
    if len(mats) == 0:
        raise ValueError(f"{func_name}(): `mats` must not be empty")
    out, nrows = [], None
    for i, X in enumerate(mats):
        try:
            X = np.asarray(X.detach().cpu() if isinstance(X, torch.Tensor) else X, dtype=float, order="C")
        except Exception as e:
            raise TypeError(f"{func_name}(): mats[{i}] could not be converted to a NumPy array") from e
        if X.ndim != 2:
            raise ValueError(f"{func_name}(): mats[{i}] must be 2D (got shape {X.shape})")
        if nrows is None:
            nrows = X.shape[0]
        elif X.shape[0] != nrows:
            raise ValueError(f"{func_name}(): all matrices must have the same number of rows (samples); "
                             f"found {nrows} and {X.shape[0]} at index {i}")
        if not np.isfinite(X).all():
            raise ValueError(f"{func_name}(): mats[{i}] contains NaN or Inf values")
        out.append(torch.from_numpy(X))
    return out


def _option(value, default, choices, message):
    """repsim's reading of a string option: None or blank -> default, else stripped and lower-cased."""
    if value is None or (isinstance(value, str) and len(value.strip()) == 0):
        return default
    value = value.strip().lower()
    if value not in choices:
        raise ValueError(message)
    return value


def _run(m, mats, func_name) -> np.ndarray:
    reps = _aux_checker(mats, func_name)
    if reps[0].shape[0] < m.min_samples:
        raise ValueError(f"{func_name}(): {m.name} needs at least {m.min_samples} samples, got {reps[0].shape[0]}")
    reduced = []
    for i, X in enumerate(reps):
        if X.shape[1] == 0:
            raise ValueError(f"{func_name}(): mats[{i}] has no columns")
        reduced.append(m.reduce(X))
    try:
        return m.matrix(reduced).numpy()
    except ValueError as error:  # name the representation as repsim's users know it
        raise ValueError(f"{func_name}(): " + re.sub(r"the representation at position (\d+)", r"mats[\1]",
                                                     str(error))) from None


def cca(mats: Sequence, summary_type: Optional[str] = None) -> np.ndarray:
    """Pairwise CCA similarities, (M, M): "yanai" (default) the mean squared
    canonical correlation, "pillai" the mean canonical correlation, each over
    the smaller rank of the raw inputs."""
    summary = _option(summary_type, "yanai", {"yanai", "pillai"},
                      "* cca : summary_type must be one of {'yanai', 'pillai'}.")
    name = "mean_r2_cca" if summary == "yanai" else "mean_cca"
    return _run(MEASURES[name](denominator="raw_rank"), mats, "cca")


def svcca(mats: Sequence, summary_type: Optional[str] = None) -> np.ndarray:
    """Pairwise SVCCA similarities, (M, M), as repsim 0.1.5: 99% variance."""
    summary = _option(summary_type, "yanai", {"yanai", "pillai"},
                      "* svcca : summary_type must be one of {'yanai', 'pillai'}.")
    m = MEASURES["svcca"](variance=0.99, summary=summary, denominator="raw_rank", svd_input="whitened")
    return _run(m, mats, "cca")


def pwcca(mats: Sequence) -> np.ndarray:
    """Pairwise PWCCA similarities, (M, M), both weighting sides averaged."""
    return _run(MEASURES["pwcca"](symmetric=True), mats, "cca")


def dot_product(mats: Sequence) -> np.ndarray:
    """Pairwise |X_i' X_j|_F^2 of the raw matrices, (M, M)."""
    return _run(MEASURES["dot_product"](centered=False), mats, "dot_product")


def _kernel_measure(name, mats, kernel_type, estimator, func_name):
    kernel = _option(kernel_type, "rbf", set(repsim_kernels()),
                     f"* {name} : kernel_type must be one of {repsim_kernels()}.")
    estimator = _option(estimator, "gretton", set(repsim_hsic()),
                        f"* {name} : estimator must be one of {repsim_hsic()}.")
    reps = _aux_checker(mats, func_name)
    if reps[0].shape[0] < 4:
        estimator = "gretton"  # repsim's fallback for the unbiased estimators
    m = MEASURES["hsic"](kernel=kernel, bandwidth=_BANDWIDTH[kernel], estimator=estimator, median="midpoint",
                         unbiased=estimator != "gretton")
    if reps[0].shape[0] < 2:
        raise ValueError(f"{func_name}(): {name} needs at least 2 samples, got {reps[0].shape[0]}")
    try:
        reduced = [m.reduce(X) for X in reps]
    except ValueError as error:
        raise ValueError(f"{func_name}(): {error}") from None
    return m, reduced


def hsic(mats: Sequence, kernel_type: Optional[str] = None, estimator: Optional[str] = None) -> np.ndarray:
    """Pairwise HSIC, (M, M); kernel "rbf" and estimator "gretton" by default."""
    m, reduced = _kernel_measure("hsic", mats, kernel_type, estimator, "cka")
    return m.matrix(reduced).numpy()


def cka(mats: Sequence, kernel_type: Optional[str] = None, estimator: Optional[str] = None) -> np.ndarray:
    """Pairwise CKA, (M, M): HSIC by the estimator over the square roots of the
    gretton self-HSICs (repsim's normalisation), diagonal 1."""
    m, reduced = _kernel_measure("cka", mats, kernel_type, estimator, "cka")
    h = m.matrix(reduced)
    norms = _kernels._self_hsic(reduced, "gretton") if m._estimator != "gretton" else h.diagonal()
    for i, a in enumerate(reduced):
        if a.constant or not norms[i] > 0:
            raise ValueError(f"cka(): mats[{i}] is constant: HSIC(K, K) is 0 and CKA is undefined")
    out = h / torch.outer(norms.sqrt(), norms.sqrt())
    out.diagonal().fill_(1.0)
    return out.numpy()
