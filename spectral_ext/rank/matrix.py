"""Matrix ranks (seed 003 section 3.1): the numerical rank of equation 4,
the stable rank, and singular values of long matrices."""
from __future__ import annotations

import torch

from .. import _checks
from .._linalg import gram_singular_values
from ._common import _check_eps, _rank_of_singular_values


def numerical_rank(W: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Rank_eps(W) = #{i : sigma_i > eps * ||W||_2} (seed 003 section 3.1,
    equation 4).

    W: a matrix (m, n) or a batch (..., m, n). eps: the relative tolerance;
    by default the paper's choice (section 4.3) eps = float32 machine epsilon
    x the number of singular values, whatever W's dtype. Returns a 0-d int64
    tensor, or one per matrix for batched input. For the singular values
    too, take sigma = torch.linalg.svdvals(W) and rank_of_singular_values(
    sigma, eps): one SVD for both. Theorem 1: the result is stable under
    perturbations smaller than the gap between eps * ||W||_2 and the nearest
    sigma_i."""
    _checks.tensor("W", W, ndims=range(2, 64), shape="(m, n) or (..., m, n)")
    _check_eps(eps)
    return _rank_of_singular_values(torch.linalg.svdvals(W), eps)


def rank_of_singular_values(sigma: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Equation 4 of seed 003 section 3.1 on singular values already computed:
    #{i : sigma_i > eps * sigma_1}, with numerical_rank's default eps.

    sigma: (..., k) singular values in decreasing order (torch.linalg.svdvals'
    output), batched over the leading axes. Returns int64 counts of shape
    sigma.shape[:-1]; numerical_rank(W, eps) equals
    rank_of_singular_values(torch.linalg.svdvals(W), eps)."""
    _checks.tensor("sigma", sigma, ndims=range(1, 64), shape="(..., k)")
    _check_eps(eps)
    if sigma.numel() and bool((sigma[..., 1:] > sigma[..., :-1]).any()):
        raise ValueError("sigma must be in decreasing order (as torch.linalg.svdvals returns it)")
    if sigma.numel() and bool((sigma < 0).any()):
        raise ValueError("sigma must be non-negative: singular values")
    return _rank_of_singular_values(sigma, eps)


def stable_rank(W: torch.Tensor) -> torch.Tensor:
    """||W||_F^2 / ||W||_2^2 (0 for a zero matrix): a smooth companion of the
    numerical rank of seed 003 section 3.1, at most the rank of W.

    W: a matrix (m, n) or a batch (..., m, n). Returns a tensor of W's dtype,
    0-d or one per matrix for batched input."""
    _checks.tensor("W", W, ndims=range(2, 64), shape="(m, n) or (..., m, n)")
    sigma = torch.linalg.svdvals(W)
    top = sigma[..., 0] if sigma.shape[-1] else sigma.new_zeros(sigma.shape[:-1])
    frob = sigma.square().sum(-1)
    return torch.where(top > 0, frob / top.clamp_min(torch.finfo(sigma.dtype).tiny).square(), torch.zeros_like(frob))


def singular_values_of_rows(M: torch.Tensor) -> torch.Tensor:
    """Singular values of M (r, c) in float64, decreasing, for the ranks of
    seed 003 sections 3.2 and 4.3 (Jacobians and features, often far longer
    on one side): a direct SVD when M is nearly square, the smaller Gram
    matrix (_linalg.gram_singular_values) otherwise."""
    if max(M.shape) <= 2 * min(M.shape) and min(M.shape) > 0:
        return torch.linalg.svdvals(M.double())
    return gram_singular_values(M)
