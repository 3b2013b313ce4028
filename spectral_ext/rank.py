"""Rank diminishing (seed 003). So far: the numerical rank and the stable rank
of weight matrices; the Jacobian, PCA, classification-dimension and
independence-deficit tools of issue 6 are still to come."""
from __future__ import annotations

import torch

from . import _checks

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def numerical_rank(W: torch.Tensor, eps: float | None = None, return_singular_values: bool = False):
    """Rank_eps(W) = #{i : sigma_i > eps * ||W||_2} (seed 003 equation 4).

    W: a matrix (m, n) or a batch (..., m, n). eps: the relative tolerance;
    by default the paper's choice (section 4.1) eps = float32 machine epsilon
    x the number of singular values, whatever W's dtype. Returns a 0-d int64
    tensor, or one per matrix for batched input; with
    return_singular_values=True also the singular values (..., min(m, n)),
    in decreasing order. Theorem 1: the result is stable under perturbations
    smaller than the gap between eps * ||W||_2 and the nearest sigma_i."""
    _checks.tensor("W", W, ndims=range(2, 64), shape="(m, n) or (..., m, n)")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    sigma = torch.linalg.svdvals(W)
    k = sigma.shape[-1]
    tolerance = FLOAT32_EPS * k if eps is None else float(eps)
    top = sigma[..., :1] if k else sigma.new_zeros(*sigma.shape[:-1], 1)
    rank = (sigma > tolerance * top).sum(-1)
    return (rank, sigma) if return_singular_values else rank


def stable_rank(W: torch.Tensor) -> torch.Tensor:
    """||W||_F^2 / ||W||_2^2, a smooth lower bound of the rank (0 for a zero
    matrix); batched like numerical_rank."""
    _checks.tensor("W", W, ndims=range(2, 64), shape="(m, n) or (..., m, n)")
    sigma = torch.linalg.svdvals(W)
    top = sigma[..., 0] if sigma.shape[-1] else sigma.new_zeros(sigma.shape[:-1])
    frob = sigma.square().sum(-1)
    return torch.where(top > 0, frob / top.clamp_min(torch.finfo(sigma.dtype).tiny).square(), torch.zeros_like(frob))
