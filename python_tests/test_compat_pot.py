"""spectral_ext.compat.pot against the real POT 0.9.7 on small problems: the same
plans, potentials, errors, iteration counts, costs and return types; POT's reg = 0
behaviour; the exact solver (emd, emd2: POT's optimum, its checks, warnings, log,
gradients, and batches); the entropic barycenter."""
import warnings

import numpy as np
import pytest
import torch

import ot  # noqa: E402  (the peer: a test requirement, never skipped)
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
    with pytest.raises(ValueError, match="Unknown method 'nope'"):  # POT's words
        pot.sinkhorn(a, b, M, 0.2, method="nope")
    with pytest.raises(NotImplementedError, match="'greenkhorn' of POT is not offered"):
        pot.sinkhorn(a, b, M, 0.2, method="greenkhorn")


def test_empty_marginals_are_uniform_and_warnings_match():
    _, _, M = problem(6, 8, seed=2)
    np.testing.assert_allclose(pot.sinkhorn([], [], M, 0.3), ot.sinkhorn([], [], M, 0.3), rtol=1e-9)
    with pytest.warns(UserWarning, match="did not converge"):
        pot.sinkhorn_knopp([], [], M, 0.01, numItermax=3)
    with pytest.raises(NotImplementedError, match="several histograms"):
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


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_log", "sinkhorn_stabilized"])
@pytest.mark.parametrize("reg", [0, 0.0])
def test_zero_reg_warns_and_returns_pots_plan(method, reg):
    # POT does not refuse reg = 0: its kernel exp(M / -reg) is 0, inf or NaN (the sign of
    # zero decides) and it warns; the plan holds the same non-finite values.
    _, _, M = problem(7, 5, seed=3)
    M[2, 1] = 0.0
    a, b = np.full(7, 1 / 7), np.full(5, 1 / 5)
    with pytest.warns(UserWarning) as want_warnings, np.errstate(all="ignore"):
        want = ot.sinkhorn(a, b, M, reg, method=method, numItermax=30)
    with pytest.warns(UserWarning) as got_warnings:
        got = pot.sinkhorn(a, b, M, reg, method=method, numItermax=30)
    user = lambda record: [str(w.message) for w in record if w.category is UserWarning]  # noqa: E731
    assert user(got_warnings)[-1] == user(want_warnings)[-1]
    if method == "sinkhorn_stabilized":  # POT's stabilised plan; the adapter's log keys are the log domain's
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])
    else:
        np.testing.assert_array_equal(got, want)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        assert np.isnan(pot.sinkhorn2(a, b, M, reg, method=method)) and np.isnan(ot.sinkhorn2(a, b, M, reg,
                                                                                               method=method))
        _, glog = pot.sinkhorn(a, b, M, reg, method="sinkhorn", log=True)
        _, wlog = ot.sinkhorn(a, b, M, reg, method="sinkhorn", log=True)
    assert glog["niter"] == wlog["niter"] == 0 and glog["err"] == wlog["err"] == []


# ---------------------------------------------------------------- exact OT

def exact_problem(n, m, seed, kind="points"):
    rng = np.random.default_rng(seed)
    if kind == "points":
        M = ((rng.standard_normal((n, 1, 3)) - rng.standard_normal((1, m, 3)) - 0.3) ** 2).sum(-1)
    elif kind == "integers":  # many optimal plans
        M = rng.integers(0, 4, (n, m)).astype(np.float64)
    else:
        M = rng.random((n, m))
    a, b = rng.random(n) + 0.05, rng.random(m) + 0.05
    return a / a.sum(), b / b.sum(), M


def check_plan(G, a, b, M, cost):
    assert (G >= 0).all()
    np.testing.assert_allclose(G.sum(1), a, rtol=0, atol=1e-13)
    np.testing.assert_allclose(G.sum(0), b, rtol=0, atol=1e-13)
    np.testing.assert_allclose((G * M).sum(), cost, rtol=1e-13)


def check_duals(u, v, a, b, M, G, cost):
    # feasible, tight where the plan moves mass, and the dual objective is the cost
    assert (u[:, None] + v[None, :] - M).max() < 1e-12
    assert np.abs((M - u[:, None] - v[None, :])[G > 0]).max() < 1e-12
    np.testing.assert_allclose(a @ u + b @ v, cost, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["points", "integers", "uniform random"])
@pytest.mark.parametrize("n,m", [(1, 1), (1, 6), (9, 1), (12, 12), (40, 25), (30, 70)])
def test_emd_reaches_pots_optimum(kind, n, m):
    a, b, M = exact_problem(n, m, seed=n * 7 + m, kind=kind)
    if kind == "uniform random":
        a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    G, log = pot.emd(a, b, M, log=True)
    want_G, want_log = ot.emd(a, b, M, log=True)
    assert isinstance(G, np.ndarray) and G.shape == (n, m) and G.dtype == np.float64
    np.testing.assert_allclose(log["cost"], want_log["cost"], rtol=1e-12)  # the plan may differ on ties
    check_plan(G, a, b, M, log["cost"])
    check_duals(log["u"], log["v"], a, b, M, G, log["cost"])
    np.testing.assert_allclose(a @ log["u"], b @ log["v"], rtol=1e-9, atol=1e-14)  # centred, as POT's
    assert set(log) == set(want_log) and log["warning"] is None and log["result_code"] == 1
    assert isinstance(log["cost"], float) and isinstance(log["result_code"], int)
    cost = pot.emd2(a, b, M)
    assert isinstance(cost, float)
    np.testing.assert_allclose(cost, ot.emd2(a, b, M), rtol=1e-12)


def wide_range_problem(n, seed):
    rng = np.random.default_rng(seed)
    M = 10.0 ** rng.uniform(-8, 8, (n, n))  # costs spanning 16 decades
    a, b = rng.random(n), rng.random(n)
    return a / a.sum(), b / b.sum(), M


def highs_optimum(a, b, M):
    """The optimal cost by scipy's HiGHS (an independent LP solver), at its tightest tolerances."""
    import scipy.optimize
    import scipy.sparse
    n, m = M.shape
    rows = scipy.sparse.vstack([scipy.sparse.kron(scipy.sparse.eye(n), np.ones((1, m))),
                                scipy.sparse.kron(np.ones((1, n)), scipy.sparse.eye(m))])
    res = scipy.optimize.linprog(M.ravel(), A_eq=rows, b_eq=np.r_[a, b], bounds=(0, None), method="highs",
                                 options=dict(primal_feasibility_tolerance=1e-10, dual_feasibility_tolerance=1e-10))
    assert res.status == 0
    return res.fun


def test_emd_is_optimal_where_pots_simplex_stops_early():
    # Costs spanning 1e-8..1e8: POT 0.9.7's network simplex stops at a suboptimal basis (7.5x the
    # optimum on this problem, 4-40x on others of n = 60..300); ours is certified optimal twice over.
    a, b, M = wide_range_problem(60, seed=1)
    G, log = pot.emd(a, b, M, log=True)
    cost = log["cost"]
    check_plan(G, a, b, M, cost)
    np.testing.assert_allclose(cost, highs_optimum(a, b, M), rtol=1e-9)  # 1: HiGHS (takes ~0.05 s)
    u = log["u"]  # 2: weak duality: (u, min_i M_ij - u_i) is dual feasible, so its objective bounds the optimum
    lower = a @ u + b @ (M - u[:, None]).min(0)
    assert lower <= cost * (1 + 1e-12) and lower >= cost * (1 - 1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ot.emd2(a, b, M) >= cost  # POT's is suboptimal here (about 7.5x ours)


@pytest.mark.parametrize("n,seed", [(100, 2), (150, 0), (100, 3)])
def test_emd_is_optimal_on_harder_wide_range_problems(n, seed):
    # Before the solver recomputed its potentials from the tree, these stopped 1.2%, 0.7% and 0.2% above the
    # optimum: pivots shift potentials by reduced costs up to 1e8, whose rounding left tree arcs at reduced
    # costs of 3.5e-10 against an optimum of 2.7e-8 and hid entering arcs. Now: HiGHS's optimum, and the
    # solver's own duals are feasible and tight (complementary slackness to rounding).
    a, b, M = wide_range_problem(n, seed=seed)
    G, u, v, cost, result, _ = torch.ops.spectral_ext.network_simplex(*(torch.from_numpy(x)[None] for x in (M, a, b)),
                                                                     0, None, None)
    G, u, v, cost = G[0].numpy(), u[0].numpy(), v[0].numpy(), cost.item()
    np.testing.assert_allclose(cost, highs_optimum(a, b, M), rtol=1e-9)
    reduced = M - u[:, None] - v[None, :]
    assert reduced.min() >= -1e-12 * cost and np.abs(reduced[G > 0]).max() <= 1e-12 * cost
    np.testing.assert_allclose(a @ u + b @ v, cost, rtol=1e-12)


def test_emd_with_zero_masses_matches_pot_and_its_dual_estimates():
    a, b, M = exact_problem(20, 15, seed=1)
    a[[3, 7]] = 0
    b[[0, 14]] = 0
    a, b = a / a.sum(), b / b.sum()
    G, log = pot.emd(a, b, M, log=True)
    want_G, want_log = ot.emd(a, b, M, log=True)
    np.testing.assert_allclose(log["cost"], want_log["cost"], rtol=1e-12)
    assert (G[[3, 7]] == 0).all() and (G[:, [0, 14]] == 0).all()
    check_plan(G, a, b, M, log["cost"])
    check_duals(log["u"], log["v"], a, b, M, G, log["cost"])  # zero-mass potentials made feasible, as POT does


def test_emd_inputs_types_and_devices_follow_pot():
    a, b, M = exact_problem(8, 6, seed=2)
    for args in ((a.tolist(), b.tolist(), M.tolist()), ([], [], M), (a.astype(np.float32), b.astype(np.float32),
                                                                     M.astype(np.float32))):
        got, want = pot.emd(*args), ot.emd(*args)
        assert type(got) is type(want) and got.dtype == want.dtype
        np.testing.assert_allclose(pot.emd2(*args), ot.emd2(*args), rtol=1e-6)
    for dtype in (torch.float32, torch.float64):
        at, bt, Mt = (torch.tensor(x, dtype=dtype) for x in (a, b, M))
        G, log = pot.emd(at, bt, Mt, log=True)
        cost = pot.emd2(at, bt, Mt)
        assert isinstance(G, torch.Tensor) and G.dtype == dtype and cost.dtype == dtype and cost.shape == ()
        assert log["u"].dtype == dtype and isinstance(log["cost"], float)
        torch.testing.assert_close(cost, ot.emd2(at, bt, Mt), rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=0)
    G = pot.emd([], [], torch.from_numpy(M))  # empty marginals: uniform, in M's type
    assert isinstance(G, torch.Tensor) and torch.allclose(G.sum(1), torch.full((8,), 1 / 8, dtype=G.dtype))


def test_emd_checks_and_warnings_are_pots():
    a, b, M = exact_problem(10, 10, seed=3)
    with pytest.raises(AssertionError, match="Dimension mismatch"):
        pot.emd(a[:9], b, M)
    with pytest.raises(AssertionError, match="a and b vector must have the same sum"):
        pot.emd2(a, 2 * b, M)
    # without the check, b is rescaled to a's mass, as in POT
    np.testing.assert_allclose(pot.emd2(a, 2 * b, M, check_marginals=False), ot.emd2(a, 2 * b, M,
                                                                                      check_marginals=False),
                               rtol=1e-12)
    with pytest.warns(DeprecationWarning, match="numThreads"):
        pot.emd(a, b, M, numThreads=2)
    with pytest.warns(UserWarning, match="numItermax reached before optimality"):
        G, log = pot.emd(a, b, M, numItermax=1, log=True)
    assert log["result_code"] == 3 and "numItermax" in log["warning"]
    check_plan(G, a, b, M, (G * M).sum())  # stopped early, yet a feasible plan (POT's start is not)
    with pytest.warns(UserWarning, match="Input histogram consists of integer"):
        G = pot.emd(np.ones(4, dtype=int), np.ones(4, dtype=int), M[:4, :4])
    assert G.dtype == np.int64
    with pytest.raises(NotImplementedError, match="sparse cost matrix"):
        import scipy.sparse
        pot.emd(a, b, scipy.sparse.coo_array(M))
    with pytest.raises(ValueError, match="M contains NaN or infinite"):
        pot.emd(a, b, np.where(M > 1, np.inf, M))


def test_emd2_gradients_are_pots():
    a, b, M = exact_problem(15, 12, seed=4)
    grads = []
    for lib in (pot, ot):
        at, bt, Mt = (torch.tensor(x, requires_grad=True) for x in (a, b, M))
        cost = 3.0 * lib.emd2(at, bt, Mt)
        cost.backward()
        grads.append((cost.detach(), at.grad, bt.grad, Mt.grad))
    for got, want in zip(*grads):  # a unique optimum: the same plan and potentials
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_emd2_several_histograms_log_and_return_matrix():
    a, _, M = exact_problem(30, 30, seed=5)
    B = np.stack([exact_problem(30, 30, seed=s)[1] for s in (6, 7, 8)], 1)
    got, want = pot.emd2(a, B, M), ot.emd2(a, B, M)
    assert isinstance(got, list) and len(got) == 3
    np.testing.assert_allclose(got, want, rtol=1e-12)
    res = pot.emd2(a, B, M, log=True, return_matrix=True)
    for k, (cost, log) in enumerate(res):
        check_plan(log["G"], a, B[:, k], M, cost)
        check_duals(log["u"], log["v"], a, B[:, k], M, log["G"], cost)
        assert {"cost", "u", "v", "warning", "result_code", "G"} == set(log)


@pytest.mark.parametrize("shared", [True, False])
def test_emd_batches_over_a_leading_dimension(shared):
    problems = [exact_problem(25, 18, seed=s) for s in range(6)]
    M = np.stack([p[2] for p in problems])
    a = problems[0][0] if shared else np.stack([p[0] for p in problems])
    b = problems[0][1] if shared else np.stack([p[1] for p in problems])
    G, log = pot.emd(a, b, M, log=True)
    costs = pot.emd2(a, b, M)
    assert G.shape == (6, 25, 18) and log["u"].shape == (6, 25) and costs.shape == (6,)
    for k in range(6):
        ak, bk = (a, b) if shared else (a[k], b[k])
        want = ot.emd2(ak, bk, M[k])
        np.testing.assert_allclose(log["cost"][k], want, rtol=1e-12)
        np.testing.assert_allclose(costs[k], want, rtol=1e-12)
        check_plan(G[k], ak, bk, M[k], want)
        check_duals(log["u"][k], log["v"][k], ak, bk, M[k], G[k], want)
    # torch: the batch of costs differentiates like POT's costs one by one
    Mt = torch.tensor(M, requires_grad=True)
    pot.emd2(torch.tensor(a), torch.tensor(b), Mt).sum().backward()
    torch.testing.assert_close(Mt.grad, torch.from_numpy(G), rtol=0, atol=0)


def test_emd_warm_start_from_a_nearby_problem():
    a, b, M = exact_problem(60, 60, seed=9)
    _, log = pot.emd(a, b, M, log=True)
    M2 = M + 0.01 * np.random.default_rng(1).random(M.shape)
    G, warm = pot.emd(a, b, M2, log=True, potentials_init=(log["u"], log["v"]))
    np.testing.assert_allclose(warm["cost"], ot.emd2(a, b, M2), rtol=1e-12)
    check_plan(G, a, b, M2, warm["cost"])
    check_duals(warm["u"], warm["v"], a, b, M2, G, warm["cost"])
    with pytest.warns(UserWarning, match="numItermax"):
        _, partial = pot.emd(a, b, M2, numItermax=20, log=True)
    G, resumed = pot.emd(a, b, M2, log=True, potentials_init=(partial["u"], partial["v"]))
    np.testing.assert_allclose(resumed["cost"], warm["cost"], rtol=1e-12)


def test_ctrl_c_stops_a_long_exact_batch():
    from conftest import interrupted

    line, returncode, waited = interrupted(
        "from spectral_ext.compat import pot\ntorch.set_num_threads(1)\n"
        "M = torch.rand(80, 700, 700, dtype=torch.float64)\na = torch.full((700,), 1 / 700, dtype=torch.float64)",
        "pot.emd2(a, a, M)", delay=0.2)  # the batch takes about 1.7 s on an idle core: the signal comes well within
    assert returncode == 0 and line == "interrupted"
    assert waited < 5.0, f"took {waited:.1f} s to stop"


# ---------------------------------------------------------------- entropic barycenter

def histograms(dim, k, seed):
    rng = np.random.default_rng(seed)
    x = np.arange(dim, dtype=np.float64)
    A = np.stack([np.exp(-((x - c) / (2 + 3 * rng.random())) ** 2) + 1e-3 for c in rng.uniform(5, dim - 5, k)], 1)
    M = (x[:, None] - x[None, :]) ** 2
    return A / A.sum(0), M / M.max()


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_log", "sinkhorn_stabilized"])
@pytest.mark.parametrize("weighted", [False, True])
def test_barycenter_matches_pot(method, weighted):
    A, M = histograms(40, 3, seed=1)
    weights = np.array([0.2, 0.5, 0.3]) if weighted else None
    want, wlog = ot.bregman.barycenter(A, M, 0.01, weights, method=method, stopThr=1e-9, log=True)
    got, glog = pot.bregman.barycenter(A, M, 0.01, weights, method=method, stopThr=1e-9, log=True)
    assert isinstance(got, np.ndarray) and got.shape == (40,)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    assert glog["niter"] == wlog["niter"] and len(glog["err"]) == len(wlog["err"])
    np.testing.assert_allclose(glog["err"], wlog["err"], rtol=1e-6, atol=1e-14)
    At, Mt = torch.from_numpy(A), torch.from_numpy(M)
    got_t = pot.barycenter(At, Mt, 0.01, weights, method=method, stopThr=1e-9)
    assert isinstance(got_t, torch.Tensor)
    torch.testing.assert_close(got_t, torch.from_numpy(want), rtol=1e-10, atol=1e-14)


def test_barycenter_warnings_and_errors_are_pots():
    A, M = histograms(30, 2, seed=2)
    with pytest.warns(UserWarning, match="Sinkhorn did not converge"):
        pot.barycenter(A, M, 0.01, numItermax=3, stopThr=0)
    with pytest.warns(UserWarning, match="Stabilized Sinkhorn did not converge"):
        pot.barycenter(A, M, 0.01, method="sinkhorn_stabilized", numItermax=3, stopThr=0)
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        pot.barycenter(A, M, 0.01, method="nope")
    with pytest.raises(AssertionError):
        pot.barycenter(A, M, 0.01, weights=np.ones(3) / 3)


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_stabilized"])
@pytest.mark.parametrize("dim,k,tau", [(40, 2, 1e10), (40, 3, 1e10), (800, 2, 1e10), (40, 3, 1e3)])
def test_barycenter_layouts_and_absorptions_match_pot(method, dim, k, tau):
    # 2 histograms below dim 800 run as columns, the rest as rows; tau = 1e3 absorbs often
    A, M = histograms(dim, k, seed=dim + k)
    kw = dict(method=method, stopThr=1e-9, numItermax=12 if dim > 100 else 400, log=True, warn=False)
    if method == "sinkhorn_stabilized":
        kw["tau"] = tau
    want, wlog = ot.bregman.barycenter(A, M, 0.003, **kw)
    got, glog = pot.barycenter(A, M, 0.003, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    assert glog.keys() == wlog.keys() and glog["niter"] == wlog["niter"]
    np.testing.assert_allclose(glog["err"], wlog["err"], rtol=1e-6, atol=1e-14)
    if method == "sinkhorn_stabilized" and tau < 1e10:  # absorptions happened: their iterations skip the check
        assert len(glog["err"]) < glog["niter"] // 10 + 1
    for key in set(glog) & {"logu", "logv"}:
        assert glog[key].shape == wlog[key].shape and glog[key].flags.c_contiguous
        np.testing.assert_allclose(glog[key], wlog[key], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_stabilized"])
def test_barycenter_torch_routes_match_pot(method):
    # float64 CPU tensors without gradient run the numpy iteration; float32 and tensors that
    # record a gradient run torch's (POT's gradient)
    A, M = histograms(30, 3, seed=5)
    At, Mt = torch.from_numpy(A), torch.from_numpy(M)
    want, wlog = ot.bregman.barycenter(At, Mt, 0.01, method=method, stopThr=1e-9, log=True)
    got, glog = pot.barycenter(At, Mt, 0.01, method=method, stopThr=1e-9, log=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert glog["niter"] == wlog["niter"] and all(isinstance(e, torch.Tensor) and e.dim() == 0 for e in glog["err"])
    for key in set(glog) & {"logu", "logv"}:
        torch.testing.assert_close(glog[key], wlog[key], rtol=1e-9, atol=1e-9)
    f32 = pot.barycenter(At.float(), Mt.float(), 0.01, method=method, stopThr=1e-6)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32, ot.bregman.barycenter(At.float(), Mt.float(), 0.01, method=method, stopThr=1e-6),
                               rtol=1e-4, atol=1e-6)
    grads = []
    for lib in (ot, pot):
        Ag = At.clone().requires_grad_()
        (lib.bregman.barycenter(Ag, Mt, 0.01, method=method, stopThr=1e-9) * torch.arange(30.0)).sum().backward()
        grads.append(Ag.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-12)
    # reg as a tensor (with and without a gradient) takes torch's route, as POT's backend does
    for wants_grad in (False, True):
        regs = [torch.tensor(0.01, dtype=torch.float64, requires_grad=wants_grad) for _ in range(2)]
        bars = [lib.bregman.barycenter(At, Mt, r, method=method, stopThr=1e-9) for lib, r in zip((ot, pot), regs)]
        torch.testing.assert_close(bars[1], bars[0], rtol=1e-10, atol=1e-14)
        if wants_grad:
            for bar, r in zip(bars, regs):
                (bar * torch.arange(30.0)).sum().backward()
            torch.testing.assert_close(regs[1].grad, regs[0].grad, rtol=1e-8, atol=1e-12)


def images(seed, size, k=2):
    rng = np.random.default_rng(seed)
    A = rng.random((k, size, size + 3)) + 0.01  # a non-square grid: the two blurs differ
    return A / A.sum((1, 2), keepdims=True)


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_log"])
@pytest.mark.parametrize("weights", [None, np.array([0.7, 0.2, 0.1])])
def test_convolutional_barycenter2d_matches_pot(method, weights):
    A = images(4, 12, k=3)
    kw = dict(method=method, numItermax=60, stopThr=1e-7, log=True, warn=False, weights=weights)
    want, wlog = ot.bregman.convolutional_barycenter2d(A, 0.02, **kw)
    got, glog = pot.convolutional_barycenter2d(A, 0.02, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert list(glog) == list(wlog) and glog["niter"] == wlog["niter"]
    np.testing.assert_allclose(glog["err"], wlog["err"], rtol=1e-9, atol=1e-16)
    for key in set(glog) - {"err", "niter"}:
        np.testing.assert_allclose(glog[key], wlog[key], rtol=1e-11)
    np.testing.assert_allclose(got.sum(), 1.0, rtol=1e-3)


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_log"])
def test_convolutional_barycenter2d_torch_warnings_and_errors_are_pots(method):
    A = images(5, 9)
    for dtype in (torch.float32, torch.float64):
        At = torch.from_numpy(A).to(dtype)
        got = pot.convolutional_barycenter2d(At, 0.03, method=method, numItermax=40, warn=False)
        want = ot.bregman.convolutional_barycenter2d(At, 0.03, method=method, numItermax=40, warn=False)
        assert got.dtype == dtype and got.device == At.device
        torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-9)
    if method == "sinkhorn":
        grads = []
        for lib in (ot, pot):
            Ag = torch.from_numpy(A).requires_grad_()
            (lib.bregman.convolutional_barycenter2d(Ag, 0.03, method=method, numItermax=20, warn=False)
             * torch.arange(9 * 12.0).view(9, 12)).sum().backward()
            grads.append(Ag.grad)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-12)
    else:  # POT's log route writes into views in place and cannot be differentiated; this one can
        with pytest.raises(RuntimeError):
            ot.bregman.convolutional_barycenter2d(torch.from_numpy(A).requires_grad_(), 0.03, method=method)
    tiny = torch.from_numpy(images(6, 3)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pot.convolutional_barycenter2d(x, 0.05, method=method, numItermax=4,
                                                                            warn=False), (tiny,))
    caught = []
    for lib in (ot, pot):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            lib.bregman.convolutional_barycenter2d(A, 0.03, method=method, numItermax=3)
        caught.append([str(w.message) for w in seen])
    assert caught[1] == caught[0] and "did not converge" in caught[0][0]
    with pytest.raises(ValueError, match="Unknown method"):
        pot.convolutional_barycenter2d(A, 0.03, method="greenkhorn")
