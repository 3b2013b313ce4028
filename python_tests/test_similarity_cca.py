"""The CCA family, linear regression and the kernel Measures (similarity.cca,
similarity.kernels) against independent routes: canonical correlations from
the generalised eigenproblem of the covariance matrices (scipy.linalg.eigh),
Yanai's R^2 from projection matrices, R^2 from numpy.linalg.lstsq, PWCCA
written from the google svcca recipe (QR of the canonical variates), SVCCA by
numpy SVD truncation, HSIC from its trace formulas with explicit H; their
invariances, properties and edge cases; the batched K x K against the pairs."""
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import torch

from spectral_ext.similarity.measure import compare, measure_matrix
from spectral_ext.similarity.measure import get_measure as measure

RNG = np.random.default_rng(26)


def rand(n=80, d=6, seed=None):
    g = RNG if seed is None else np.random.default_rng(seed)
    return g.standard_normal((n, d)) @ g.standard_normal((d, d)) + g.standard_normal(d)


def related(X, d=5, noise=0.5, seed=1):
    g = np.random.default_rng(seed)
    return X @ g.standard_normal((X.shape[1], d)) + noise * g.standard_normal((X.shape[0], d))


def canonical_correlations(X, Y):
    """rho from Sxy Syy^-1 Syx a = rho^2 Sxx a (full-rank X, Y), by scipy's generalised eigh."""
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Sxx, Syy, Sxy = Xc.T @ Xc, Yc.T @ Yc, Xc.T @ Yc
    small, A, B = (Sxx, Sxy, Syy) if X.shape[1] <= Y.shape[1] else (Syy, Sxy.T, Sxx)
    vals = scipy.linalg.eigh(A @ np.linalg.solve(B, A.T), small, eigvals_only=True)
    return np.sqrt(np.clip(np.sort(vals)[::-1], 0, None))


def projection(X):
    Xc = X - X.mean(0)
    return Xc @ np.linalg.pinv(Xc)


@pytest.mark.parametrize("dx, dy", [(6, 6), (4, 9), (9, 3)])
def test_mean_cca_and_r2_against_generalised_eigenproblem(dx, dy):
    X = rand(d=dx)
    Y = related(X, dy)
    rho = canonical_correlations(X, Y)
    assert compare(X, Y, "mean_cca") == pytest.approx(rho.mean(), rel=1e-10)
    assert compare(X, Y, "mean_r2_cca") == pytest.approx((rho ** 2).mean(), rel=1e-10)
    # Yanai's form: tr(P_X P_Y) / min(rank)
    yanai = np.trace(projection(X) @ projection(Y)) / min(dx, dy)
    assert compare(X, Y, "mean_r2_cca") == pytest.approx(yanai, rel=1e-10)


def test_canonical_correlations_against_sklearn():
    from sklearn.cross_decomposition import CCA

    X, Y = rand(d=3), None
    Y = related(X, 3, noise=1.0)
    u, v = CCA(n_components=3, max_iter=5000, tol=1e-14, scale=False).fit(X, Y).transform(X, Y)
    rho = [abs(np.corrcoef(u[:, i], v[:, i])[0, 1]) for i in range(3)]
    assert compare(X, Y, "mean_cca") == pytest.approx(np.mean(rho), rel=1e-6)


def test_linear_regression_against_lstsq():
    X, Y = rand(d=7), None
    Y = related(X, 4, noise=2.0)
    A = np.column_stack([X, np.ones(len(X))])
    resid = Y - A @ np.linalg.lstsq(A, Y, rcond=None)[0]
    Yc = Y - Y.mean(0)
    r2 = 1 - (resid ** 2).sum() / (Yc ** 2).sum()
    assert compare(X, Y, "linear_regression") == pytest.approx(r2, rel=1e-10)
    # asymmetric; symmetric=True the mean of both directions
    back = compare(Y, X, "linear_regression")
    assert abs(back - r2) > 1e-3
    assert compare(X, Y, "linear_regression", symmetric=True) == pytest.approx((r2 + back) / 2, rel=1e-12)
    # uncentred: no intercept
    resid0 = Y - X @ np.linalg.lstsq(X, Y, rcond=None)[0]
    assert compare(X, Y, "linear_regression", centered=False) == \
        pytest.approx(1 - (resid0 ** 2).sum() / (Y ** 2).sum(), rel=1e-10)


def svcca_by_hand(X, Y, keep):
    def reduced(Z):
        Zc = Z - Z.mean(0)
        U, s, _ = np.linalg.svd(Zc, full_matrices=False)
        share = np.cumsum(s ** 2) / (s ** 2).sum()
        k = int(np.searchsorted(share, keep) + 1) if keep < 1 else len(s)
        return U[:, :k] * s[:k]
    return canonical_correlations(reduced(X), reduced(Y))


def test_svcca_against_numpy_truncation():
    g = np.random.default_rng(3)
    X = g.standard_normal((200, 10)) * np.geomspace(10, 0.01, 10)  # a few directions carry the variance
    Y = related(X, 8, noise=0.3) * np.geomspace(5, 0.05, 8)
    rho = svcca_by_hand(X, Y, 0.99)
    assert compare(X, Y, "svcca") == pytest.approx(rho.mean(), rel=1e-10)
    assert compare(X, Y, "svcca", summary="yanai") == pytest.approx((rho ** 2).mean(), rel=1e-10)
    assert compare(X, Y, "svcca", summary="pillai") == compare(X, Y, "svcca")
    # dims: the leading 3 directions of each
    def top(Z, k):
        U, s, _ = np.linalg.svd(Z - Z.mean(0), full_matrices=False)
        return U[:, :k]
    assert compare(X, Y, "svcca", dims=3) == pytest.approx(canonical_correlations(top(X, 3), top(Y, 3)).mean(),
                                                           rel=1e-10)
    assert compare(X, Y, "svcca", variance=1.0) == pytest.approx(compare(X, Y, "mean_cca"), rel=1e-12)


def pwcca_google(X, Y):
    """Morcos et al.'s recipe in the google svcca code's terms: canonical variates of X
    in sample space, orthonormalised by QR, weights sum_j |<h_i, x_j>| over X's centred neurons."""
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Sxx, Syy, Sxy = Xc.T @ Xc, Yc.T @ Yc, Xc.T @ Yc
    Wx = np.linalg.inv(scipy.linalg.sqrtm(Sxx).real)
    Wy = np.linalg.inv(scipy.linalg.sqrtm(Syy).real)
    u, rho, _ = np.linalg.svd(Wx @ Sxy @ Wy)
    k = min(X.shape[1], Y.shape[1])
    dirns = Xc @ Wx @ u[:, :k]  # canonical variates of X, (N, k)
    P, _ = np.linalg.qr(dirns)
    w = np.abs(P.T @ Xc).sum(1)
    return (w / w.sum()) @ rho[:k]


@pytest.mark.parametrize("dx, dy", [(5, 5), (4, 7), (7, 4)])
def test_pwcca_against_google_recipe(dx, dy):
    X = rand(d=dx)
    Y = related(X, dy, noise=1.0)
    assert compare(X, Y, "pwcca") == pytest.approx(pwcca_google(X, Y), rel=1e-9)
    assert compare(X, Y, "pwcca", symmetric=True) == \
        pytest.approx((pwcca_google(X, Y) + pwcca_google(Y, X)) / 2, rel=1e-9)


ALL = ["mean_cca", "mean_r2_cca", "svcca", "pwcca", "linear_regression"]
SYMMETRIC = ["mean_cca", "mean_r2_cca", "svcca", ("pwcca", {"symmetric": True}),
             ("linear_regression", {"symmetric": True}), "cka", ("cka", {"kernel": "rbf"}), "hsic", "dot_product",
             "procrustes", ("cka", {"kernel": "rbf_dualmed", "estimator": "lange"})]


def spec(s):
    return (s, {}) if isinstance(s, str) else s


@pytest.mark.parametrize("name, opts", [spec(s) for s in ALL + SYMMETRIC])
def test_matrix_matches_pairs(name, opts):
    reps = [rand(60, d) for d in (4, 6, 6, 9)]
    reps.append(related(reps[0], 6, noise=0.2))
    M = measure_matrix(reps, name, **opts).matrix.values
    for i in range(len(reps)):
        for j in range(len(reps)):
            if i != j:
                assert M[i, j] == pytest.approx(compare(reps[i], reps[j], name, **opts), rel=1e-9, abs=1e-12)
    if (name, opts) in [spec(s) for s in SYMMETRIC]:
        np.testing.assert_allclose(M, M.T, rtol=1e-12, atol=1e-14)
    if name not in ("hsic", "dot_product"):
        np.testing.assert_allclose(np.diag(M), 1.0, atol=1e-12)


def test_asymmetric_matrices_row_is_first_argument():
    reps = [rand(60, 4), rand(60, 7)]
    for name in ("pwcca", "linear_regression"):
        M = measure_matrix(reps, name).matrix.values
        assert M[0, 1] == pytest.approx(compare(reps[0], reps[1], name), rel=1e-10)
        assert M[1, 0] == pytest.approx(compare(reps[1], reps[0], name), rel=1e-10)
        assert abs(M[0, 1] - M[1, 0]) > 1e-4


@pytest.mark.parametrize("name", ["mean_cca", "mean_r2_cca", "linear_regression"])
def test_invariant_to_invertible_linear_maps_and_translation(name):
    X, Y = rand(d=5), None
    Y = related(X, 5, noise=1.0)
    base = compare(X, Y, name)
    A = np.random.default_rng(7).standard_normal((5, 5))
    assert compare(X @ A + 3.0, Y, name) == pytest.approx(base, rel=1e-9)
    if name != "linear_regression":  # Y's side: orthogonal and scaling only for R^2
        assert compare(X, Y @ A - 2.0, name) == pytest.approx(base, rel=1e-9)


@pytest.mark.parametrize("name, opts", [("svcca", {}), ("svcca", {"variance": 0.9}),
                                        ("linear_regression", {}), ("cka", {}), ("cka", {"kernel": "rbf"}),
                                        ("procrustes", {"centered": True})])
def test_invariant_to_orthogonal_maps_isotropic_scaling_translation(name, opts):
    g = np.random.default_rng(11)
    X = g.standard_normal((90, 8)) * np.geomspace(10, 0.1, 8)
    Y = related(X, 6, noise=0.5)
    base = compare(X, Y, name, **opts)
    Q, _ = np.linalg.qr(g.standard_normal((8, 8)))
    Q2, _ = np.linalg.qr(g.standard_normal((6, 6)))
    assert compare(2.5 * X @ Q + 1.0, Y, name, **opts) == pytest.approx(base, rel=1e-8)
    assert compare(X, 0.3 * Y @ Q2 - 4.0, name, **opts) == pytest.approx(base, rel=1e-8)


def test_pwcca_invariances():
    g = np.random.default_rng(13)
    X = g.standard_normal((90, 8)) * np.geomspace(10, 0.1, 8)
    Y = related(X, 6, noise=0.5)
    base = compare(X, Y, "pwcca")
    signs = np.where(g.random(8) < 0.5, -1.0, 1.0)
    assert compare(3.0 * X[:, g.permutation(8)] * signs - 1.0, Y, "pwcca") == pytest.approx(base, rel=1e-9)
    assert compare(X, Y @ g.standard_normal((6, 6)) + 5.0, "pwcca") == pytest.approx(base, rel=1e-9)
    Q, _ = np.linalg.qr(g.standard_normal((8, 8)))
    assert abs(compare(X @ Q, Y, "pwcca") - base) > 1e-4  # the weights are l1 sums over X's neurons


def test_svcca_not_invariant_to_general_linear_maps():
    g = np.random.default_rng(12)
    X = g.standard_normal((90, 8)) * np.geomspace(10, 0.1, 8)
    Y = related(X, 6, noise=0.5)
    A = np.diag(np.geomspace(0.01, 100, 8))
    assert abs(compare(X @ A, Y, "svcca") - compare(X, Y, "svcca")) > 1e-3


def test_ranges_identity_and_unrelated():
    X = rand(500, 5)
    Y = np.random.default_rng(99).standard_normal((500, 5))
    for name in ALL:
        assert compare(X, X, name) == pytest.approx(1.0, abs=1e-12)
        v = compare(X, Y, name)
        assert 0 <= v < 0.2, name
    rho = canonical_correlations(X, Y)
    assert compare(X, Y, "mean_r2_cca") <= compare(X, Y, "mean_cca")  # rho^2 <= rho
    assert compare(X, Y, "mean_r2_cca") == pytest.approx((rho ** 2).mean(), rel=1e-9)


def test_constant_and_duplicate_columns_dropped_by_rank():
    X = rand(70, 5)
    Y = related(X, 4, noise=1.0)
    padded = np.column_stack([X, np.full(70, 3.0), X[:, 0] * 2 - X[:, 1]])  # a constant and a dependent column
    for name in ALL:
        if name not in ("svcca", "pwcca"):
            assert compare(padded, Y, name) == pytest.approx(compare(X, Y, name), rel=1e-9), name
        # a constant column adds nothing; a dependent one adds variance (svcca's kept directions) and a neuron
        # (pwcca's weights)
        assert compare(padded[:, :6], Y, name) == pytest.approx(compare(X, Y, name), rel=1e-9), name
    # repsim's denominator counts the raw rank, where the constant column adds one
    assert compare(padded, Y, "mean_cca", denominator="raw_rank") == \
        pytest.approx(compare(X, Y, "mean_cca"), rel=1e-9)  # min(6, 4) = min(5, 4) = 4
    assert compare(padded, padded, "mean_cca", denominator="raw_rank") == pytest.approx(5 / 6, rel=1e-12)


def test_rank_zero_raises_naming_it():
    X = rand(30, 3)
    C = np.full((30, 3), 2.0)
    for name in ALL:
        with pytest.raises(ValueError, match="Y"):
            compare(X, C, name)
    with pytest.raises(ValueError, match="position 1"):
        measure("mean_cca").matrix([measure("mean_cca").reduce(torch.from_numpy(X)),
                                    measure("mean_cca").reduce(torch.from_numpy(C))])


def test_few_inputs_every_correlation_one():
    # N - 1 <= D: the centred column spaces are the whole centred space, documented
    X, Y = rand(8, 10, seed=5), rand(8, 10, seed=6)
    assert compare(X, Y, "mean_cca") == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        compare(X[:1], Y[:1], "mean_cca")


def test_bad_inputs_and_options():
    X = rand(20, 3)
    Xnan = X.copy()
    Xnan[0, 0] = np.nan
    for name in ALL:
        with pytest.raises(ValueError, match="NaN"):
            compare(Xnan, X, name)
        with pytest.raises(ValueError, match="same inputs"):
            compare(X, X[:10], name)
    with pytest.raises(ValueError, match="variance"):
        measure("svcca", variance=1.5)
    with pytest.raises(ValueError, match="not both"):
        measure("svcca", variance=0.9, dims=3)
    with pytest.raises(TypeError, match="dims"):
        measure("svcca", dims=2.5)
    with pytest.raises(ValueError, match="summary"):
        measure("svcca", summary="median")
    with pytest.raises(ValueError, match="rtol"):
        measure("mean_cca", rtol=0)
    with pytest.raises(ValueError, match="denominator"):
        measure("mean_r2_cca", denominator="n")
    with pytest.raises(TypeError, match="symmetric"):
        measure("pwcca", symmetric="yes")
    with pytest.raises(ValueError, match="kernel"):
        measure("cka", kernel="poly")
    with pytest.raises(ValueError, match="estimator"):
        measure("hsic", estimator="x")
    with pytest.raises(ValueError, match="contradicts"):
        measure("hsic", unbiased=False, estimator="song")
    with pytest.raises(ValueError, match="gamma"):
        measure("cka", kernel="rbf", gamma=1.0)
    with pytest.raises(ValueError, match="group"):
        measure("procrustes", group="affine")


# --- kernels -------------------------------------------------------------------------------------------------


def hsic_by_hand(K, L, estimator):
    n = len(K)
    H = np.eye(n) - 1.0 / n
    if estimator == "gretton":
        return np.trace(K @ H @ L @ H) / (n - 1) ** 2
    if estimator == "lange":
        Kc, Lc = H @ K @ H, H @ L @ H
        return 2.0 / (n * (n - 3)) * np.tril(Kc * Lc, -1).sum()
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + one @ Kt @ one * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * one @ Kt @ Lt @ one) / (n * (n - 3))


def rbf_by_hand(X, kernel, b, median):
    D = scipy.spatial.distance.squareform(scipy.spatial.distance.pdist(X))
    n = len(X)
    upper = D[np.triu_indices(n, 1)]
    if kernel == "rbf":
        med = np.median(upper) if median == "midpoint" else np.sort(upper)[(upper.size - 1) // 2]
        return np.exp(-D ** 2 / (2 * (b * med) ** 2))
    if kernel == "rbf_mean":
        return np.exp(-D ** 2 / (2 * b ** 2 * (upper ** 2).mean()))
    m = np.array([np.median(np.delete(D[i], i)) for i in range(n)])
    return np.exp(-D ** 2 / (2 * b ** 2 * np.outer(m, m)))


@pytest.mark.parametrize("kernel", ["linear", "rbf", "rbf_mean", "rbf_dualmed"])
@pytest.mark.parametrize("estimator", ["gretton", "song", "lange"])
@pytest.mark.parametrize("median", ["lower", "midpoint"])
def test_hsic_and_cka_by_hand(kernel, estimator, median):
    X = rand(40, 5, seed=1)
    Y = related(X, 30 if kernel == "linear" and median == "lower" else 4, noise=1.0)  # Gram and feature routes
    if kernel == "linear":
        K, L = X @ X.T, Y @ Y.T  # uncentred: every estimator here is invariant to shifting linear features
    else:
        K, L = rbf_by_hand(X, kernel, 0.7, median), rbf_by_hand(Y, kernel, 0.7, median)
    opts = dict(kernel=kernel, estimator=estimator, median=median, bandwidth=0.7)
    h = hsic_by_hand(K, L, estimator)
    assert compare(X, Y, "hsic", **opts) == pytest.approx(h, rel=1e-10)
    cka = h / np.sqrt(hsic_by_hand(K, K, estimator) * hsic_by_hand(L, L, estimator))
    assert compare(X, Y, "cka", **opts) == pytest.approx(cka, rel=1e-10)


def test_cka_measure_equals_similarity_cka():
    import spectral_ext.similarity as sim

    X = rand(50, 6)
    Y = related(X, 5)
    for kernel in ("linear", "rbf", "max", "laplace", "ortho"):
        for unbiased in (True, False):
            assert compare(X, Y, "cka", kernel=kernel, unbiased=unbiased) == pytest.approx(
                sim.cka(torch.from_numpy(X), torch.from_numpy(Y), kernel=kernel, unbiased=unbiased), rel=1e-10)
    Z = related(X, 6)
    for group in ("orthogonal", "grelu"):
        for centered in (False, True):
            assert compare(X, Z, "procrustes", group=group, centered=centered) == pytest.approx(
                sim.procrustes(torch.from_numpy(X), torch.from_numpy(Z), group=group, centered=centered), rel=1e-12)


def test_dot_product_by_hand():
    X, Y = rand(30, 4), rand(30, 6)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    assert compare(X, Y, "dot_product") == pytest.approx(np.trace(Xc @ Xc.T @ Yc @ Yc.T), rel=1e-12)
    assert compare(X, Y, "dot_product", centered=False) == pytest.approx(np.linalg.norm(X.T @ Y) ** 2, rel=1e-12)


def test_kernel_edge_cases():
    X = rand(30, 4)
    C = np.full((30, 4), 1.5)
    with pytest.raises(ValueError, match="constant"):
        compare(X, C, "cka")
    with pytest.raises(ValueError, match="identical"):
        compare(X, C, "cka", kernel="rbf_mean", estimator="lange")
    assert compare(X, C, "hsic") == 0.0
    with pytest.raises(ValueError, match="N >= 4"):
        compare(X[:3], X[:3], "cka")
    assert compare(X[:3], X[:3] * 2, "cka", unbiased=False) == pytest.approx(1.0)
