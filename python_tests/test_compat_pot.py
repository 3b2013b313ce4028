"""spectral_ext.compat.pot against the real POT 0.9.7 on small problems: the same
plans, potentials, errors, iteration counts, costs and return types."""
import warnings

import numpy as np
import pytest
import torch

ot = pytest.importorskip("ot")
from spectral_ext.compat import pot  # noqa: E402


def problem(n, m, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    a, b = rng.random(n) + 0.1, rng.random(m) + 0.1
    x, y = rng.standard_normal((n, 2)), rng.standard_normal((m, 2)) + 0.5
    M = scale * ((x[:, None] - y[None]) ** 2).sum(-1)
    return a / a.sum(), b / b.sum(), M


@pytest.mark.parametrize("n,m", [(1, 1), (5, 5), (30, 20), (17, 70)])
@pytest.mark.parametrize("iters,thr", [(1000, 1e-9), (7, 1e-9), (25, 0.0)])
def test_sinkhorn_knopp_matches_pot(n, m, iters, thr):
    a, b, M = problem(n, m, seed=n + m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, wlog = ot.bregman.sinkhorn_knopp(a, b, M, 0.1, numItermax=iters, stopThr=thr, log=True)
        got, glog = pot.sinkhorn_knopp(a, b, M, 0.1, numItermax=iters, stopThr=thr, log=True)
    assert isinstance(got, np.ndarray) and got.shape == (n, m)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-14)
    assert glog["niter"] == wlog["niter"]
    np.testing.assert_allclose(glog["err"], wlog["err"], rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(glog["u"], wlog["u"], rtol=1e-9)
    np.testing.assert_allclose(glog["v"], wlog["v"], rtol=1e-9)


@pytest.mark.parametrize("reg", [0.5, 0.05, 2e-3])
def test_sinkhorn_log_matches_pot_also_when_badly_scaled(reg):
    # reg = 2e-3: exp(-M / reg) underflows to 0 for most entries; the log domain does not.
    a, b, M = problem(25, 30, seed=4, scale=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, wlog = ot.bregman.sinkhorn_log(a, b, M, reg, numItermax=300, stopThr=1e-10, log=True)
        got, glog = pot.bregman.sinkhorn_log(a, b, M, reg, numItermax=300, stopThr=1e-10, log=True)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-13)
    assert glog["niter"] == wlog["niter"]
    np.testing.assert_allclose(glog["log_u"], wlog["log_u"], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(glog["log_v"], wlog["log_v"], rtol=1e-7, atol=1e-9)


def test_sinkhorn_methods_sinkhorn2_and_torch_in_torch_out():
    a, b, M = problem(12, 9, seed=1)
    for method in ("sinkhorn", "sinkhorn_log", "sinkhorn_stabilized"):
        want = ot.sinkhorn(a, b, M, 0.2, method=method)
        np.testing.assert_allclose(pot.sinkhorn(a, b, M, 0.2, method=method), want, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(pot.sinkhorn2(a, b, M, 0.2), ot.sinkhorn2(a, b, M, 0.2), rtol=1e-9)
    cost, log = pot.sinkhorn2(a, b, M, 0.2, log=True)
    assert np.isscalar(cost) or np.ndim(cost) == 0
    assert "err" in log
    at, bt, Mt = (torch.from_numpy(x) for x in (a, b, M))
    got = pot.sinkhorn(at, bt, Mt, 0.2)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, ot.sinkhorn(at, bt, Mt, 0.2), rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="Unknown method"):
        pot.sinkhorn(a, b, M, 0.2, method="greenkhorn")


def test_empty_marginals_are_uniform_and_warnings_match():
    _, _, M = problem(6, 8, seed=2)
    np.testing.assert_allclose(pot.sinkhorn([], [], M, 0.3), ot.sinkhorn([], [], M, 0.3), rtol=1e-9)
    with pytest.warns(UserWarning, match="did not converge"):
        pot.sinkhorn_knopp([], [], M, 0.01, numItermax=3)
    with pytest.raises(ValueError, match="several histograms"):
        pot.sinkhorn(np.ones(6) / 6, np.ones((8, 2)) / 8, M, 0.3)


@pytest.mark.parametrize("method", ["sinkhorn", "log_sinkhorn"])
def test_solve_batch_matches_pot(method):
    rng = np.random.default_rng(7)
    M = torch.from_numpy(rng.random((5, 16, 12)))
    a = torch.from_numpy(rng.random((5, 16)) + 0.1)
    b = torch.from_numpy(rng.random((5, 12)) + 0.1)
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    want = ot.batch.solve_batch(M, reg=0.1, a=a, b=b, max_iter=2000, tol=1e-12, method=method)
    got = pot.batch.solve_batch(M, reg=0.1, a=a, b=b, max_iter=2000, tol=1e-12, method=method)
    torch.testing.assert_close(got.plan, want.plan, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(got.value, want.value, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(got.value_linear, want.value_linear, rtol=1e-8, atol=1e-12)
    # Potentials are defined up to a shift between u and v: compare the plan they make.
    u, v = got.potentials
    torch.testing.assert_close((-M / 0.1 + u[:, :, None] + v[:, None, :]).exp(), want.plan, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="strictly positive reg"):
        pot.solve_batch(M, reg=None)
