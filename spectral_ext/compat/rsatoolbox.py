"""rsatoolbox 0.3.2's RDM calculation and comparison with its call shapes,
computed by spectral_ext: change ``from rsatoolbox.rdm import calc_rdm,
compare`` (or ``rsatoolbox.rdm.calc_rdm``/``compare``) to ``from
spectral_ext.compat.rsatoolbox import calc_rdm, compare``. It takes and
returns rsatoolbox's own objects (``rsatoolbox.data.Dataset`` and lists of
them, ``rsatoolbox.rdm.RDMs`` or numpy vectors), so rsatoolbox must be
installed.

Computed here (the same numbers to rounding, ~1e-15; the same RDMs objects
with the same descriptors, sorting and dissimilarity_measure; the same
exceptions and NaN):

- ``calc_rdm(dataset, method, descriptor, noise, cv_descriptor, prior_lambda,
  prior_weight, remove_mean)`` for method "euclidean" (rsatoolbox's squared
  Euclidean distance / channels), "correlation" (1 - Pearson; a constant
  pattern gives NaN with numpy's RuntimeWarning, as rsatoolbox) and
  "mahalanobis" without noise (rsatoolbox's Euclidean); a list of datasets
  gives one RDMs object (concat, or from_partials with a descriptor).
  ``calc_rdm_euclidean`` and ``calc_rdm_correlation`` likewise. Patterns are
  averaged per descriptor value by rsatoolbox's own _parse_input.
- ``compare(rdm1, rdm2, method, sigma_k)`` and ``compare_cosine``,
  ``compare_correlation`` ("corr"), ``compare_spearman``, ``compare_rho_a``,
  ``compare_kendall_tau`` ("kendall"/"tau-b", scipy's tau-b),
  ``compare_kendall_tau_a`` ("tau-a"): the (n1, n2) array of every pair, each
  RDM reduced once (ranked once; ``compare(rdms, rdms)`` ranks them once), the
  products in one matmul, Kendall's tau from each vector's sort order by
  scipy's count of discordant pairs (exact integers). NaN entries are
  dropped as rsatoolbox drops them (the same ValueError when their positions
  differ); an all-zero (after centring or ranking: constant) vector gives 0
  in the cosine-based comparisons, as in rsatoolbox. Where a stack holds
  such a vector, rsatoolbox 0.3.2's _cosine misplaces the other values
  (np.putmask repeats them by flat position); we give every pair the value
  rsatoolbox gives that pair alone.

Delegated to rsatoolbox unchanged (not plain formulas): calc_rdm's
"mahalanobis" with noise, "crossnobis", "poisson", "poisson_cv"; compare's
"corr_cov", "cosine_cov", "neg_riem_dist", "bures", "bures_metric" and the
functions behind them. Unknown methods raise rsatoolbox's errors
(NotImplementedError in calc_rdm, ValueError('Unknown RDM comparison method
requested!') in compare). Differences: float32 measurements are computed in
float64 and the result cast to float32 (rsatoolbox computes in float32)."""
from __future__ import annotations

import importlib
from collections.abc import Iterable

import numpy as np
import torch
from rsatoolbox.rdm import RDMs
from rsatoolbox.rdm.compare import (compare_bures_metric, compare_bures_similarity,
                                    compare_correlation_cov_weighted, compare_cosine_cov_weighted,
                                    compare_neg_riemannian_distance)

from ..similarity.rsa import _average_ranks, _rdm_one, _Tau, _tau

# the modules themselves (rsatoolbox.rdm.compare the attribute is the function), looked
# up at call time so that patches of their helpers (as rsatoolbox's own tests do) apply
_calc = importlib.import_module("rsatoolbox.rdm.calc")
_cmp = importlib.import_module("rsatoolbox.rdm.compare")

__all__ = ["RDMs", "calc_rdm", "calc_rdm_correlation", "calc_rdm_euclidean", "compare",
           "compare_bures_metric", "compare_bures_similarity", "compare_correlation",
           "compare_correlation_cov_weighted", "compare_cosine", "compare_cosine_cov_weighted",
           "compare_kendall_tau", "compare_kendall_tau_a", "compare_neg_riemannian_distance",
           "compare_rho_a", "compare_spearman"]


# ---------------------------------------------------------------------------------------------
# calc_rdm


def _measurements_rdm(measurements, metric: str) -> np.ndarray:
    m = np.asarray(measurements)
    out_dtype = np.result_type(m.dtype, np.float64) if m.dtype != np.float32 else np.float32
    v = _rdm_one(torch.from_numpy(np.ascontiguousarray(m, dtype=np.float64)), metric)
    return v.numpy().astype(out_dtype, copy=False)


def calc_rdm_euclidean(dataset, descriptor=None, remove_mean: bool = False):
    """rsatoolbox.rdm.calc_rdm_euclidean: ||x_i - x_j||^2 / n_channel."""
    measurements, desc = _calc._parse_input(dataset, descriptor, remove_mean)
    rdm = _measurements_rdm(measurements, "euclidean")
    return _calc._build_rdms(rdm, dataset, "squared euclidean", descriptor, desc)


def calc_rdm_correlation(dataset, descriptor=None):
    """rsatoolbox.rdm.calc_rdm_correlation: 1 - the Pearson correlation of patterns."""
    measurements, desc = _calc._parse_input(dataset, descriptor, remove_mean=True)
    rdm = _measurements_rdm(measurements, "correlation")
    return _calc._build_rdms(rdm, dataset, "correlation", descriptor, desc)


def _calc_rdm_single(dataset, method, descriptor, noise, cv_descriptor, prior_lambda, prior_weight,
                     remove_mean):
    if method == "euclidean" or (method == "mahalanobis" and noise is None):
        rdm = calc_rdm_euclidean(dataset, descriptor, remove_mean)
    elif method == "correlation":
        rdm = calc_rdm_correlation(dataset, descriptor)
    else:  # rsatoolbox's own (and its NotImplementedError for unknown methods)
        return _calc._calc_rdm_single(dataset, method, descriptor, noise, cv_descriptor, prior_lambda,
                                      prior_weight, remove_mean)
    if descriptor is not None:
        rdm.sort_by(reindex=True, **{descriptor: "alpha"})
    return rdm


def calc_rdm(dataset, method: str = "euclidean", descriptor=None, noise=None, cv_descriptor=None,
             prior_lambda: float = 1.0, prior_weight: float = 0.1, remove_mean: bool = False):
    """rsatoolbox.rdm.calc_rdm: the RDMs of a Dataset (one RDM) or of a list
    of Datasets (one RDMs object holding one RDM each)."""
    if isinstance(dataset, Iterable):
        rdms = []
        for i_dat, ds_i in enumerate(dataset):
            noise_i = noise[i_dat] if isinstance(noise, Iterable) else noise
            rdms.append(_calc_rdm_single(ds_i, method, descriptor, noise_i, cv_descriptor, prior_lambda,
                                         prior_weight, remove_mean))
        if descriptor is None:
            return _calc.concat(rdms)
        return _calc.from_partials(rdms, descriptor=descriptor)
    return _calc_rdm_single(dataset, method, descriptor, noise, cv_descriptor, prior_lambda, prior_weight,
                            remove_mean)


# ---------------------------------------------------------------------------------------------
# compare


def _vectors(rdm1, rdm2):
    """rsatoolbox's parsing (vectors, NaN entries dropped, its ValueErrors) as
    float64 tensors; the second is the first when rdm1 is rdm2."""
    v1, v2, _ = _cmp._parse_input_rdms(rdm1, rdm2)
    t1 = torch.from_numpy(np.asarray(v1, dtype=np.float64))
    t2 = t1 if rdm1 is rdm2 else torch.from_numpy(np.asarray(v2, dtype=np.float64))
    return t1, t2


def _cosine(t1: torch.Tensor, t2: torch.Tensor) -> np.ndarray:
    """rsatoolbox's _cosine: all inner products over the norms, 0 where a vector is 0."""
    n1 = torch.linalg.vector_norm(t1, dim=1)
    n2 = n1 if t2 is t1 else torch.linalg.vector_norm(t2, dim=1)
    cos = t1 @ t2.T
    cos /= n1[:, None]
    cos /= n2[None, :]
    ok = (n1 > 0)[:, None] & (n2 > 0)[None, :]
    if not bool(ok.all()):
        cos = torch.where(ok, cos, torch.zeros_like(cos))
    return cos.numpy()


def _centred(t: torch.Tensor) -> torch.Tensor:
    return t - t.mean(1, keepdim=True)


def _ranked_centred(t1, t2):
    r1 = _centred(_average_ranks(t1))
    return r1, (r1 if t2 is t1 else _centred(_average_ranks(t2)))


def compare_cosine(rdm1, rdm2):
    """rsatoolbox.rdm.compare_cosine: the cosine of every pair of RDM vectors."""
    return _cosine(*_vectors(rdm1, rdm2))


def compare_correlation(rdm1, rdm2):
    """rsatoolbox.rdm.compare_correlation: the Pearson correlation of every pair."""
    t1, t2 = _vectors(rdm1, rdm2)
    c1 = _centred(t1)
    return _cosine(c1, c1 if t2 is t1 else _centred(t2))


def compare_spearman(rdm1, rdm2):
    """rsatoolbox.rdm.compare_spearman: the Pearson correlation of average ranks."""
    return _cosine(*_ranked_centred(*_vectors(rdm1, rdm2)))


def compare_rho_a(rdm1, rdm2):
    """rsatoolbox.rdm.compare_rho_a: 12 <r1 - mean, r2 - mean> / (n^3 - n) of the ranks."""
    r1, r2 = _ranked_centred(*_vectors(rdm1, rdm2))
    n = r1.shape[1]
    return ((r1 @ r2.T) / (n ** 3 - n) * 12).numpy()


def _taus(rdm1, rdm2, variant: str) -> np.ndarray:
    v1, v2, _ = _cmp._parse_input_rdms(rdm1, rdm2)
    if v1.shape[1] < 2:  # no pair of entries: rsatoolbox's and scipy's own corner cases
        func = _cmp._tau_a if variant == "a" else _cmp._kendall_tau
        return _cmp._all_combinations(v1, v2, func)
    a = [_Tau(np.asarray(v, dtype=np.float64)) for v in v1]
    b = a if rdm1 is rdm2 else [_Tau(np.asarray(v, dtype=np.float64)) for v in v2]
    value = np.empty((len(a), len(b)))
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            if b is a and j < i:
                value[i, j] = value[j, i]
            else:
                value[i, j] = _tau(ai, bj, variant)
    return value


def compare_kendall_tau(rdm1, rdm2):
    """rsatoolbox.rdm.compare_kendall_tau: scipy's Kendall tau-b of every pair
    (NaN where a vector is constant)."""
    return _taus(rdm1, rdm2, "b")


def compare_kendall_tau_a(rdm1, rdm2):
    """rsatoolbox.rdm.compare_kendall_tau_a: (concordant - discordant) / (n(n-1)/2)."""
    return _taus(rdm1, rdm2, "a")


def compare(rdm1, rdm2, method: str = "cosine", sigma_k=None):
    """rsatoolbox.rdm.compare: the (n_rdm1, n_rdm2) similarities of every pair
    of RDMs by `method` (see the module's docstring for which are computed
    here and which are rsatoolbox's own)."""
    if method == "cosine":
        return compare_cosine(rdm1, rdm2)
    if method == "spearman":
        return compare_spearman(rdm1, rdm2)
    if method == "corr":
        return compare_correlation(rdm1, rdm2)
    if method in ("kendall", "tau-b"):
        return compare_kendall_tau(rdm1, rdm2)
    if method == "tau-a":
        return compare_kendall_tau_a(rdm1, rdm2)
    if method == "rho-a":
        return compare_rho_a(rdm1, rdm2)
    if method == "corr_cov":
        return compare_correlation_cov_weighted(rdm1, rdm2, sigma_k=sigma_k)
    if method == "cosine_cov":
        return compare_cosine_cov_weighted(rdm1, rdm2, sigma_k=sigma_k)
    if method == "neg_riem_dist":
        return compare_neg_riemannian_distance(rdm1, rdm2, sigma_k=sigma_k)
    if method == "bures":
        return compare_bures_similarity(rdm1, rdm2)
    if method == "bures_metric":
        return compare_bures_metric(rdm1, rdm2)
    raise ValueError("Unknown RDM comparison method requested!")
