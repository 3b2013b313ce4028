"""Matrix ranks (seed 003 section 3.1): the numerical rank of equation 4,
the stable rank, and singular values of long matrices."""
from __future__ import annotations

import torch

from .. import _checks
from .._linalg import gram_singular_values
from ._common import _check_eps, _rank_of_singular_values


# Matrices whose largest magnitude lies within 2^-E .. 2^E (E by the dtype their squares are formed in) are used as
# they are; others are divided by a power of two first (exact), so that no square or Gram entry overflows or
# underflows (the stable rank of a float64 matrix at 1e200 was NaN).
_SAFE_EXPONENT = {torch.float32: 16, torch.float64: 128}


def _exponents(M: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per matrix of M (..., r, c), int64 of shape M.shape[:-2]: 0 where its
    largest magnitude lies within 2^+-_SAFE_EXPONENT of `dtype` (default
    M's), else the power of two e that puts it in [0.5, 1)."""
    if M.numel() == 0 or _checks.data_free(M):
        return torch.zeros(M.shape[:-2], dtype=torch.int64, device=M.device)
    A = M.detach()
    largest = torch.maximum(A.amax((-2, -1)), -A.amin((-2, -1)))  # no |M| copy
    e = torch.frexp(largest).exponent.to(torch.int64)  # 0 for a zero matrix
    return torch.where(e.abs() <= _SAFE_EXPONENT.get(dtype or M.dtype, 16), 0, e)


def _times_exp2(M: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """M * 2^e per matrix (e of shape M.shape[:-2]), exact: in two factors, as 2^e alone may not be a float."""
    if e.numel() == 0 or not bool(e.any()):
        return M
    half = torch.div(e, 2, rounding_mode="floor")
    return M * torch.exp2(half.to(M.dtype))[..., None, None] * torch.exp2((e - half).to(M.dtype))[..., None, None]


def numerical_rank(W: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Rank_eps(W) = #{i : sigma_i > eps * ||W||_2} (seed 003 section 3.1, equation 4).

    For the singular values too, take sigma = torch.linalg.svdvals(W) and rank_of_singular_values(sigma, eps): one
    SVD for both. Theorem 1: the result is stable under perturbations smaller than the gap between eps * ||W||_2 and
    the nearest sigma_i. W is divided by a power of two first where its magnitude is extreme (the rank is scale
    invariant).

    Args:
        W: a matrix (m, n) or a batch (..., m, n).
        eps: the relative tolerance; by default (None) the paper's choice (section 4.3) eps = float32 machine
            epsilon x the number of singular values, whatever W's dtype.

    Returns:
        A 0-d int64 tensor, or one per matrix for batched input.
    """
    _checks.tensor("W", W, ndims=range(2, 64), shape="(m, n) or (..., m, n)", data=True)
    _check_eps(eps)
    return _rank_of_singular_values(torch.linalg.svdvals(_times_exp2(W, -_exponents(W))), eps)


def rank_of_singular_values(sigma: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Equation 4 of seed 003 section 3.1 on singular values already computed: #{i : sigma_i > eps * sigma_1}.

    numerical_rank(W, eps) equals rank_of_singular_values(torch.linalg.svdvals(W), eps). A ValueError is raised when
    sigma is not in decreasing order or has negative entries.

    Args:
        sigma: (..., k) singular values in decreasing order (torch.linalg.svdvals' output), batched over the leading
            axes.
        eps: the relative tolerance, with numerical_rank's default (None: float32 machine epsilon x k).

    Returns:
        int64 counts of shape sigma.shape[:-1].
    """
    _checks.tensor("sigma", sigma, ndims=range(1, 64), shape="(..., k)", data=True)
    _check_eps(eps)
    if sigma.numel() and bool((sigma[..., 1:] > sigma[..., :-1]).any()):
        raise ValueError("sigma must be in decreasing order (as torch.linalg.svdvals returns it)")
    if sigma.numel() and bool((sigma < 0).any()):
        raise ValueError("sigma must be non-negative: singular values")
    return _rank_of_singular_values(sigma, eps)


def stable_rank(W: torch.Tensor) -> torch.Tensor:
    """||W||_F^2 / ||W||_2^2 (0 for a zero matrix): a smooth companion of the numerical rank of seed 003 section 3.1.

    It is at most the rank of W. Computed as sum (sigma_i / sigma_1)^2, W divided by a power of two first where its
    magnitude is extreme: no square overflows or underflows at any scale.

    Args:
        W: a matrix (m, n) or a batch (..., m, n).

    Returns:
        A tensor of W's dtype, 0-d or one per matrix for batched input.
    """
    _checks.tensor("W", W, ndims=range(2, 64), shape="(m, n) or (..., m, n)", data=True)
    sigma = torch.linalg.svdvals(_times_exp2(W, -_exponents(W)))
    top = sigma[..., :1] if sigma.shape[-1] else sigma.new_zeros(*sigma.shape[:-1], 1)
    ratio = (sigma / top.clamp_min(torch.finfo(sigma.dtype).tiny)).square().sum(-1)
    return torch.where(top[..., 0] > 0, ratio, torch.zeros_like(ratio))


def singular_values_of_rows(M: torch.Tensor) -> torch.Tensor:
    """Singular values of M in float64, decreasing, for the ranks of seed 003 sections 3.2 and 4.3.

    Meant for Jacobians and features, often far longer on one side: a direct SVD when M is nearly square, the smaller
    Gram matrix (_linalg.gram_singular_values) otherwise; M divided by a power of two first where its magnitude is
    extreme (the Gram's squares would overflow or underflow), the values multiplied back.

    Args:
        M: a matrix (r, c), any floating dtype (converted to float64).

    Returns:
        A float64 tensor of the singular values of M, in decreasing order.
    """
    M = M.double()
    e = _exponents(M)
    M = _times_exp2(M, -e)
    if max(M.shape) <= 2 * min(M.shape) and min(M.shape) > 0:
        return _times_exp2(torch.linalg.svdvals(M)[..., None], e)[..., 0]
    return _times_exp2(gram_singular_values(M)[..., None], e)[..., 0]
