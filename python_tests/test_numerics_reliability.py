"""Silent wrong answers at the edges of the floating-point range (issue 27):
scale-invariant measures at extreme scales, ranks and spectra of tiny and
huge matrices, Sinkhorn kernels that underflow, power-law fits at a given
xmin, and results too large to allocate."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext import similarity as S
from spectral_ext import spectra as Sp
from spectral_ext.rank import matrix as RM

F64_SCALES = (1e150, 1e300, 1e-200)
F32_SCALES = (1e30, 1e-30)


def pair(dtype=torch.float64, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, 3, 3, dtype=torch.float64, generator=g)
    Y = (X + 0.7 * torch.randn(X.shape, dtype=torch.float64, generator=g)).relu()
    return X.to(dtype), Y.to(dtype)


# ---------------------------------------------------------------- 1. CKA and Procrustes at any scale

@pytest.mark.parametrize("kernel", S.KERNELS)
@pytest.mark.parametrize("dtype,scales,rel", [(torch.float64, F64_SCALES, 1e-10), (torch.float32, F32_SCALES, 2e-5)])
def test_cka_is_scale_invariant_at_extreme_scales(kernel, dtype, scales, rel):
    X, Y = pair(dtype)
    for batch_size, unbiased in ((None, True), (20, True), (None, False)):
        expected = S.cka(X, Y, kernel=kernel, batch_size=batch_size, unbiased=unbiased)
        for s in scales:
            assert S.cka(X * s, Y, kernel=kernel, batch_size=batch_size, unbiased=unbiased) == \
                pytest.approx(expected, rel=rel), (s, batch_size, unbiased)
            assert S.cka(X * s, Y * s, kernel=kernel, batch_size=batch_size, unbiased=unbiased) == \
                pytest.approx(expected, rel=rel), (s, batch_size, unbiased)


def test_minibatch_linear_cka_weighs_batches_of_different_scales_by_their_hsic():
    # sum over batches of HSIC_b(K, L) / sqrt(sum HSIC_b(K, K) sum HSIC_b(L, L)): a batch 1e200 larger dominates
    # the sums with Y in them, the others count 1e-400 as much there
    X, Y = pair(n=60)
    parts = [(X[i:i + 20], Y[i:i + 20]) for i in (0, 20, 40)]

    def h(A, B):
        K, L = (T.reshape(len(T), -1) @ T.reshape(len(T), -1).T for T in (A, B))
        return float(S.hsic(K[None], L[None])[0, 0])

    xx = sum(h(a, a) for a, _ in parts)
    expected = h(*parts[1]) / math.sqrt(xx * h(parts[1][1], parts[1][1]))
    accumulator = S.MinibatchCKA()
    for (a, b), s in zip(parts, (1.0, 1e200, 1e-200)):
        accumulator.update(a, b * s)
    assert float(accumulator.value()[0, 0]) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("group", S.GROUPS)
@pytest.mark.parametrize("centered", [False, True])
def test_procrustes_is_scale_invariant_at_extreme_scales(group, centered):
    X, Y = pair()
    for dtype, scales, rel in ((torch.float64, F64_SCALES + (1e200,), 1e-10), (torch.float32, F32_SCALES, 1e-5)):
        x, y = X.to(dtype), Y.to(dtype)
        expected = S.procrustes(x, y, group=group, centered=centered)
        distance = S.procrustes_distance(x, y, group=group, centered=centered)
        for s in scales:
            assert S.procrustes(x * s, y, group=group, centered=centered) == pytest.approx(expected, rel=rel)
            assert S.procrustes_distance(x, y * s, group=group, centered=centered) == pytest.approx(distance, rel=rel)


def test_grelu_assignment_scales_follow_the_inputs_scales():
    X, Y = pair()
    perm, scale = S.grelu_assignment(X, Y)
    for sx, sy in ((1e200, 1.0), (1e-200, 1.0), (1.0, 1e-200), (1e150, 1e-150)):
        p, c = S.grelu_assignment(X * sx, Y * sy)
        assert torch.equal(p, perm)
        torch.testing.assert_close(c, scale * (sy / sx), rtol=1e-12, atol=0)


@pytest.mark.parametrize("measure,options", [("cka", {"kernel": k}) for k in S.KERNELS]
                         + [("procrustes", {"group": g}) for g in S.GROUPS])
def test_pairwise_similarity_is_scale_invariant_at_extreme_scales(measure, options):
    X, Y = pair()
    for dtype, scales, rel in ((torch.float64, F64_SCALES, 1e-10), (torch.float32, F32_SCALES, 2e-5)):
        x, y = X.to(dtype), Y.to(dtype)
        expected = S.pairwise_similarity({"a": x, "b": y, "c": x + y}, measure=measure, progress=False,
                                         **options).to_frame()["value"].to_numpy()
        for s in scales:
            got = S.pairwise_similarity({"a": x * s, "b": y, "c": (x + y) * s}, measure=measure, progress=False,
                                        **options).to_frame()["value"].to_numpy()
            np.testing.assert_allclose(got, expected, rtol=rel)


class _Scale(nn.Module):
    def __init__(self, scales):
        super().__init__()
        self.scales, self.calls = scales, 0

    def forward(self, x):
        self.calls += 1
        return x * self.scales[(self.calls - 1) % len(self.scales)]


def _model(scales):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8).double(), nn.ReLU(),
                         nn.Sequential(nn.Linear(8, 8).double(), _Scale(scales)))


@pytest.mark.parametrize("measure,options", [("cka", {"kernel": "linear"}), ("cka", {"kernel": "rbf"}),
                                             ("procrustes", {"group": "orthogonal"}),
                                             ("procrustes", {"group": "grelu"})])
def test_similarity_matrix_is_scale_invariant_at_extreme_scales(measure, options):
    data = [torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def values(scales, same=False):
        other = _model(scales)
        return S.similarity_matrix(other if same else _model([1.0]), other, layers=["1", "2"], data=data,
                                   measure=measure, progress=False, **options).to_frame()["value"].to_numpy()

    expected = values([1.0])
    for s in F64_SCALES:
        np.testing.assert_allclose(values([s]), expected, rtol=1e-10)
    # one model, its two layers at scales 1 and s
    np.testing.assert_allclose(values([1e200], same=True), values([1.0], same=True), rtol=1e-10)
    # batches at different scales: each layer's sums kept at the largest scale seen, so they stay finite and the
    # smaller batches count 1e-200 (or less) as much as the largest, as they do in exact arithmetic; the RBF
    # Gram of each batch is scale invariant by itself
    mixed = values([1e-200, 1.0, 1e200])
    limit = values([1.0]) if options.get("kernel") == "rbf" else values([0.0, 0.0, 1.0])
    np.testing.assert_allclose(mixed, limit, rtol=1e-10)


def test_kernel_matrix_rescales_invariant_kernels_and_refuses_an_overflowing_linear_gram():
    X, _ = pair()
    R = S.as_channels("X", X)
    for kernel in ("rbf", "max", "laplace", "ortho"):
        expected = S.kernel_matrix(R, kernel)
        for s in F64_SCALES:
            torch.testing.assert_close(S.kernel_matrix(R * s, kernel), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"linear Gram of X overflows float64.*rescale X"):
        S.kernel_matrix(R * 1e200, "linear")


# ---------------------------------------------------------------- 2. ranks and spectra at any scale

@pytest.mark.parametrize("dtype,scales", [(torch.float64, (1e200, 1e-200, 1e300, 1e-300)),
                                          (torch.float32, (1e25, 1e-25, 1e35, 1e-35))])
def test_stable_and_numerical_rank_are_scale_invariant(dtype, scales):
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(3, 30, 5, dtype=torch.float64, generator=g) @ torch.randn(3, 5, 20, dtype=torch.float64,
                                                                               generator=g)).to(dtype)
    W[1, :, :2] *= 100  # a different stable rank per matrix
    stable, rank = se.stable_rank(W), se.numerical_rank(W)
    assert rank.tolist() == [5, 5, 5]
    for s in scales:
        torch.testing.assert_close(se.stable_rank(W * s), stable, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=0)
        assert torch.equal(se.numerical_rank(W * s), rank)


def test_singular_values_of_rows_at_extreme_scales():
    g = torch.Generator().manual_seed(0)
    for M in (torch.randn(200, 7, dtype=torch.float64, generator=g),
              torch.randn(9, 7, dtype=torch.float64, generator=g)):
        expected = RM.singular_values_of_rows(M)
        for s in (1e200, 1e-200, 1e300):
            torch.testing.assert_close(RM.singular_values_of_rows(M * s) / s, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("convention", Sp.CONVENTIONS)
def test_weight_singular_values_and_metrics_at_extreme_scales(convention):
    W = torch.randn(2, 8, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = Sp.weight_singular_values(W, convention)
    metrics = Sp.spectrum_metrics(expected, fit=False)
    for s in (1e200, 1e-200, 1e-300):
        sigma = Sp.weight_singular_values(W * s, convention)
        torch.testing.assert_close(sigma / s, expected, rtol=1e-12, atol=0)
        got = Sp.spectrum_metrics(sigma, fit=False)
        np.testing.assert_allclose(got["stable_rank"], metrics["stable_rank"], rtol=1e-12)
        assert got["numerical_rank"].tolist() == metrics["numerical_rank"].tolist()


# ---------------------------------------------------------------- 3. Sinkhorn kernels that underflow

def _costs(B=2, n=6, m=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    M = 10 + torch.rand(B, n, m, dtype=torch.float64, generator=g)
    a = torch.rand(B, n, dtype=torch.float64, generator=g) + 0.5
    b = torch.rand(B, m, dtype=torch.float64, generator=g) + 0.5
    return M.to(dtype), (a / a.sum(1, keepdim=True)).to(dtype), (b / b.sum(1, keepdim=True)).to(dtype)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_sinkhorn_switches_to_the_log_domain_where_the_kernel_underflows(backend):
    M, a, b = _costs()
    with se.use_backend(backend):
        for costs, reg in ((M, 0.01), (-M, 0.01), (M / 10, 0.0015)):  # exp(-1000), exp(+1000), exp(-700..-730)
            want, want_log = se.sinkhorn(costs, 100, a, b, reg=reg, log_domain=True, return_log=True)
            got, log = se.sinkhorn(costs, 100, a, b, reg=reg, return_log=True)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
            torch.testing.assert_close(got.sum(2), a, rtol=1e-12, atol=0)  # the rows are fitted last
            # the potentials of the kernel exp(-M / reg) as documented
            torch.testing.assert_close((-costs / reg + log["log_u"][:, :, None] + log["log_v"][:, None, :]).exp(),
                                       got, rtol=1e-9, atol=0)
        # float32: exp(-100) is below float32's smallest normal
        M32, a32, b32 = M.float() / 10, a.float(), b.float()
        got = se.sinkhorn(M32, 100, a32, b32, reg=0.01)
        torch.testing.assert_close(got, se.sinkhorn(M32, 100, a32, b32, reg=0.01, log_domain=True))
        assert torch.isfinite(got).all()


def test_sinkhorn_refuses_a_reg_no_dtype_resolves():
    M, a, b = _costs()
    for log_domain in (False, True):
        with pytest.raises(ValueError, match=r"reg = 1e-300 is too small.*log_domain=True.*raise reg"):
            se.sinkhorn(M, 100, a, b, reg=1e-300, log_domain=log_domain)
    with pytest.raises(ValueError, match=r"M / reg overflows float64.*raise reg"):
        se.sinkhorn(M * 1e10, 100, a, b, reg=1e-300)
    with pytest.raises(ValueError, match=r"reg = 1e-09 is too small.*float32"):
        se.sinkhorn(M.float(), 100, a.float(), b.float(), reg=1e-9)


def test_pot_adapter_keeps_pots_exit_where_its_kernel_underflows():
    import ot
    from spectral_ext.compat import pot

    M, a, b = (t[0].numpy() for t in _costs())
    for reg in (0.01, 1e-300):
        with pytest.warns(UserWarning, match="numerical errors at iteration 0"):
            want, want_log = ot.sinkhorn(a, b, M, reg, log=True)
        with pytest.warns(UserWarning, match="numerical errors at iteration 0"):
            got, log = pot.sinkhorn(a, b, M, reg, log=True)
        np.testing.assert_array_equal(got, want)  # diag(1/n) K diag(1/m) with K = 0: not NaN
        assert log["niter"] == want_log["niter"] and len(log["err"]) == len(want_log["err"]) == 0
        np.testing.assert_allclose(log["u"], want_log["u"])
        np.testing.assert_allclose(log["v"], want_log["v"])
    # the log-domain method is unchanged: POT's plan
    np.testing.assert_allclose(pot.sinkhorn_log(a, b, M, 0.01), ot.bregman.sinkhorn_log(a, b, M, 0.01), atol=1e-12)


# ---------------------------------------------------------------- 4. power-law fits at a given xmin

def _mle_at(x, xmin):
    """Clauset et al.'s continuous MLE and its two-sided KS distance at xmin, by plain loops."""
    tail = sorted(float(v) for v in x if v >= xmin)
    n = len(tail)
    alpha = 1 + n / sum(math.log(v / xmin) for v in tail)
    ks = 0.0
    for j, v in enumerate(tail):
        fitted = 1 - (v / xmin) ** (1 - alpha)
        ks = max(ks, abs(fitted - j / n), abs((j + 1) / n - fitted))
    return alpha, ks, n


def test_fit_power_law_at_a_given_xmin_is_the_mle_at_that_xmin():
    x = Sp.sample_power_law(2.0, 0.5, 300, torch.Generator().manual_seed(0))
    assert float(x.min()) < 1.0 < float(x.max())
    for xmin in (1.0, 0.7, 0.3, float(x.sort().values[100])):
        alpha, ks, n_tail = _mle_at(x.tolist(), xmin)
        fit = Sp.fit_power_law(x, xmin=xmin)
        assert fit.status == "success" and fit.xmin == xmin and fit.n_tail == n_tail
        assert fit.alpha == pytest.approx(alpha, rel=1e-12) and fit.ks == pytest.approx(ks, rel=1e-9)
        assert fit.sigma == pytest.approx((alpha - 1) / math.sqrt(n_tail), rel=1e-12)
    # the batched fit, each row at the same given xmin
    rows = torch.stack([x, 3 * x, x.flip(0)])
    frame = Sp.fit_power_laws(rows, xmin=1.0).to_frame()
    for r in range(3):
        alpha, ks, n_tail = _mle_at(rows[r].tolist(), 1.0)
        assert frame["alpha"][r] == pytest.approx(alpha, rel=1e-12) and frame["ks"][r] == pytest.approx(ks, rel=1e-9)
        assert frame["xmin"][r] == 1.0 and frame["n_tail"][r] == n_tail


def test_fit_power_law_refuses_complex_eigenvalues_and_an_infinite_xmin():
    x = Sp.sample_power_law(2.0, 1.0, 100, torch.Generator().manual_seed(0))
    for fit in (Sp.fit_power_law, Sp.fit_power_laws):
        with pytest.raises(TypeError, match="eigenvalues must be real, got complex128"):
            fit(x.to(torch.complex128))
        with pytest.raises(TypeError, match="eigenvalues must be real"):
            fit(x.numpy() + 0j, xmin=1.0)
        for bad in (math.inf, math.nan, 0.0):
            with pytest.raises(ValueError, match="xmin must be a positive finite number"):
                fit(x, xmin=bad)
    with pytest.raises(ValueError, match="xmin cannot be given with convention='weightwatcher'"):
        Sp.fit_power_laws(x[None], xmin=1.0, convention="weightwatcher")


# ---------------------------------------------------------------- 5. results too large to allocate, and peaks

def test_results_and_intermediates_too_large_to_allocate_are_refused_up_front():
    one = torch.randn(1, 1, 1)
    U, V = one.expand(1, 1, 2**20), one[..., None].expand(1, 1, 1, 2**20)  # a 4 TiB (1, 2^20, 2^20) result
    with pytest.raises(ValueError, match=r"conv_adjacency of U \(1, 1, 1048576\) and V .*4.1e\+03 GiB.*free"):
        se.conv_adjacency(U, V)
    with pytest.raises(ValueError, match=r"max_kernel_gram of X \(1048576, 1, 1\) \(a 1048576 x 1048576 result"):
        se.max_kernel_gram(one.expand(2**20, 1, 1))
    # a small result whose route needs terabytes: 64-row tiles of an expanded X; the twin's products
    with pytest.raises(ValueError, match=r"max_kernel_gram of X \(64, 131072, 131072\) \(a 64 x 64 result"):
        se.max_kernel_gram(one.expand(64, 2**17, 2**17))
    with se.use_backend("reference"):
        with pytest.raises(ValueError, match=r"max_kernel_gram of X \(1, 1048576, 1048576\)"):
            se.max_kernel_gram(one.expand(1, 2**20, 2**20))
        with pytest.raises(ValueError, match=r"conv_adjacency of U \(1, 4, 1024\)"):
            se.conv_adjacency(one.expand(1, 4, 2**10), one[..., None].expand(1, 4, 2**20, 2**10))
    # what fits still runs, from expanded inputs too, without materialising them
    K = se.max_kernel_gram(one.expand(3, 5, 7), one.expand(40, 5, 7))
    torch.testing.assert_close(K, torch.full((3, 40), 7 * float(one) ** 2))


@pytest.mark.parametrize("N,Np,C,S", [(1, 1, 1, 1), (2, 2, 3, 4), (5, 70, 4, 1), (31, 31, 3, 2), (3, 100, 2, 5)])
def test_max_kernel_gram_below_a_half_tile_reads_its_inputs_in_place(N, Np, C, S):
    from spectral_ext import reference

    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, C, S, dtype=torch.float64, generator=g)
    Y = torch.randn(Np, C, S, dtype=torch.float64, generator=g)
    want = reference.max_kernel_gram(X, Y)
    torch.testing.assert_close(se.max_kernel_gram(X, Y), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(se.max_kernel_gram(X.transpose(0, 2).contiguous().transpose(0, 2), Y), want,
                               rtol=1e-12, atol=1e-12)
    K = se.max_kernel_gram(X)
    torch.testing.assert_close(K, reference.max_kernel_gram(X), rtol=1e-12, atol=1e-12)
    assert torch.equal(K, K.T)
    X[0, -1, 0] = float("nan")  # the max propagates NaN as amax does
    got = torch.ops.spectral_ext.max_kernel_gram(X, Y)
    assert torch.equal(torch.isnan(got), torch.isnan(reference.max_kernel_gram(X, Y))) and torch.isnan(got[0]).all()


_GRAM_PEAK = """
import sys, torch, spectral_ext as se

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

se.max_kernel_gram(torch.randn(2, 3, 4))
se.max_kernel_gram(torch.randn(70, 3, 4))
for N in (2, 64):  # a quarter of a tile, read in place; whole tiles, packed once
    X = torch.randn(N, 1024, 8192 // N)  # 32 MiB of float32
    open("/proc/self/clear_refs", "w").write("5")
    before = rss("VmRSS:")
    se.max_kernel_gram(X)
    print(N, (rss("VmHWM:") - before) / 2**20)
    del X
"""


def test_max_kernel_gram_peak_memory_is_about_the_input():
    import os
    import subprocess
    import sys

    # A fixed mmap threshold: the resident peak then measures live memory, not glibc's heap history.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _GRAM_PEAK], capture_output=True, text=True, check=True, env=env,
                         timeout=120)
    peaks = {int(n): float(mib) for n, mib in (line.split() for line in out.stdout.strip().splitlines())}
    print(peaks)
    # MiB beyond a 32 MiB X: N = 2 peaked at 2.0 GiB (and took 10 s) in 64-row tiles, padded then copied again
    assert peaks[2] < 8 and peaks[64] < 40
