"""Batched entropic Sinkhorn: POT 0.9.7's ot.batch.solve_batch against
spectral_ext (the drop-in spectral_ext.compat.pot.batch.solve_batch and the plain
se.sinkhorn call), 100 rounds, float64, one thread per side, interleaved repeats;
the plans must agree. Issue 13's target: at least 5x faster than POT. Then the
entropic barycenter (ot.bregman.barycenter, three methods) and exact OT (emd2: a
batch against a POT loop, and costs spanning 16 decades), numpy in and out."""
import os
import sys

import numpy as np
import pytest
import torch

ot = pytest.importorskip("ot")
sys.path.insert(0, os.path.dirname(__file__))
from timing import interleaved, report  # noqa: E402

import spectral_ext as se  # noqa: E402
from spectral_ext.compat import pot  # noqa: E402

ROUNDS = 100
# (B, n, POT's batch size): POT is timed on its own batch (the whole one, or part of it,
# scaled up, where one POT run takes most of a minute).
CASES = [(256, 64, 256), (256, 128, 64), (64, 512, 8)]


def problems(B, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.rand(B, n, n, generator=g, dtype=torch.float64)
    a = torch.full((B, n), 1.0 / n, dtype=torch.float64)
    return M, a, a.clone()


@pytest.mark.parametrize("B,n,B_pot", CASES)
@pytest.mark.parametrize("method", ["sinkhorn", "log_sinkhorn"])
def test_sinkhorn_batch_vs_pot(B, n, B_pot, method):
    torch.set_num_threads(1)
    M, a, b = problems(B, n)
    Mp, ap, bp = M[:B_pot], a[:B_pot], b[:B_pot]
    log_domain = method == "log_sinkhorn"
    kw = dict(reg=0.05, max_iter=ROUNDS, tol=0.0, method=method)
    want = ot.batch.solve_batch(Mp, a=ap, b=bp, **kw)
    got = pot.batch.solve_batch(Mp, a=ap, b=bp, **kw)
    torch.testing.assert_close(got.plan, want.plan, rtol=1e-8, atol=1e-12)
    repeats = 5 if B_pot * n * n <= 256 * 64 * 64 else 3
    med = interleaved({
        "POT": lambda: ot.batch.solve_batch(Mp, a=ap, b=bp, **kw),
        "compat": lambda: pot.batch.solve_batch(Mp, a=ap, b=bp, **kw),
        "se.sinkhorn": lambda: se.sinkhorn(Mp, ROUNDS, ap, bp, reg=0.05, log_domain=log_domain),
    }, repeats)
    scale = B / B_pot
    full = {k: v * scale for k, v in med.items()}
    if B_pot != B:
        full["se.sinkhorn (all B)"] = interleaved(
            {"x": lambda: se.sinkhorn(M, ROUNDS, a, b, reg=0.05, log_domain=log_domain)}, 3)["x"]
    report(f"{method} B={B} {n}x{n} {ROUNDS} rounds f64 (POT {ot.__version__}, POT timed on {B_pot}, scaled)",
           full, "POT")
    assert full["POT"] / full["compat"] >= 5, "issue 13 asks for at least 5x"


def test_log_domain_within_2x_of_plain():
    torch.set_num_threads(1)
    M, a, b = problems(256, 128)
    med = interleaved({
        "plain": lambda: se.sinkhorn(M, ROUNDS, a, b, reg=0.05),
        "log": lambda: se.sinkhorn(M, ROUNDS, a, b, reg=0.05, log_domain=True),
        "paper form (no marginals)": lambda: se.sinkhorn(torch.exp(-M / 0.05), ROUNDS),
    })
    report("se.sinkhorn B=256 128x128 100 rounds f64: log domain vs plain", med, "log")
    assert med["log"] <= 2 * med["plain"]


# ---------------------------------------------------------------- barycenter and exact OT
# numpy in and out, one BLAS thread on each side (threadpoolctl: OpenBLAS is loaded before
# the test can set OPENBLAS_NUM_THREADS), interleaved repeats, medians.

def one_blas_thread():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    torch.set_num_threads(1)
    return threadpoolctl.threadpool_limits(1)


def histograms(dim, k, seed=0):
    rng = np.random.default_rng(seed)
    x = np.arange(dim, dtype=np.float64)
    A = np.stack([np.exp(-((x - c) / (2 + 3 * rng.random())) ** 2) + 1e-3 for c in rng.uniform(5, dim - 5, k)], 1)
    M = (x[:, None] - x[None, :]) ** 2
    return A / A.sum(0), M / M.max()


# (method, dim, n_hists, iterations, assert faster): the ratio is asserted where it held by a
# margin on a loaded 2-core machine (sinkhorn at 400 x 5 measured 1.04-1.15x: reported only)
BARYCENTER_CASES = [("sinkhorn", 400, 5, 200, False), ("sinkhorn", 1000, 10, 200, True),
                    ("sinkhorn_stabilized", 400, 5, 200, True), ("sinkhorn_stabilized", 1000, 10, 200, True),
                    ("sinkhorn_log", 200, 5, 50, True), ("sinkhorn_log", 400, 5, 20, True)]


@pytest.mark.parametrize("method,dim,k,iters,faster", BARYCENTER_CASES)
def test_barycenter_vs_pot(method, dim, k, iters, faster):
    A, M = histograms(dim, k)
    kw = dict(method=method, numItermax=iters, stopThr=0.0, warn=False)
    with one_blas_thread():
        want, got = ot.bregman.barycenter(A, M, 0.01, **kw), pot.barycenter(A, M, 0.01, **kw)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)
        med = interleaved({"POT": lambda: ot.bregman.barycenter(A, M, 0.01, **kw),
                           "compat": lambda: pot.barycenter(A, M, 0.01, **kw)}, 5 if dim <= 400 else 3)
    report(f"barycenter {method} {dim} x {k} histograms, {iters} iterations, reg 0.01 (POT {ot.__version__}, "
           f"max rel diff {np.max(np.abs(got - want) / want):.1e}, load {os.getloadavg()[0]:.1f})", med, "POT")
    if faster:
        assert med["POT"] / med["compat"] > 1


@pytest.mark.parametrize("method,size,iters", [("sinkhorn", 50, 200), ("sinkhorn", 100, 100),
                                               ("sinkhorn_log", 30, 30), ("sinkhorn_log", 50, 20)])
def test_convolutional_barycenter2d_vs_pot(method, size, iters):
    rng = np.random.default_rng(0)
    A = rng.random((2, size, size)) + 0.01
    A /= A.sum((1, 2), keepdims=True)
    kw = dict(method=method, numItermax=iters, stopThr=0.0, warn=False)
    with one_blas_thread():
        want = ot.bregman.convolutional_barycenter2d(A, 0.01, **kw)
        got = pot.convolutional_barycenter2d(A, 0.01, **kw)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)
        med = interleaved({"POT": lambda: ot.bregman.convolutional_barycenter2d(A, 0.01, **kw),
                           "compat": lambda: pot.convolutional_barycenter2d(A, 0.01, **kw)}, 5)
    report(f"convolutional_barycenter2d {method} 2 x {size}x{size}, {iters} iterations, reg 0.01 (POT {ot.__version__}, "
           f"max rel diff {np.max(np.abs(got - want) / want):.1e}, load {os.getloadavg()[0]:.1f})", med, "POT")
    assert med["POT"] / med["compat"] > 1


def exact_problems(kind, B, n, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "wide":  # costs spanning 1e-8..1e8
        M = 10.0 ** rng.uniform(-8, 8, (B, n, n))
    elif kind == "uniform [0,1) costs":
        M = rng.random((B, n, n))
    else:
        x, y = rng.standard_normal((B, n, 2)), rng.standard_normal((B, n, 2)) + 0.5
        M = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)
    if kind in ("random marginals", "wide"):
        a, b = rng.random((B, n)) + 0.1 * (kind != "wide"), rng.random((B, n)) + 0.1 * (kind != "wide")
        a, b = a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)
    else:
        a = b = np.full((B, n), 1.0 / n)
    return a, b, M


@pytest.mark.parametrize("kind", ["sq. Euclidean, uniform marginals", "random marginals", "uniform [0,1) costs"])
def test_emd2_batch_vs_pot_loop(kind):
    B, n = 64, 100
    a, b, M = exact_problems(kind, B, n)
    with one_blas_thread():
        want = np.array([ot.emd2(a[k], b[k], M[k]) for k in range(B)])
        got = pot.emd2(a, b, M)
        np.testing.assert_allclose(got, want, rtol=1e-12)  # the plan may differ on ties
        med = interleaved({"POT loop": lambda: [ot.emd2(a[k], b[k], M[k]) for k in range(B)],
                           "compat batch": lambda: pot.emd2(a, b, M)}, 7)
    report(f"emd2 {B} x {n}x{n}, {kind} (POT {ot.__version__}, load {os.getloadavg()[0]:.1f})", med, "POT loop")
    assert med["POT loop"] / med["compat batch"] > 1


@pytest.mark.parametrize("marginals", ["random", "uniform"])
def test_emd2_wide_range_costs_vs_pot(marginals):
    # costs spanning 1e-8..1e8: POT 0.9.7 stops early at a suboptimal basis (its cost several
    # times the optimum), which is where its speed comes from; no speed assertion
    a, b, M = exact_problems("wide", 1, 300, seed=0)
    a, b, M = a[0], b[0], M[0]
    if marginals == "uniform":
        a = b = np.full(300, 1 / 300)
    with one_blas_thread():
        want, got = ot.emd2(a, b, M), pot.emd2(a, b, M)
        assert got <= want * (1 + 1e-12)  # the optimum or POT's early stop above it
        med = interleaved({"POT": lambda: ot.emd2(a, b, M), "compat": lambda: pot.emd2(a, b, M)}, 7)
    report(f"emd2 one 300x300, costs 1e-8..1e8, {marginals} marginals (POT {ot.__version__}: cost {want / got:.1f}x "
           f"ours, load {os.getloadavg()[0]:.1f})", med, "POT")
