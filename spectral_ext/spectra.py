"""Spectra of weight matrices (seed 001 sections 3-4): the empirical spectral
distribution (ESD) of each layer's Gram matrix for the unfolding W1 =
weight.reshape(out, in*k*k), the Toeplitz matrization W2 of a convolution on
an m x m input (via the FFT, never built), power-law fits of the ESD tail and
the capacity metric alpha-hat (equation 12)."""
from __future__ import annotations


import numpy as np
import pandas as pd
import torch
from torch import nn

from . import _checks
from .layers import discover
from .rank import numerical_rank, stable_rank


def esd(W: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the unnormalised Gram matrix W1 W1^T (section 4), in
    decreasing order: the squared singular values of W1, where W is a
    Linear weight or a conv weight (out, in, *kernel) unfolded row-major."""
    _checks.tensor("W", W, ndims=range(2, 6), shape="(out, in) or (out, in, *kernel)")
    return torch.linalg.svdvals(W.reshape(W.shape[0], -1).double()).square()


def toeplitz_singular_values(weight: torch.Tensor, m: int | tuple[int, int]) -> torch.Tensor:
    """Singular values of a 2-d convolution as a linear operator on (in, m, m)
    inputs: the Toeplitz matrization W2 of section 3.2, with circular
    padding and stride 1, by Sedghi, Gupta and Long's theorem: they are the
    union over the m^2 frequencies (u, v) of the singular values of the
    (out, in) matrix of the kernel's 2-d DFT at (u, v). Costs m^2 small SVDs
    instead of one (out m^2, in m^2) matrix.

    With zero padding W2 is a Toeplitz (not circulant) operator: its
    singular values differ from these by boundary effects that shrink as m
    grows relative to the kernel (build W2 explicitly on a small m to see
    them). Returns all out x ... values, decreasing."""
    _checks.tensor("weight", weight, ndims=(4,), shape="(out, in, kh, kw)")
    mh, mw = _checks.int_pair("m", m)
    if mh < weight.shape[2] or mw < weight.shape[3]:
        raise ValueError(f"m must be at least the kernel size {tuple(weight.shape[2:])}, got {(mh, mw)}")
    transforms = torch.fft.fft2(weight.double(), s=(mh, mw))  # (out, in, mh, mw)
    blocks = transforms.permute(2, 3, 0, 1)  # (mh, mw, out, in)
    return torch.linalg.svdvals(blocks).reshape(-1).sort(descending=True).values


def circular_conv_matrix(weight: torch.Tensor, m: int) -> torch.Tensor:
    """W2 built explicitly for a circular-padded stride-1 convolution on
    (in, m, m) inputs (for checks on small sizes): column j is the flattened
    response to the j-th basis input."""
    out, c, kh, kw = weight.shape
    basis = torch.eye(c * m * m, dtype=weight.dtype).reshape(-1, c, m, m)
    padded = nn.functional.pad(basis, (0, kw - 1, 0, kh - 1), mode="circular")
    response = nn.functional.conv2d(padded, weight)
    return response.reshape(c * m * m, -1).T


def fit_power_law(eigenvalues, xmin: float | None = None, min_tail: int = 10) -> dict:
    """Maximum-likelihood power law p(x) ~ x^-alpha for x >= xmin (Clauset,
    Shalizi and Newman; as Martin and Mahoney fit ESD tails): alpha = 1 +
    n / sum ln(x_i / xmin), with xmin chosen among the data to minimise the
    Kolmogorov-Smirnov distance between the tail and the fit (unless given).

    eigenvalues: 1-d, positive values are used. min_tail: the smallest tail
    considered. Returns {alpha, xmin, ks, n_tail, n}; alpha is NaN when fewer
    than min_tail positive values exist."""
    x = np.sort(np.asarray(torch.as_tensor(eigenvalues).double().cpu(), dtype=np.float64).reshape(-1))
    if not np.all(np.isfinite(x)):
        raise ValueError("eigenvalues contains NaN or infinite values")
    x = x[x > 0]
    n = len(x)
    nan = {"alpha": float("nan"), "xmin": float("nan"), "ks": float("nan"), "n_tail": 0, "n": n}
    if n < min_tail:
        return nan
    logs = np.log(x)
    suffix = np.cumsum(logs[::-1])[::-1]  # sum of ln x_j for j >= i
    if xmin is not None:
        candidates = np.array([int(np.searchsorted(x, xmin))])
    else:
        candidates = np.arange(0, n - min_tail + 1)
        candidates = candidates[np.r_[True, x[candidates[1:]] != x[candidates[1:] - 1]]]  # distinct xmin
    best = None
    for start in range(0, len(candidates), 256):  # bounded memory: 256 candidate tails at a time
        idx = candidates[start:start + 256]
        counts = n - idx
        denominators = suffix[idx] - counts * logs[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            alphas = 1 + counts / denominators
        ks = np.full(len(idx), np.inf)
        for k, (i, a) in enumerate(zip(idx, alphas)):
            if not np.isfinite(a) or a <= 1:
                continue
            tail = x[i:]
            fitted = 1 - (tail / x[i]) ** (1 - a)
            m = len(tail)
            empirical_hi = np.arange(1, m + 1) / m
            empirical_lo = np.arange(0, m) / m
            ks[k] = max(np.max(np.abs(empirical_hi - fitted)), np.max(np.abs(fitted - empirical_lo)))
        k = int(np.argmin(ks))
        if np.isfinite(ks[k]) and (best is None or ks[k] < best[2]):
            best = (float(alphas[k]), float(x[idx[k]]), float(ks[k]), int(counts[k]))
    if best is None:
        return nan
    return {"alpha": best[0], "xmin": best[1], "ks": best[2], "n_tail": best[3], "n": n}


def layer_spectra(model: nn.Module, example_input=None, toeplitz_m: int | None = None,
                  min_tail: int = 10) -> pd.DataFrame:
    """One row per linear map of the model (forward order): name, kind, shape
    (of W1), rank (min of the shape), numerical_rank (seed 003 equation 4),
    stable_rank, spectral_norm, lambda_max (largest Gram eigenvalue), alpha,
    xmin, ks and n_tail of the power-law fit of the ESD of W1 W1^T. With
    toeplitz_m, the same fit for the circular Toeplitz matrization W2 of the
    2-d convolutions on m x m inputs (columns alpha_w2, lambda_max_w2,
    n_w2)."""
    graph = discover(model, example_input)
    rows = []
    for name, linear_map in graph.maps.items():
        weight = linear_map.module.weight.detach()
        if not _checks.all_finite(weight):
            raise ValueError(f"the weight of {name} contains NaN or infinite values")
        W1 = linear_map.matrix(dtype=torch.float64)
        eig = esd(W1)
        fit = fit_power_law(eig, min_tail=min_tail)
        row = {"name": name, "kind": linear_map.kind, "shape": tuple(W1.shape), "rank": min(W1.shape),
               "numerical_rank": int(numerical_rank(W1)), "stable_rank": float(stable_rank(W1)),
               "spectral_norm": float(eig[0].sqrt()), "lambda_max": float(eig[0]), "alpha": fit["alpha"],
               "xmin": fit["xmin"], "ks": fit["ks"], "n_tail": fit["n_tail"]}
        if toeplitz_m is not None:
            if linear_map.kind == "conv2d" and getattr(linear_map.module, "groups", 1) == 1:
                eig2 = toeplitz_singular_values(weight, toeplitz_m).square()
                fit2 = fit_power_law(eig2, min_tail=min_tail)
                row.update(alpha_w2=fit2["alpha"], lambda_max_w2=float(eig2[0]), n_w2=int(eig2.numel()))
            else:
                row.update(alpha_w2=float("nan"), lambda_max_w2=float("nan"), n_w2=0)
        rows.append(row)
    return pd.DataFrame(rows)


def alpha_hat(model_or_frame, example_input=None) -> float:
    """Capacity metric alpha-hat = sum over layers of alpha_L * ln(lambda_max_L)
    (seed 001 equation 12, Martin and Mahoney); layers whose fit failed
    (too few eigenvalues) are left out. DeepDataProfiler averages instead of
    summing; this is the paper's sum. Takes a model or a layer_spectra
    frame."""
    frame = model_or_frame if isinstance(model_or_frame, pd.DataFrame) else layer_spectra(model_or_frame,
                                                                                        example_input)
    usable = frame.dropna(subset=["alpha"])
    if usable.empty:
        raise ValueError("no layer has enough eigenvalues for a power-law fit")
    return float((usable["alpha"] * np.log(usable["lambda_max"])).sum())


def sample_power_law(alpha: float, xmin: float, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n samples of p(x) ~ x^-alpha on [xmin, inf) by inverting the CDF."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return xmin * (1 - u) ** (-1 / (alpha - 1))
