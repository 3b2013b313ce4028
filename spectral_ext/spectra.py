"""Spectra of weight matrices (seed 001 sections 3-4): the empirical spectral
distribution (ESD) of each layer's Gram matrix for the unfolding W1 =
weight.reshape(out, in*k*k), the Toeplitz matrization W2 of a convolution on
an m x m input (via the FFT, never built), power-law fits of the ESD tail and
the capacity metric alpha-hat (equation 12).

One spectrum per weight serves every metric (ESD, numerical and stable rank,
lambda_max, alpha): float64 Gram matrices of the smaller side and eigvalsh,
batched over weights of one shape (_linalg.gram_singular_values). How a
weight becomes a spectrum and how its tail is fitted is a PowerLawConvention:
seed 001's (SEED001) is the default; WeightWatcher 0.7.7's
(compat.weightwatcher.WEIGHTWATCHER) is passed in, or named
(convention="weightwatcher", power_law_convention)."""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from numbers import Real

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import _checks
from ._hooks import models_in_eval_mode
from ._linalg import gram_singular_values
from .layers import weight_of
from .rank import _rank_of_singular_values
from .rank.matrix import _exponents, _times_exp2

def esd(W: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the unnormalised Gram matrix W1 W1^T (seed 001 section 4), in decreasing order.

    The squared singular values of W1, W unfolded row-major (float64 Gram route, weight_singular_values).

    Args:
        W: a Linear weight (out, in) or a conv weight (out, in, *kernel).

    Returns:
        A float64 tensor of the min(out, in * kernel) eigenvalues, decreasing.
    """
    _checks.tensor("W", W, ndims=range(2, 6), shape="(out, in) or (out, in, *kernel)")
    return weight_singular_values(W[None])[0, 0].square()


def toeplitz_singular_values(weight: torch.Tensor, m: int | tuple[int, int]) -> torch.Tensor:
    """Singular values of a 2-d convolution as a linear operator on (in, m, m) inputs.

    The Toeplitz matrization W2 of seed 001 section 3.2, with circular padding and stride 1, by Sedghi, Gupta
    and Long's theorem: they are the union over the m^2 frequencies (u, v) of the singular values of the
    (out, in) matrix of the kernel's 2-d DFT at (u, v). Costs m^2 small SVDs instead of one (out m^2, in m^2)
    matrix.

    With zero padding W2 is a Toeplitz (not circulant) operator: its singular values differ from these by
    boundary effects that shrink as m grows relative to the kernel (build W2 explicitly on a small m to see
    them).

    Args:
        weight: a Conv2d weight (out, in, kh, kw).
        m: the input size, an int (m x m) or a pair (mh, mw), at least the kernel size.

    Returns:
        A float64 tensor of all out x ... values (min(out, in) per frequency), decreasing.
    """
    _checks.tensor("weight", weight, ndims=(4,), shape="(out, in, kh, kw)")
    mh, mw = _checks.int_pair("m", m)
    if mh < weight.shape[2] or mw < weight.shape[3]:
        raise ValueError(f"m must be at least the kernel size {tuple(weight.shape[2:])}, got {(mh, mw)}")
    transforms = torch.fft.fft2(weight.double(), s=(mh, mw))  # (out, in, mh, mw)
    blocks = transforms.permute(2, 3, 0, 1)  # (mh, mw, out, in)
    return torch.linalg.svdvals(blocks).reshape(-1).sort(descending=True).values


def circular_conv_matrix(weight: torch.Tensor, m: int) -> torch.Tensor:
    """W2 of seed 001 section 3.2 built explicitly for a circular-padded stride-1 convolution on (in, m, m) inputs.

    For checks on small sizes: column j is the flattened response to the j-th basis input.

    Args:
        weight: a Conv2d weight (out, in, kh, kw).
        m: the input size (m x m).

    Returns:
        The matrix (out m^2, in m^2), in weight's dtype.
    """
    out, c, kh, kw = weight.shape
    basis = torch.eye(c * m * m, dtype=weight.dtype).reshape(-1, c, m, m)
    padded = nn.functional.pad(basis, (0, kw - 1, 0, kh - 1), mode="circular")
    response = nn.functional.conv2d(padded, weight)
    return response.reshape(c * m * m, -1).T


# ---------------------------------------------------------------------------------------------
# Power-law fits of ESD tails, vectorised over every candidate xmin and batched over spectra

CONVENTIONS = ("seed001", "weightwatcher")  # the conventions known by name (power_law_convention)
# A tail spanning less than this (xmax < (1 + FLAT_TAIL_RTOL) xmin) has an MLE alpha above 1 / ln(1.001) + 1 = 1,001:
# such a number describes the rounding of a flat spectrum (an orthogonal initialisation: every eigenvalue 1 to
# float32 precision), not a power law, so seed 001's fit does not take such a tail as xmin.
FLAT_TAIL_RTOL = 1e-3
_FULL_SCAN_ELEMENTS = 1 << 17  # (rows x tail pairs) per block of the exhaustive scan: 1 MiB, in cache
_EXHAUSTIVE_N = 384  # longer spectra are scanned one at a time with lower bounds first


@dataclasses.dataclass(frozen=True)
class PowerLawConvention:
    """How a weight becomes a spectrum and how a power law is fitted to the
    tail of its ESD: every rule in which seed 001 and WeightWatcher differ.
    The fit itself is one (the continuous MLE alpha = 1 + n / sum ln(x_i /
    xmin) of Clauset, Shalizi and Newman 2009, xmin chosen by the KS
    distance: fit_power_laws), read through these fields. SEED001 is the
    default; compat.weightwatcher.WEIGHTWATCHER is WeightWatcher 0.7.7's.

    Weights to matrices: kernel_slices (a Conv2d as its kh*kw slices
    W[:, :, i, j], pooled, each multiplied by slice_scale) or the unfolding
    W1 = weight.reshape(out, in*k*k); grouped_blocks (a grouped convolution
    as the diagonal blocks of its block-diagonal W1, or its weight as
    stored); kinds (the weights.WeightTensor kinds analysed, None: every
    kind). ESD: eigenvalues above evals_thresh are fitted. xmin scan:
    fixed_xmin (whether xmin= may be given), xmin_tail (the shortest tail an
    xmin may have, None: the caller's min_tail), distinct_xmin (ties tried
    once), finite_alpha (a tail of equal values is no candidate),
    flat_tail_rtol (tails spanning less are never xmin, None: no such rule).
    Small samples: below small_n values the bias-corrected alpha = 1 + (n -
    1) / sum ln(x_i / xmin) over tails of at least small_n_min_tail;
    fallback (WWFit's: where no candidate qualifies, the first one refused,
    KS 1; below small_n the whole sample). two_sided_ks: the KS distance of
    Clauset et al. or its lower side only. failed_status: the status of a
    failed fit (None: why it failed). alpha-hat: alpha_hat_log of lambda_max
    times alpha, the mean over layers (alpha_hat_mean) or the sum. name:
    the convention's name in tables (attrs["convention"]); title: whose it
    is, in notes."""

    name: str
    title: str
    kernel_slices: bool = False
    slice_scale: float = 1.0
    grouped_blocks: bool = True
    kinds: tuple[str, ...] | None = None
    evals_thresh: float = 0.0
    fixed_xmin: bool = True
    xmin_tail: int | None = None
    distinct_xmin: bool = True
    finite_alpha: bool = True
    flat_tail_rtol: float | None = FLAT_TAIL_RTOL
    small_n: int = 0
    small_n_min_tail: int = 0
    fallback: bool = False
    two_sided_ks: bool = True
    failed_status: str | None = None
    alpha_hat_log: Callable = np.log
    alpha_hat_mean: bool = False

    def analyses(self, kind: str) -> bool:
        """Whether weights of this kind (weights.WeightTensor.kind, layers.LinearMap.kind) are analysed."""
        return self.kinds is None or kind in self.kinds


SEED001 = PowerLawConvention("seed001", "seed 001")  # the ESD of W1 W1^T, section 4


def power_law_convention(convention) -> PowerLawConvention:
    """The PowerLawConvention a `convention=` argument stands for: the one
    place where a name becomes a convention.

    Args:
        convention: a PowerLawConvention, or one of the names CONVENTIONS:
            "seed001" (SEED001) or "weightwatcher"
            (compat.weightwatcher.WEIGHTWATCHER).

    Returns:
        The PowerLawConvention."""
    if isinstance(convention, PowerLawConvention):
        return convention
    if isinstance(convention, str) and convention == "seed001":
        return SEED001
    if isinstance(convention, str) and convention == "weightwatcher":
        from .compat.weightwatcher import WEIGHTWATCHER  # deferred: the adapter builds on this module
        return WEIGHTWATCHER
    raise ValueError(f"convention must be a PowerLawConvention or one of {CONVENTIONS}, got {convention!r}")


def _deviation(ratio, alpha, offset, n_i, two_sided):
    """KS deviations |F_fit - F_emp| of a candidate's fit at its tail points:
    ratio = x_j / xmin, offset = j - i, n_i the tail size (broadcasting
    arrays). F_fit = 1 - ratio^(1 - alpha); F_emp steps from offset / n_i to
    (offset + 1) / n_i at x_j (two-sided, Clauset et al.), or takes the lower
    value only (one-sided, WeightWatcher's WWFit)."""
    fitted = 1 - ratio ** (1 - alpha)
    low = offset / n_i
    d = np.abs(fitted - low)
    if two_sided:
        d = np.maximum(d, np.abs(low + 1 / n_i - fitted))
    return d


def _scan_all(logs, valid, alphas, two_sided):
    """Exact KS distance of every candidate (rows x candidates; invalid ones
    +inf), computed at once over blocks of rows for the tail pairs j >= i
    only: for short spectra. logs: ln x (any value where x <= 0: those are
    never in a valid candidate's tail); (x_j / x_i)^(1 - alpha) is taken as
    exp((1 - alpha)(ln x_j - ln x_i)), in place, over blocks that stay in
    cache (2.5x faster than the power of a ratio over the whole batch)."""
    rows, n = logs.shape
    out = np.full((rows, n), np.inf)
    i, j = np.triu_indices(n)  # row-major: the pairs of candidate i are contiguous
    starts = np.r_[0, np.cumsum(n - np.arange(n - 1))]
    n_i = (n - i).astype(np.float64)
    low = (j - i) / n_i  # the empirical CDF just below x_j
    step = max(1, _FULL_SCAN_ELEMENTS // len(i))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for r in range(0, rows, step):
            vb = valid[r:r + step]
            if not vb.any():
                continue
            lb = logs[r:r + step]
            fitted = lb[:, j]
            fitted -= lb[:, i]
            fitted *= 1 - alphas[r:r + step, i]
            np.exp(fitted, out=fitted)
            np.subtract(1, fitted, out=fitted)  # F_fit = 1 - (x_j / x_i)^(1 - alpha)
            d = np.abs(fitted - low)
            if two_sided:
                np.maximum(d, np.abs(low + 1 / n_i - fitted), out=d)
            out[r:r + step] = np.where(vb, np.maximum.reduceat(d, starts, axis=1), np.inf)
    return out


def _scan_pruned(x, candidates, alphas, two_sided, block: int = 64):
    """(position in candidates, KS distance) of the best candidate of one long
    spectrum, exactly as an exhaustive scan finds it (the first on ties), at a
    fraction of its cost: a maximum over a subset of the tail points is a
    lower bound of each candidate's distance; candidates are then scanned
    exactly in increasing order of their bound until the bound exceeds the
    best distance found. Hand-written: no library offers a pruned KS scan."""
    n = len(x)
    stride = max(1, n // 256)
    grid = np.unique(np.r_[np.arange(0, n, stride), n - 1])
    n_i = (n - candidates).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        bound = np.empty(len(candidates))
        for s in range(0, len(candidates), 512):
            c, a, m = candidates[s:s + 512, None], alphas[s:s + 512, None], n_i[s:s + 512, None]
            d = _deviation(x[grid][None, :] / x[c], a, grid[None, :] - c, m, two_sided)
            bound[s:s + 512] = np.where(grid[None, :] >= c, d, 0.0).max(-1)
        order = np.argsort(bound, kind="stable")
        best_d, best_k = np.inf, -1
        for s in range(0, len(order), block):
            ks = order[s:s + block]
            ks = ks[bound[ks] <= best_d * (1 + 1e-12)]
            if not len(ks):
                break
            lo = int(candidates[ks].min())
            j = np.arange(lo, n)
            c, a, m = candidates[ks, None], alphas[ks, None], n_i[ks, None]
            d = _deviation(x[None, lo:] / x[c], a, j[None, :] - c, m, two_sided)
            d = np.where(j[None, :] >= c, d, 0.0).max(-1)
            for k, value in zip(ks, d):
                if value < best_d or (value == best_d and k < best_k):
                    best_d, best_k = float(value), int(k)
    return best_k, best_d


def _best_candidates(x, logs, valid, alphas, two_sided):
    """Per row: (index of the best valid candidate or -1, its KS distance); logs: ln x where x > 0."""
    rows, n = x.shape
    best = np.full(rows, -1)
    dist = np.full(rows, np.inf)
    if n == 0:
        return best, dist
    if n <= _EXHAUSTIVE_N:
        d = _scan_all(logs, valid, alphas, two_sided)
        best = np.argmin(d, axis=1)
        dist = d[np.arange(rows), best]
        best = np.where(np.isfinite(dist), best, -1)
        return best, dist
    for r in range(rows):
        candidates = np.flatnonzero(valid[r])
        if len(candidates):
            k, dist[r] = _scan_pruned(x[r], candidates, alphas[r, candidates], two_sided)
            best[r] = candidates[k]
    return best, dist


def _real_values(values, name="eigenvalues") -> torch.Tensor:
    """A tensor of `values` (a tensor, an array or a list: lists read in float64,
    not torch's float32 default), refused by name when it holds no numbers."""
    if isinstance(values, torch.Tensor):
        return values
    if isinstance(values, (str, bytes)) or values is None:
        raise TypeError(f"{name} must be a tensor, an array or a list of numbers, got {type(values).__name__}")
    try:
        array = np.asarray(values)
        if array.dtype.kind not in "biufc":
            raise TypeError
        return torch.as_tensor(array if array.dtype.kind == "c" else array.astype(np.float64))
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a tensor, an array or a list of numbers, got {type(values).__name__}") \
            from error


def _sorted_rows(eigenvalues, name="eigenvalues"):
    t = _real_values(eigenvalues, name)
    if t.is_complex():  # .double() would drop the imaginary parts
        raise TypeError(f"{name} must be real, got {str(t.dtype).replace('torch.', '')}: pass the real eigenvalues "
                        "(eigvalsh, or .real where the imaginary parts are rounding)")
    x = np.asarray(t.detach().double().cpu(), dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be 1-d or a batch (rows, n), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.sort(x, axis=1)


def fit_power_laws(eigenvalues, xmin: float | None = None, min_tail: int = 10,
                   convention: PowerLawConvention | str = "seed001") -> PowerLawFits:
    """fit_power_law (the ESD power law of seed 001 section 4) of each row of
    a batch (rows, n) of spectra, vectorised over rows and candidate xmin (or
    at the given xmin: see fit_power_law).

    Args:
        eigenvalues: a batch (rows, n) of real spectra (or one 1-d spectrum).
        xmin: None (scan) or a positive finite xmin for every row.
        min_tail: the shortest tail (where the convention uses it).
        convention: a PowerLawConvention or its name (power_law_convention).

    Returns:
        A PowerLawFits: one fit per row; `.to_frame()` one DataFrame row per
        spectrum with the columns of PowerLawFit."""
    conv = power_law_convention(convention)
    _checks.positive_int("min_tail", min_tail)
    if xmin is not None:
        if not conv.fixed_xmin:
            raise ValueError(f"xmin cannot be given with convention={conv.name!r} ({conv.title}'s fit always scans)")
        if isinstance(xmin, bool) or not isinstance(xmin, Real) or not 0 < xmin < math.inf:
            raise ValueError(f"xmin must be a positive finite number or None, got {xmin!r}")
        return _fit_at(_sorted_rows(eigenvalues), float(xmin), min_tail, conv)
    x = _sorted_rows(eigenvalues)
    rows, n = x.shape
    usable = x > conv.evals_thresh
    start = n - usable.sum(1)  # usable values are a suffix of each sorted row
    count = n - start
    idx = np.arange(n)[None, :]
    n_i = (n - idx).astype(np.float64)
    logs = np.log(np.where(usable, x, 1.0))
    suffix = np.cumsum(logs[:, ::-1], axis=1)[:, ::-1]  # sum of ln x_j over j >= i
    denominator = suffix - n_i * logs
    in_data = idx >= start[:, None]
    shortest = min_tail if conv.xmin_tail is None else conv.xmin_tail
    flat = np.zeros(rows, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1 + n_i / denominator
        valid = in_data & (n_i >= shortest)
        if conv.small_n:  # few values: the bias-corrected MLE over tails of at least small_n_min_tail
            small = (count < conv.small_n)[:, None]
            eligible = ~small | ((n_i >= conv.small_n_min_tail) & (denominator > 1e-12))
            alphas = np.where(small, np.where(eligible, 1 + (n_i - 1) / denominator, 0.0), alphas)
            valid &= eligible
        if conv.distinct_xmin:
            distinct = np.ones_like(usable)
            distinct[:, 1:] = x[:, 1:] != x[:, :-1]
            valid &= distinct | (idx == start[:, None])
        valid &= alphas > 1
        if conv.finite_alpha:
            valid &= np.isfinite(alphas)
        if conv.flat_tail_rtol is not None:
            spans = x[:, -1:] >= x * (1 + conv.flat_tail_rtol)
            flat = valid.any(1) & ~(valid & spans).any(1)
            valid &= spans
    best, dist = _best_candidates(x, logs, valid, alphas, conv.two_sided_ks)
    chosen, ks = best.copy(), dist.copy()
    sigma_alpha = np.full(rows, np.nan)
    sigma_alpha[best >= 0] = alphas[best >= 0, best[best >= 0]]
    # WWFit's fallbacks, row by row (few rows): it takes the first minimum of its distances, 1 where no fit was
    # made; below small_n the whole sample is fitted when no tail of small_n_min_tail or more qualifies
    for r in np.flatnonzero((count <= 1) | (best < 0) | ~(dist < 1)) if conv.fallback else ():
        if count[r] <= 1:
            chosen[r] = -1
            continue
        invalid = np.flatnonzero(in_data[r] & (n_i[0] >= shortest) & ~valid[r])
        i = int(invalid[0]) if len(invalid) else int(chosen[r])
        sigma_alpha[r], ks[r] = alphas[r, i], 1.0
        if count[r] < conv.small_n and not valid[r].any():
            i = int(start[r])
            sigma_alpha[r] = alphas[r, i]  # WWFit's sigma was computed before this refit
            if denominator[r, i] > 1e-12:
                alphas[r, i] = 1 + (count[r] - 1) / denominator[r, i]
                with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                    ks[r] = _deviation(x[r, i:] / x[r, i], alphas[r, i], np.arange(count[r]), float(count[r]),
                                       conv.two_sided_ks).max()
        chosen[r] = i
    fitted = chosen >= 0
    at = np.maximum(chosen, 0)
    picked = np.arange(rows), at
    n_tail = np.where(fitted, n - chosen, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = (sigma_alpha - 1) / np.sqrt(n_tail)
    nan = np.nan
    failed = np.where(flat, "flat spectrum", "too few eigenvalues") if conv.failed_status is None \
        else conv.failed_status
    return PowerLawFits(
        alpha=np.where(fitted, alphas[picked] if n else nan, nan),
        xmin=np.where(fitted, x[picked] if n else nan, nan),
        xmax=np.where(fitted, x[:, -1] if n else nan, nan),
        ks=np.where(fitted, ks, nan), sigma=np.where(fitted, sigma, nan),
        n_tail=n_tail.astype(np.int64), n=count.astype(np.int64),
        status=np.where(fitted, "success", failed).astype(object), convention=conv)


def _fit_at(x: np.ndarray, xmin: float, min_tail: int, conv: PowerLawConvention) -> PowerLawFits:
    """fit_power_laws at a given xmin, for sorted rows x: the continuous MLE
    alpha = 1 + n / sum ln(x_i / xmin) over the n values x_i >= xmin (the
    given xmin itself, not the nearest value above it) and the KS distance of
    that fit on them. Fails (alpha NaN) with fewer than min_tail values above
    the convention's evals_thresh, no value >= xmin or a tail spanning less
    than its flat_tail_rtol ("flat spectrum")."""
    rows, n = x.shape
    tail = x >= xmin
    first = n - tail.sum(1)  # the tail is a suffix of each sorted row
    n_tail = n - first
    count = (x > conv.evals_thresh).sum(1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        logs = np.where(tail, np.log(np.where(tail, x, 1.0)) - math.log(xmin), 0.0)  # no x / xmin overflow
        alpha = 1 + n_tail / logs.sum(1)
        offset = np.arange(n)[None, :] - first[:, None]
        d = _deviation(np.where(tail, x, xmin) / xmin, alpha[:, None], offset, np.maximum(n_tail, 1)[:, None],
                       conv.two_sided_ks)
        ks = np.where(tail, d, 0.0).max(1) if n else np.zeros(rows)
        sigma = (alpha - 1) / np.sqrt(n_tail)
    spans = (x[:, -1] if n else np.zeros(rows)) >= xmin * (1 + (conv.flat_tail_rtol or 0.0))
    enough = (count >= min_tail) & (n_tail > 0)
    fitted = enough & spans & np.isfinite(alpha) & (alpha > 1)
    nan = np.nan
    failed = np.where(enough, "flat spectrum", "too few eigenvalues") if conv.failed_status is None \
        else conv.failed_status
    return PowerLawFits(
        alpha=np.where(fitted, alpha, nan), xmin=np.where(fitted, xmin, nan),
        xmax=np.where(fitted, x[:, -1] if n else nan, nan), ks=np.where(fitted, ks, nan),
        sigma=np.where(fitted, sigma, nan), n_tail=np.where(fitted, n_tail, 0).astype(np.int64),
        n=count.astype(np.int64), status=np.where(fitted, "success", failed).astype(object), convention=conv)


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """fit_power_law's result: alpha, xmin, xmax, ks (the Kolmogorov-Smirnov
    distance of the tail), sigma (alpha's standard error), n_tail, n (values
    used), status. `.to_frame()` is one row with these columns."""
    alpha: float
    xmin: float
    xmax: float
    ks: float
    sigma: float
    n_tail: int
    n: int
    status: str

    def to_frame(self) -> pd.DataFrame:
        """One row with the fields as columns."""
        return pd.DataFrame([dataclasses.asdict(self)])


_FIT_COLUMNS = tuple(f.name for f in dataclasses.fields(PowerLawFit))


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no single truth value
class PowerLawFits:
    """fit_power_laws' result: one fit per spectrum of a batch, the fields of
    PowerLawFit as arrays (alpha, xmin, xmax, ks, sigma, n_tail, n, status),
    and the PowerLawConvention they follow. `.to_frame()` is one row per
    spectrum with PowerLawFit's columns."""
    alpha: np.ndarray
    xmin: np.ndarray
    xmax: np.ndarray
    ks: np.ndarray
    sigma: np.ndarray
    n_tail: np.ndarray
    n: np.ndarray
    status: np.ndarray
    convention: PowerLawConvention = SEED001

    def to_frame(self) -> pd.DataFrame:
        """One row per spectrum, PowerLawFit's columns."""
        return pd.DataFrame({column: getattr(self, column) for column in _FIT_COLUMNS})


def fit_power_law(eigenvalues, xmin: float | None = None, min_tail: int = 10,
                  convention: PowerLawConvention | str = "seed001") -> PowerLawFit:
    """Maximum-likelihood power law p(x) ~ x^-alpha for x >= xmin (Clauset,
    Shalizi and Newman 2009, section 3; as seed 001 section 4 and Martin and
    Mahoney fit ESD tails).

    alpha = 1 + n / sum ln(x_i / xmin) over the n values x_i >= xmin, with
    xmin chosen among the data to minimise the Kolmogorov-Smirnov distance
    between the tail and the fit, or the given xmin itself (a positive
    finite number; the fit and its KS distance are those at exactly that
    xmin); sigma = (alpha - 1) / sqrt(n_tail) is the MLE's standard error.
    eigenvalues must be real (complex ones are refused: their imaginary
    parts would be dropped).

    SEED001 (the default): positive values, distinct xmin with tails of at
    least min_tail, the two-sided KS distance; alpha is NaN (status "too few
    eigenvalues") with fewer than min_tail values, and (status "flat
    spectrum") where every such tail spans less than FLAT_TAIL_RTOL = 0.1%
    (an orthogonal initialisation, whose MLE alpha would be ~1e6: rounding,
    not a power law; such tails are never xmin).
    compat.weightwatcher.WEIGHTWATCHER: WeightWatcher 0.7.7's WWFit: values
    above 1e-5, every point but the last tried as xmin, the one-sided
    distance; below 20 values the bias-corrected alpha = 1 + (n - 1) / sum
    ln(x_i / xmin) over tails of at least 8 (min_tail and xmin are not used).

    The scan over xmin is vectorised (numpy over every candidate at once;
    long spectra scan candidates in order of a lower bound of their
    distance, with the same result).

    Args:
        eigenvalues: one real spectrum (1-d).
        xmin: None (scan) or a positive finite xmin.
        min_tail: the shortest tail (where the convention uses it).
        convention: a PowerLawConvention or its name (power_law_convention).

    Returns:
        A PowerLawFit (alpha, xmin, xmax, ks, sigma, n_tail, n, status)."""
    conv = power_law_convention(convention)
    if xmin is not None and not conv.fixed_xmin:
        raise ValueError(f"xmin cannot be given with convention={conv.name!r} ({conv.title}'s fit always scans)")
    eig = _real_values(eigenvalues)
    if eig.dim() != 1:
        raise ValueError(f"eigenvalues must be 1-d, got shape {tuple(eig.shape)}")
    fits = fit_power_laws(eig, xmin=xmin, min_tail=min_tail, convention=conv)
    return PowerLawFit(**{f: (int(getattr(fits, f)[0]) if f in ("n_tail", "n") else getattr(fits, f)[0]
                              if f == "status" else float(getattr(fits, f)[0])) for f in _FIT_COLUMNS})


# ---------------------------------------------------------------------------------------------
# One spectrum per weight, shared by every metric


def weight_singular_values(weights: torch.Tensor, convention: PowerLawConvention | str = "seed001", groups: int = 1,
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values (float64, decreasing) of a batch of weights of one shape, as the convention makes them
    into matrices.

    SEED001 (the default): one slice, the unfolding W1 = weight.reshape(out, in*k*k) (section 3.1), or for a
    convolution of `groups` groups (weight (B, out, in/groups, *k)) its groups diagonal blocks (out/groups,
    in/groups*k), whose singular values are those of the block-diagonal W1 (never built); with kernel_slices
    (WEIGHTWATCHER) a Conv2d is its kh*kw slices W[:, :, i, j] (out x in) times slice_scale (WeightWatcher
    0.7.7's conv2d_norm sqrt(conv2d_count / 2) = sqrt(1/2) when pooling), a Linear its weight as it is.
    Computed as the Gram matrix of the smaller side in float64 and eigvalsh, one batched call
    (_linalg.gram_singular_values); a weight whose magnitude is extreme (its squares would overflow or
    underflow float64) is divided by a power of two first and its values multiplied back.

    Args:
        weights: a batch of weights of one shape, (B, out, in, *kernel), holding data.
        convention: a PowerLawConvention or its name (default "seed001").
        groups: the convolution's groups (default 1).
        dtype: torch.float64 (default) or torch.float32: the Gram matrices and their eigenvalues in float32
            (see weight_metrics for its error).

    Returns:
        The singular values as (B, slices, k), decreasing along the last axis.
    """
    conv = power_law_convention(convention)
    _checks.tensor("weights", weights, ndims=(3, 4, 5, 6), shape="(B, out, in, *kernel)",
                   dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16))
    if weights.numel() == 0:
        raise ValueError(f"weights must not be empty, got shape {tuple(weights.shape)}")
    if _checks.data_free(weights):
        raise ValueError("weights must hold data: singular values of meta tensors have no value")
    W = weights.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
    e = _exponents(W.reshape(W.shape[0], 1, -1))  # (B, 1): one power of two per weight
    W = _times_exp2(W.reshape(W.shape[0], 1, -1), -e).reshape(W.shape)
    if conv.kernel_slices and W.dim() == 5:
        slices = W.flatten(3).permute(0, 3, 1, 2) * conv.slice_scale
    else:
        slices = W.reshape(W.shape[0], groups, W.shape[1] // groups, -1)
    return _times_exp2(gram_singular_values(slices, dtype), e)


def _too_few(n: int, min_tail: int) -> str:
    return f"too few eigenvalues ({n} < min_tail {min_tail})"


def _fit_note(status: str, n: int, min_tail: int, conv: PowerLawConvention) -> str:
    if status == "success":
        return ""
    if conv.failed_status is not None:
        return f"power-law fit {status} ({n} eigenvalues above {conv.evals_thresh:.0e})".replace("e-0", "e-")
    if status == "flat spectrum":
        return (f"flat spectrum: every tail of {min_tail} or more of the {n} eigenvalues spans less than "
                f"{conv.flat_tail_rtol:.1%} (no power law)")
    return _too_few(n, min_tail)


def _not_analysed(kind: str, conv: PowerLawConvention) -> str:
    return f"a {kind} is not analysed by {conv.title}'s convention"


def spectrum_metrics(singular_values: torch.Tensor, min_tail: int = 10,
                     convention: PowerLawConvention | str = "seed001", fit: bool = True) -> pd.DataFrame:
    """The metrics every table reports, per spectrum of a batch of weight_singular_values.

    Each row from that one spectrum (its slices pooled); the power laws are fitted together for the whole
    batch (fit_power_laws).

    Args:
        singular_values: a batch (B, slices, k) of weight_singular_values.
        min_tail: the fewest eigenvalues a power-law tail may have (default 10).
        convention: a PowerLawConvention or its name (default "seed001").
        fit: also fit the power laws (default True).

    Returns:
        A DataFrame, one row per spectrum: n_eigenvalues, numerical_rank (seed 003 equation 4 on the pooled
        singular values, the float32 tolerance), stable_rank (sum of eigenvalues over the largest),
        spectral_norm, lambda_max (largest Gram eigenvalue), and with fit the power-law alpha, xmin, ks, n_tail
        of the pooled ESD and a note saying why a fit is missing.
    """
    sigma = singular_values.detach().cpu().flatten(1).sort(dim=1, descending=True).values
    eig = sigma.square()
    top = sigma[:, 0]
    # sum (sigma_i / sigma_1)^2: the ratios first, so that no square overflows or underflows
    stable = (sigma / top.clamp_min(torch.finfo(sigma.dtype).tiny)[:, None]).square().sum(1)
    frame = pd.DataFrame({
        "n_eigenvalues": sigma.shape[1],
        "numerical_rank": _rank_of_singular_values(sigma, None).numpy(),
        "stable_rank": torch.where(top > 0, stable, torch.zeros_like(top)).numpy(),
        "spectral_norm": top.numpy(), "lambda_max": eig[:, 0].numpy()})
    if fit:
        conv = power_law_convention(convention)
        fits = fit_power_laws(eig, min_tail=min_tail, convention=conv)
        for column in ("alpha", "xmin", "ks", "n_tail"):
            frame[column] = getattr(fits, column)
        frame["note"] = [_fit_note(status, n, min_tail, conv) for status, n in zip(fits.status, fits.n)]
    return frame


def map_metrics(maps, names=None, convention: PowerLawConvention | str = "seed001", min_tail: int = 10,
                fit: bool = True, dtype: torch.dtype = torch.float64) -> pd.DataFrame:
    """The spectral metrics of each linear map from its one spectrum (seed 001 sections 3.1 and 4, seed 003
    equation 4).

    Batched over the maps whose weights share a shape (one Gram eigvalsh call and one set of power-law fits per
    shape). The one per-layer computation behind layer_spectra (the maps of one model) and zoo.model_metrics
    (a layer of many models). A map the convention does not analyse (Conv1d/Conv3d under WeightWatcher's) gets
    a note only (and alpha NaN with fit). A NaN or infinite weight raises ValueError naming its map.

    Args:
        maps: layers.LinearMap objects (groups expanded), an iterable.
        names: the maps' names, for errors (default None: "map 0", "map 1", ...).
        convention: a PowerLawConvention or its name (default "seed001").
        min_tail: the fewest eigenvalues a power-law tail may have (default 10).
        fit: also fit the power laws (default True).
        dtype: the dtype the weights are stacked in (default torch.float64).

    Returns:
        A DataFrame with spectrum_metrics' columns, one row per map in the order given.
    """
    conv = power_law_convention(convention)
    _checks.positive_int("min_tail", min_tail)
    maps = list(maps)
    names = list(names) if names is not None else [f"map {i}" for i in range(len(maps))]
    weights, groups = [], {}
    for i, linear_map in enumerate(maps):  # the stored weight: no per-map copy before the stack
        module = linear_map.module
        weights.append(weight_of(module))
        analysed = conv.analyses(linear_map.kind)
        groups.setdefault((tuple(weights[i].shape), getattr(module, "groups", 1), analysed), []).append(i)
    parts = []
    for (shape, n_groups, analysed), index in groups.items():
        stack = torch.stack([weights[i] for i in index]).to(dtype)
        if not _checks.all_finite(stack):
            bad = next(i for i in index if not _checks.all_finite(weights[i]))
            raise ValueError(f"the weight of {names[bad]} contains NaN or infinite values")
        if not analysed:
            frame = pd.DataFrame(dict({"alpha": float("nan")} if fit else {},
                                      note=[_not_analysed(maps[i].kind, conv) for i in index]))
        else:
            # a lone weight is paired with itself: batched matmuls (B >= 2) round differently from one matmul,
            # and one model's lone layer shape must give a zoo's batch of that layer's numbers (to rounding:
            # some BLAS builds round a batched product by its position in the batch)
            sigma = weight_singular_values(stack if len(index) > 1 else stack.expand(2, *stack.shape[1:]),
                                           conv, groups=n_groups if conv.grouped_blocks else 1)
            frame = spectrum_metrics(sigma[:len(index)], min_tail, conv, fit=fit)
        frame.index = index
        parts.append(frame)
    if len(parts) == 1:
        return parts[0].reset_index(drop=True)
    return pd.concat(parts).sort_index().reset_index(drop=True) if parts else pd.DataFrame(index=range(0))


WEIGHT_MEMORY = 1 << 28  # bytes of float64 weights stacked into one batched Gram call (256 MiB)


def weight_metrics(entries, convention: PowerLawConvention | str = "seed001", min_tail: int = 10, fit: bool = True,
                   memory: int = WEIGHT_MEMORY, progress: bool = False,
                   dtype: torch.dtype = torch.float64) -> pd.DataFrame:
    """map_metrics' columns for weights.WeightTensor entries, one row each in the order given.

    A grouped convolution's spectrum is the union of its diagonal blocks' (seed 001's W1 of a grouped
    convolution is block-diagonal), computed per block.

    Entries whose blocks share a shape are batched into one Gram eigvalsh
    call of at most `memory` bytes of float64 (at least one entry): loaded one
    at a time (memory-mapped files are read tensor by tensor) and freed memory
    handed back between batches, the peak beyond the process's own is about
    2 x max(memory, the largest entry in float64) (the batch and one copy of
    it in the Gram products), never the whole model. Measured: 16 float32
    tensors of 1024 x 2048 from one file with memory=16 MiB, +37 MiB; 64 of
    512 x 512 with memory 4, 16 and 64 MiB, +15, +37 and +133 MiB.
    A NaN or infinite weight raises ValueError naming its tensor.

    dtype=torch.float32: the opt-in fast route, Gram matrices and their
    eigenvalues in float32 (fits and ranks still in float64). Measured
    against float64 on the pretrained all-MiniLM-L6-v2 and on ResNet-18,
    EfficientNet-B0 and VGG11 (random weights): alpha within 6.4e-6
    relative, lambda_max and stable_rank within 1e-6, numerical rank within
    1 (MiniLM), the same layers fitted; 1.2-1.4x faster on one thread. Those
    figures are from a CPU whose vendor is not Intel, where Grams of 192
    and more go to numpy, which solves the float32 Gram's eigenproblem in
    float64; with torch's float32 eigensolver (Intel CPUs) MiniLM gave
    alpha 5.2e-6, lambda_max 1.1e-6 and stable_rank 1.0e-6 (the test holds
    both within 2e-5 and 3e-6).
    Small eigenvalues (below about 1e-7 lambda_max) are not resolved: keep
    float64 for ranks of ill-conditioned weights.

    Args:
        entries: weights.WeightTensor entries (weights.read_weights), an iterable.
        convention: a PowerLawConvention or its name (default "seed001").
        min_tail: the fewest eigenvalues a power-law tail may have (default 10).
        fit: also fit the power laws (default True).
        memory: bytes of float64 per batched Gram call (default WEIGHT_MEMORY, 256 MiB).
        progress: a bar over the bytes read (default False).
        dtype: torch.float64 (default) or torch.float32, the fast route above.

    Returns:
        A DataFrame, one row per entry: layer, kind, shape (the unfolded (out, in * kernel)), rank, groups, then
        the metrics of the entry's one spectrum, and a note saying why a row has no numbers (a vector, a tied
        head, a quantised tensor, too few eigenvalues); attrs["convention"] the convention's name.
    """
    from tqdm.auto import tqdm

    from . import weights

    conv = power_law_convention(convention)
    _checks.positive_int("min_tail", min_tail)
    entries = list(entries)
    groups: dict = {}
    for i, entry in enumerate(entries):
        if entry.analysed:
            analysed = conv.analyses(entry.kind)
            key = (entry.block_shape, entry.groups, entry.kernel if conv.kernel_slices else (), analysed)
            groups.setdefault(key, []).append(i)
    parts, since_trim = [], 0
    bar = tqdm(total=sum(e.nbytes for e in entries if e.analysed), unit="B", unit_scale=True, desc="weights",
               disable=not progress, leave=False)
    for (block_shape, n_groups, kernel, analysed), index in groups.items():
        if not analysed:
            frame = pd.DataFrame(dict({"alpha": float("nan")} if fit else {},
                                      note=[_not_analysed(entries[i].kind, conv) for i in index]))
            frame.index = index
            parts.append(frame)
            continue
        per_entry = (8 if dtype == torch.float64 else 4) * n_groups * block_shape[0] * block_shape[1]
        step = max(1, memory // max(per_entry, 1))
        for start in range(0, len(index), step):
            chunk = index[start:start + step]
            stack = torch.empty(len(chunk), n_groups, *block_shape, dtype=dtype)  # (B, groups, rows, cols)
            for k, i in enumerate(chunk):  # each converted into its place: no second copy of the batch
                _loaded_blocks(entries[i], stack[k])
            bar.update(sum(entries[i].nbytes for i in chunk))
            # the stored layout (B, out, in/groups, *kernel): blocks (W1), or kernel slices with kernel_slices
            stack = stack.reshape(len(chunk), n_groups * block_shape[0], -1, *(kernel if len(kernel) == 2 else ()))
            # a lone weight paired with itself, as map_metrics does: one model's table equals a zoo's
            small = len(chunk) == 1 and per_entry <= 1 << 23
            sigma = weight_singular_values(stack.expand(2, *stack.shape[1:]) if small else stack, conv,
                                           groups=n_groups if conv.grouped_blocks else 1,
                                           dtype=dtype)[:len(chunk)]
            frame = spectrum_metrics(sigma, min_tail, conv, fit=fit)
            frame.index = chunk
            parts.append(frame)
            del stack, sigma
            since_trim += per_entry * len(chunk)
            if since_trim >= 1 << 24:  # by bytes freed, not per batch: many small batches add up too
                weights.release_freed_memory()
                since_trim = 0
    bar.close()
    metrics = pd.concat(parts) if parts else pd.DataFrame()
    rows = pd.DataFrame({"layer": [e.layer for e in entries], "kind": [e.kind for e in entries],
                         "shape": [tuple(e.shape) for e in entries],
                         "rank": [min(e.shape) for e in entries], "groups": [e.groups for e in entries]})
    frame = rows.join(metrics.drop(columns=["note"], errors="ignore")) if len(metrics) else rows
    notes = metrics["note"] if "note" in metrics else pd.Series(dtype=object)
    frame["note"] = [entries[i].note or (notes.get(i, "") if i in notes.index else "") for i in range(len(entries))]
    for column in ("n_eigenvalues", "numerical_rank", "n_tail"):
        if column in frame:
            frame[column] = frame[column].fillna(0).astype(int)
    frame.attrs["convention"] = conv.name
    return frame


def _loaded_blocks(entry, out: torch.Tensor) -> torch.Tensor:
    blocks = entry.blocks(out.dtype, out=out)
    if not _checks.all_finite(blocks):
        raise ValueError(f"the weight {entry.source or entry.layer} contains NaN or infinite values")
    return blocks


@dataclasses.dataclass(frozen=True, eq=False)  # DataFrames have no single truth value
class LayerSpectra:
    """layer_spectra's result: its table, one row per weight (layer, kind,
    shape, rank, groups, the metrics of its one spectrum, note; with
    toeplitz_m alpha_w2, lambda_max_w2, n_w2), and the PowerLawConvention it
    follows. `.to_frame()` is the table (attrs["convention"] the
    convention's name)."""

    table: pd.DataFrame
    convention: PowerLawConvention = SEED001

    def to_frame(self) -> pd.DataFrame:
        """The table, one row per weight."""
        return self.table


@models_in_eval_mode
def layer_spectra(model, example_input=None, toeplitz_m: int | None = None,
                  min_tail: int = 10, convention: PowerLawConvention | str = "seed001", vectors: bool = False,
                  progress: bool = False, dtype: torch.dtype = torch.float64) -> LayerSpectra:
    """Spectral metrics of every weight of the model, seed 001 sections 3-4, from the weights alone.

    No input, no forward (weights.read_weights): every weight has a row, the note says why alpha is NaN (too
    few eigenvalues for min_tail, a tied head, a quantised tensor, a kind the convention does not analyse).
    Rows follow the module's registration order (a file's: its tensor names in natural order). With
    toeplitz_m, the same fit for the circular Toeplitz matrization W2 of the ungrouped 2-d convolutions on
    m x m inputs.

    Args:
        model: an nn.Module (kinds from the module types: Linear, Conv1d/2d/3d, ConvTranspose,
            MultiheadAttention's q, k, v, transformers' Conv1D, Embedding), a mapping of name -> tensor, or a
            path to a checkpoint file or a Hugging Face folder (see spectral_ext.weights for the kinds and their
            reasons).
        example_input: not used (weights need no forward; kept for the call shape).
        toeplitz_m: the input size m (or (mh, mw)) for the W2 columns, or None (default).
        min_tail: the fewest eigenvalues a power-law tail may have (default 10).
        convention: a PowerLawConvention or its name: SEED001 / "seed001" (default: the ESD of W1 W1^T,
            section 4) or WEIGHTWATCHER / "weightwatcher" (pooled, scaled kh*kw slices of a Conv2d and WWFit's
            rules, see weight_singular_values and fit_power_law; only Linear and Conv2d are analysed there).
        vectors: also a row for each 1-d tensor (biases, norm scales), with its note (default False).
        progress: a bar over the bytes read (default False).
        dtype: torch.float64 (default) or torch.float32, the opt-in fast route whose error weight_metrics
            states.

    Returns:
        A LayerSpectra; `.to_frame()` is its table, one row per weight: layer (the module's qualified name),
        kind, shape (of W1), rank (min of the shape), groups, then the metrics of its one spectrum
        (n_eigenvalues, numerical_rank, stable_rank, spectral_norm, lambda_max, alpha, xmin, ks, n_tail) and a
        note; with toeplitz_m also alpha_w2, lambda_max_w2, n_w2. Its attrs["convention"] records the
        convention's name.
    """
    from . import weights

    conv = power_law_convention(convention)
    _checks.positive_int("min_tail", min_tail)
    if toeplitz_m is not None:
        _checks.int_pair("toeplitz_m", toeplitz_m)
    entries = [e for e in weights.read_weights(model) if vectors or e.kind != "vector"]
    if not entries:
        raise ValueError("model has no weight to analyse (no Linear, Conv, Embedding or attention weight, and no "
                         "tensor of two or more dimensions)")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32 (the opt-in fast route), got {dtype!r}")
    frame = weight_metrics(entries, conv, min_tail, progress=progress, dtype=dtype)
    if toeplitz_m is not None:
        columns = {"alpha_w2": [], "lambda_max_w2": [], "n_w2": []}
        for entry in entries:
            if entry.kind == "conv2d" and entry.groups == 1 and entry.analysed:
                weight = entry.blocks()[0].reshape(entry.shape[0], -1, *entry.kernel)
                eig2 = toeplitz_singular_values(weight, toeplitz_m).square()
                fit2 = fit_power_law(eig2, min_tail=min_tail)
                values = (fit2.alpha, float(eig2[0]), int(eig2.numel()))
            else:
                values = (float("nan"), float("nan"), 0)
            for column, value in zip(columns, values):
                columns[column].append(value)
        for column, values in columns.items():
            frame[column] = values
    return LayerSpectra(frame, conv)


def alpha_hat_of(alpha, lambda_max, convention: PowerLawConvention | str = "seed001") -> float:
    """alpha-hat from per-layer alpha and lambda_max.

    SEED001's seed 001 equation 12, the sum of alpha ln(lambda_max), or WEIGHTWATCHER's mean of WeightWatcher's
    alpha_weighted = alpha log10(lambda_max) (the convention's alpha_hat_log and alpha_hat_mean). Layers whose
    alpha is NaN are left out. The one rule behind alpha_hat and zoo.model_metrics' alpha_hat column
    (alpha_hats).

    Args:
        alpha: per-layer power-law exponents (array-like).
        lambda_max: per-layer largest eigenvalues (array-like, alpha's length).
        convention: a PowerLawConvention or its name (default "seed001").

    Returns:
        alpha-hat, a float; NaN when no layer is left.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    return float(alpha_hats(alpha[None], np.asarray(lambda_max, dtype=np.float64)[None], convention)[0])


def alpha_hats(alpha: np.ndarray, lambda_max: np.ndarray,
               convention: PowerLawConvention | str = "seed001") -> np.ndarray:
    """alpha_hat_of for each row of (models, layers) arrays at once.

    Args:
        alpha: the exponents, (models, layers); NaN for layers without a fit.
        lambda_max: the largest eigenvalues, (models, layers).
        convention: a PowerLawConvention or its name (default "seed001").

    Returns:
        A float array (models,) of alpha-hats, NaN for a row without a usable layer.
    """
    conv = power_law_convention(convention)
    usable = ~np.isnan(alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(usable, alpha * conv.alpha_hat_log(np.where(usable, lambda_max, 1.0)), 0.0)
        total = terms.sum(1)
        return np.where(usable.any(1), total / usable.sum(1) if conv.alpha_hat_mean else total, np.nan)


@models_in_eval_mode
def alpha_hat(model_or_frame, example_input=None, min_tail: int = 10,
              convention: PowerLawConvention | str | None = None, embeddings: bool = False) -> float:
    """Capacity metric alpha-hat = sum over layers of alpha_L * ln(lambda_max_L) (seed 001 equation 12, Martin
    and Mahoney).

    Takes a model or the layer_spectra frame it is given (no spectrum is recomputed then). Layers without a
    fit (fewer than min_tail eigenvalues, see the frame's note column) are left out, and a warning names them:
    the result says which layers it used. The sum runs over the maps between representations (Linear, Conv,
    ConvTranspose, attention projections, LoRA updates); embeddings (kind "embedding", tied heads included)
    only with embeddings=True: seed 001 sums over the network's layers, and a lookup table's spectrum
    describes its vocabulary, not a layer's map.

    Args:
        model_or_frame: anything layer_spectra takes (a module, a state_dict, a checkpoint path), its
            LayerSpectra or their frame.
        example_input: not used (kept for the call shape).
        min_tail: the fewest eigenvalues a power-law tail may have, when spectra are computed (default 10).
        convention: a PowerLawConvention or its name, SEED001 / "seed001" (the default, or the result's or
            frame's) or WEIGHTWATCHER / "weightwatcher": WeightWatcher's get_summary() alpha_weighted, the mean
            of alpha * log10(lambda_max) over its layers (DeepDataProfiler averages too; the paper sums).
        embeddings: include the embeddings (default False).

    Returns:
        alpha-hat, a float.
    """
    if isinstance(model_or_frame, LayerSpectra):
        conv = power_law_convention(model_or_frame.convention if convention is None else convention)
        frame = model_or_frame.to_frame()
    elif isinstance(model_or_frame, pd.DataFrame):
        frame = model_or_frame
        conv = power_law_convention(convention or frame.attrs.get("convention", "seed001"))
        if "layer" not in frame and "name" in frame:  # a frame of the versions that named the column "name"
            frame = frame.rename(columns={"name": "layer"})
        missing = [c for c in ("layer", "alpha", "lambda_max") if c not in frame]
        if missing:
            raise ValueError(f"model_or_frame is a DataFrame without the layer_spectra columns {missing}")
    else:
        conv = power_law_convention(convention or "seed001")
        frame = layer_spectra(model_or_frame, min_tail=min_tail, convention=conv).to_frame()
    if not embeddings and "kind" in frame:  # lookup tables, not maps between representations
        frame = frame[frame["kind"] != "embedding"]
    usable = frame["alpha"].notna()
    if not usable.any():
        raise ValueError("no layer has enough eigenvalues for a power-law fit (lower min_tail, or see the note column)")
    if not usable.all():
        left = frame.loc[~usable]
        notes = left["note"] if "note" in left else ["no fit"] * len(left)
        warnings.warn(f"alpha_hat used {int(usable.sum())} of {len(frame)} layers; left out: "
                      + "; ".join(f"{n} ({why})" for n, why in zip(left["layer"], notes)), stacklevel=2)
    return alpha_hat_of(frame["alpha"], frame["lambda_max"], conv)


def sample_power_law(alpha: float, xmin: float, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n samples of p(x) ~ x^-alpha on [xmin, inf) by inverting the CDF.

    The power law of seed 001 section 4, for checks of the fit.

    Args:
        alpha: the exponent (above 1).
        xmin: the lower bound of the support (positive).
        n: the number of samples.
        generator: the draws' randomness (default None: torch's global generator).

    Returns:
        A float64 tensor (n,).
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return xmin * (1 - u) ** (-1 / (alpha - 1))
