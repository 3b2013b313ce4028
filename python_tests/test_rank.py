"""Numerical and stable rank (seed 003 section 3.1, equation 4, Theorem 1)."""
import pytest
import torch

import spectral_ext as se


def low_rank(m, n, r, seed=0, dtype=torch.float64, batch=()):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, m, r, generator=g, dtype=dtype) @ torch.randn(*batch, r, n, generator=g, dtype=dtype)


@pytest.mark.parametrize("m,n,r", [(1, 1, 1), (20, 30, 7), (64, 17, 16), (50, 50, 1)])
def test_products_of_low_rank_factors_have_the_construction_rank(m, n, r):
    W = low_rank(m, n, r)
    assert int(se.numerical_rank(W)) == r
    assert int(se.numerical_rank(W.float())) == r
    # Theorem 1: a perturbation far below the tolerance leaves the rank alone; the exact rank
    # of the perturbed matrix is full.
    noisy = W + 1e-12 * torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert int(se.numerical_rank(noisy)) == r
    assert int(torch.linalg.matrix_rank(noisy, rtol=1e-15)) == min(m, n)


def test_batched_explicit_tolerance_and_singular_values():
    W = torch.stack([low_rank(12, 9, r, seed=r) for r in (1, 3, 9)]).reshape(3, 1, 12, 9)
    rank, sigma = se.numerical_rank(W, return_singular_values=True)
    assert rank.shape == (3, 1) and rank.dtype == torch.int64 and rank.reshape(-1).tolist() == [1, 3, 9]
    assert sigma.shape == (3, 1, 9) and bool((sigma[..., :-1] >= sigma[..., 1:]).all())
    D = torch.diag(torch.tensor([1.0, 0.5, 0.1, 0.01], dtype=torch.float64))
    assert int(se.numerical_rank(D, eps=0.2)) == 2  # sigma_i > 0.2 * 1
    assert int(se.numerical_rank(D, eps=0.05)) == 3
    assert int(se.numerical_rank(7.0 * D, eps=0.05)) == 3  # relative to ||W||_2: scale invariant
    assert int(se.numerical_rank(torch.zeros(4, 5))) == 0


def test_stable_rank():
    torch.testing.assert_close(se.stable_rank(torch.eye(5, dtype=torch.float64)), torch.tensor(5.0, dtype=torch.float64))
    D = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(se.stable_rank(D), torch.tensor(1.25, dtype=torch.float64))
    assert float(se.stable_rank(torch.zeros(3, 3))) == 0.0
    W = low_rank(30, 20, 5)
    assert 1.0 <= float(se.stable_rank(W)) <= int(se.numerical_rank(W))


def test_errors():
    with pytest.raises(ValueError, match="W must have shape"):
        se.numerical_rank(torch.ones(3))
    with pytest.raises(ValueError, match="W contains NaN"):
        se.numerical_rank(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="eps must be"):
        se.numerical_rank(torch.eye(2), eps=-1.0)
    with pytest.raises(TypeError, match="W must be float32 or float64"):
        se.numerical_rank(torch.eye(2, dtype=torch.int64))
