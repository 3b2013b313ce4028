"""RSA (RDMs and their comparison) and the RSM norm difference: against scipy
(pdist, spearmanr, pearsonr), a hand-written Kendall tau-a, numpy, and the
installed rsatoolbox 0.3.2; invariances, properties and edge cases."""
import itertools
import math

import numpy as np
import pytest
import rsatoolbox
import scipy.stats
import torch
from scipy.spatial.distance import pdist, squareform

from spectral_ext.similarity import compare, measure_matrix
from spectral_ext.similarity.measure import get_measure as measure
from spectral_ext.similarity.rsa import _average_ranks, _sort, rdm

RDM_METRICS = ["euclidean", "correlation", "cosine"]
COMPARES = ["spearman", "pearson", "kendall_tau_a", "cosine"]


def reps(seed=0, n=30, dims=(7, 11)):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dims[0]))
    Y = np.tanh(X @ rng.standard_normal((dims[0], dims[1]))) + 0.5 * rng.standard_normal((n, dims[1]))
    return X, Y


def scipy_rdm(X, metric):
    if metric == "euclidean":
        return pdist(X, "sqeuclidean") / X.shape[1]
    return pdist(X, metric)


def tau_a_by_hand(a, b):
    """Kendall's tau-a by its definition over every pair: sum sign * sign / (n(n-1)/2)."""
    n = len(a)
    s = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in itertools.combinations(range(n), 2))
    return s / (n * (n - 1) / 2)


def by_definition(X, Y, rdm_metric, how):
    a, b = scipy_rdm(X, rdm_metric), scipy_rdm(Y, rdm_metric)
    if how == "spearman":
        return scipy.stats.spearmanr(a, b).statistic
    if how == "pearson":
        return scipy.stats.pearsonr(a, b).statistic
    if how == "cosine":
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    return tau_a_by_hand(a, b)


def random_orthogonal(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def orthogonal_fixing_ones(d, rng):
    """A random orthogonal map with Q 1 = 1: a rotation of the complement of the all-ones vector."""
    basis = np.linalg.qr(np.c_[np.ones(d), rng.standard_normal((d, d - 1))])[0]  # first column ~ 1/sqrt(d)
    inner = np.eye(d)
    inner[1:, 1:] = random_orthogonal(d - 1, rng)
    return basis @ inner @ basis.T


# ---------------------------------------------------------------------------------------------
# rdm


@pytest.mark.parametrize("metric", RDM_METRICS)
def test_rdm_matches_pdist(metric):
    X, _ = reps()
    np.testing.assert_allclose(rdm(X, metric).numpy(), scipy_rdm(X, metric), rtol=0, atol=1e-12)
    assert rdm(torch.from_numpy(X), metric).dtype == torch.float64
    assert rdm(X, metric).shape == (30 * 29 // 2,)


@pytest.mark.parametrize("metric", ["euclidean", "correlation"])
def test_rdm_matches_rsatoolbox(metric):
    X, _ = reps(3)
    theirs = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(X), method=metric).get_vectors()[0]
    np.testing.assert_allclose(rdm(X, metric).numpy(), theirs, rtol=0, atol=1e-12)


def test_rdm_conv_features_flattened_and_euclidean_non_negative():
    X = torch.randn(9, 3, 4, 4, dtype=torch.float64)
    X[1] = X[0]  # a duplicate input: distance 0, never a rounding negative
    r = rdm(X, "euclidean")
    np.testing.assert_allclose(r.numpy(), pdist(X.reshape(9, -1).numpy(), "sqeuclidean") / 48, atol=1e-12)
    assert (r >= 0).all()


def test_rdm_errors():
    X, _ = reps()
    with pytest.raises(ValueError, match="metric"):
        rdm(X, "manhattan")
    Xc = X.copy()
    Xc[4] = 2.5  # a constant pattern
    with pytest.raises(ValueError, match=r"X: input pattern\(s\) \(rows\) \[4\] have zero variance"):
        rdm(Xc, "correlation")
    Xz = X.copy()
    Xz[2] = 0
    with pytest.raises(ValueError, match=r"\[2\] have zero norm"):
        rdm(Xz, "cosine")
    np.testing.assert_allclose(rdm(Xc, "cosine").numpy(), pdist(Xc, "cosine"), atol=1e-12)
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rdm(X)


def test_average_ranks_match_rankdata():
    rng = np.random.default_rng(1)
    V = np.round(rng.standard_normal((4, 300)), 1)  # many ties
    V[1] = rng.standard_normal(300)  # none
    V[2, :] = 3.0  # all tied
    V[3, :5] = [-0.0, 0.0, -1e-300, 1e-300, 0.0]  # signed zeros tie, tiny values do not
    np.testing.assert_array_equal(_average_ranks(torch.from_numpy(V)).numpy(), scipy.stats.rankdata(V, axis=1))
    # extremes, and values equal in float32 but not in float64
    W = np.stack([1 + rng.integers(0, 40, 300) * 1e-12,
                  np.round(rng.standard_normal(300), 2) * 10.0 ** rng.integers(-320, 300, 300),
                  np.r_[rng.standard_normal(292), np.inf, -np.inf, 1e308, -1e308, 0.0, -0.0, 5e-324, -5e-324]])
    np.testing.assert_array_equal(_average_ranks(torch.from_numpy(W)).numpy(), scipy.stats.rankdata(W, axis=1))


def test_average_ranks_of_empty_and_single_vectors():
    for V in (np.zeros((2, 0)), np.array([[2.5], [-1.0]])):
        np.testing.assert_array_equal(_average_ranks(torch.from_numpy(V)).numpy(), scipy.stats.rankdata(V, axis=1))


def test_average_ranks_through_the_shared_31_bit_keys():
    """The sort goes by a 31-bit key first; values sharing one (here 1e-13 apart in a range of 1, or
    tied exactly) are sorted again by the full key, in the same call, whichever order they came in."""
    rng = np.random.default_rng(2)
    v = 100 + rng.random(20_000)
    v[:50] = v[50:100] + 1e-13  # distinct in float64, one 31-bit key
    v[100:110] = v[110:120]  # exact ties
    v[120:125] = v[125:130] - 1e-13
    for w in (v, v[::-1].copy(), rng.permutation(v)):
        keys, order = _sort(torch.from_numpy(w))
        runs = int((np.diff(np.sort(w)) < 1e-9).sum())
        assert 0 < runs < w.size // 64  # the re-sort of shared keys, not the fallback, is exercised
        assert np.all(np.diff(w[order.numpy()]) >= 0)
        np.testing.assert_array_equal(_average_ranks(torch.from_numpy(w[None])).numpy()[0], scipy.stats.rankdata(w))


# ---------------------------------------------------------------------------------------------
# rsa: values


@pytest.mark.parametrize("rdm_metric", RDM_METRICS)
@pytest.mark.parametrize("how", COMPARES)
def test_rsa_by_definition(rdm_metric, how):
    X, Y = reps(n=18)
    value = compare(X, Y, "rsa", rdm_metric=rdm_metric, compare=how)
    assert value == pytest.approx(by_definition(X, Y, rdm_metric, how), abs=1e-12)


def test_rsa_default_is_correlation_rdm_and_spearman():
    X, Y = reps()
    m = measure("rsa")
    assert (m.rdm_metric, m.compare) == ("correlation", "spearman")
    assert compare(X, Y, "rsa") == pytest.approx(by_definition(X, Y, "correlation", "spearman"), abs=1e-12)


def test_rsa_kendall_with_ties_by_hand():
    rng = np.random.default_rng(5)
    X = rng.integers(0, 3, (14, 3)).astype(float)  # small integer patterns: many tied distances
    Y = rng.integers(0, 3, (14, 2)).astype(float)
    a, b = scipy_rdm(X, "euclidean"), scipy_rdm(Y, "euclidean")
    assert len(np.unique(a)) < len(a) / 4 and len(np.unique(b)) < len(b) / 4
    value = compare(X, Y, "rsa", rdm_metric="euclidean", compare="kendall_tau_a")
    assert value == pytest.approx(tau_a_by_hand(a, b), abs=1e-14)
    # average ranks for spearman with the same ties
    assert compare(X, Y, "rsa", rdm_metric="euclidean") == pytest.approx(scipy.stats.spearmanr(a, b).statistic,
                                                                          abs=1e-12)


RSATOOLBOX_COMPARE = {"spearman": "spearman", "pearson": "corr", "kendall_tau_a": "tau-a", "cosine": "cosine"}


@pytest.mark.parametrize("rdm_metric", ["euclidean", "correlation"])
@pytest.mark.parametrize("how", COMPARES)
def test_rsa_matrix_matches_rsatoolbox(rdm_metric, how):
    rng = np.random.default_rng(2)
    Xs = [rng.standard_normal((25, d)) for d in (4, 6, 9)]
    Xs.append(Xs[0] @ rng.standard_normal((4, 5)))
    ours = measure_matrix(Xs, "rsa", rdm_metric=rdm_metric, compare=how).matrix.to_numpy()
    rdms = rsatoolbox.rdm.calc_rdm([rsatoolbox.data.Dataset(X) for X in Xs], method=rdm_metric)
    theirs = rsatoolbox.rdm.compare(rdms, rdms, method=RSATOOLBOX_COMPARE[how])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    for i, j in itertools.combinations(range(4), 2):  # the batched K x K = the pairs
        assert ours[i, j] == pytest.approx(compare(Xs[i], Xs[j], "rsa", rdm_metric=rdm_metric, compare=how),
                                           abs=1e-13)


# ---------------------------------------------------------------------------------------------
# rsa: invariances and properties


@pytest.mark.parametrize("how", COMPARES)
def test_rsa_properties(how):
    X, Y = reps(4)
    for rdm_metric in RDM_METRICS:
        kw = dict(rdm_metric=rdm_metric, compare=how)
        assert compare(X, X, "rsa", **kw) == pytest.approx(1, abs=1e-12)
        xy = compare(X, Y, "rsa", **kw)
        assert -1 <= xy <= 1 and xy < 1 - 1e-6
        assert compare(Y, X, "rsa", **kw) == pytest.approx(xy, abs=1e-13)
        # the same reordering of the inputs of both leaves the comparison unchanged
        p = np.random.default_rng(0).permutation(len(X))
        assert compare(X[p], Y[p], "rsa", **kw) == pytest.approx(xy, abs=1e-12)
        # so does a reordering of one representation's features
        q = np.random.default_rng(1).permutation(X.shape[1])
        assert compare(X[:, q], Y, "rsa", **kw) == pytest.approx(xy, abs=1e-12)
    M = measure_matrix([X, Y, X + 1], "rsa", rdm_metric="euclidean", compare=how).matrix.to_numpy()
    np.testing.assert_allclose(M, M.T, atol=0)
    np.testing.assert_allclose(np.diag(M), 1, atol=1e-12)


@pytest.mark.parametrize("how", COMPARES)
def test_rsa_invariances(how):
    rng = np.random.default_rng(6)
    X, Y = reps(7)
    d = X.shape[1]
    Q = random_orthogonal(d, rng)
    kw = lambda metric: dict(rdm_metric=metric, compare=how)  # noqa: E731
    base = {m: compare(X, Y, "rsa", **kw(m)) for m in RDM_METRICS}
    # euclidean RDM: orthogonal maps, isotropic scaling, translation
    assert compare(3.7 * X @ Q + rng.standard_normal(d), Y, "rsa", **kw("euclidean")) == pytest.approx(
        base["euclidean"], abs=1e-11)
    # cosine RDM: orthogonal maps, isotropic and per-input scaling
    s = rng.uniform(0.5, 2, (len(X), 1))
    assert compare(s * (0.2 * X @ Q), Y, "rsa", **kw("cosine")) == pytest.approx(base["cosine"], abs=1e-11)
    # correlation RDM: orthogonal maps fixing the all-ones vector, per-input scaling and shifts...
    F = orthogonal_fixing_ones(d, rng)
    np.testing.assert_allclose(F @ np.ones(d), np.ones(d), atol=1e-12)
    moved = s * (X @ F) + rng.standard_normal((len(X), 1))
    assert compare(moved, Y, "rsa", **kw("correlation")) == pytest.approx(base["correlation"], abs=1e-11)
    # ...but not general orthogonal maps (centring across features does not commute with them)
    assert abs(compare(X @ Q, Y, "rsa", **kw("correlation")) - base["correlation"]) > 1e-4


# ---------------------------------------------------------------------------------------------
# rsa: edge cases


def test_rsa_edge_cases():
    X, Y = reps()
    with pytest.raises(ValueError, match="N >= 3"):
        compare(X[:2], Y[:2], "rsa")
    assert math.isfinite(compare(X[:3], Y[:3], "rsa", compare="pearson"))
    Xc = X.copy()
    Xc[3] = -1.0
    with pytest.raises(ValueError, match=r"rows\) \[3\] have zero variance"):
        compare(Xc, Y, "rsa")
    with pytest.raises(ValueError, match=r"rows\) \[3\] have zero variance"):
        measure_matrix({"a": Y, "b": Xc}, "rsa")
    assert math.isfinite(compare(Xc, Y, "rsa", rdm_metric="euclidean"))
    same = np.ones((10, 4))
    for how in COMPARES:
        with pytest.raises(ValueError, match="constant RDM"):
            compare(same, Y[:10], "rsa", rdm_metric="euclidean", compare=how)
    with pytest.raises(ValueError, match="rdm_metric must be one of"):
        measure("rsa", rdm_metric="mahalanobis")
    with pytest.raises(ValueError, match="compare must be one of"):
        measure("rsa", compare="corr")
    Xn = X.copy()
    Xn[0, 0] = np.inf
    with pytest.raises(ValueError, match="X holds NaN or infinite"):
        compare(Xn, Y, "rsa")
    # rank-deficient representations are fine (distances exist)
    low = X[:, :1] @ np.ones((1, 5))
    assert math.isfinite(compare(low, Y, "rsa", rdm_metric="euclidean"))


# ---------------------------------------------------------------------------------------------
# rsm_norm_difference


def test_rsm_norm_difference_by_definition():
    X, Y = reps(8)
    want = np.linalg.norm(X @ X.T - Y @ Y.T, "fro")
    assert compare(X, Y, "rsm_norm_difference") == pytest.approx(want, rel=1e-12)
    De = squareform(pdist(X)) - squareform(pdist(Y))
    euclid = compare(X, Y, "rsm_norm_difference", rsm="euclidean")
    assert euclid == pytest.approx(np.linalg.norm(De, "fro"), rel=1e-12)
    assert euclid == pytest.approx(math.sqrt(2) * np.linalg.norm(pdist(X) - pdist(Y)), rel=1e-12)
    assert measure("rsm_norm_difference").kind == "distance"
    with pytest.raises(ValueError, match="rsm must be one of"):
        measure("rsm_norm_difference", rsm="cosine")


@pytest.mark.parametrize("rsm", ["linear", "euclidean"])
def test_rsm_norm_difference_properties_and_invariances(rsm):
    rng = np.random.default_rng(9)
    X, Y = reps(9)
    Z = rng.standard_normal(X.shape)
    d = lambda A, B: compare(A, B, "rsm_norm_difference", rsm=rsm)  # noqa: E731
    assert d(X, X) == 0
    assert d(X, Y) == pytest.approx(d(Y, X), rel=1e-13) and d(X, Y) > 0
    assert d(X, Z) <= d(X, Y) + d(Y, Z) + 1e-12  # a metric between RSMs
    Q = random_orthogonal(X.shape[1], rng)
    assert d(X @ Q, Y) == pytest.approx(d(X, Y), rel=1e-12)
    shifted = d(X + rng.standard_normal(X.shape[1]), Y)
    if rsm == "euclidean":
        assert shifted == pytest.approx(d(X, Y), rel=1e-12)
    else:
        assert abs(shifted - d(X, Y)) > 1e-3
    assert abs(d(2 * X, Y) - d(X, Y)) > 1e-3  # not scale invariant: RSMs are compared as they are


@pytest.mark.parametrize("rsm", ["linear", "euclidean"])
def test_rsm_norm_difference_matrix_matches_pairs(rsm):
    rng = np.random.default_rng(10)
    X, Y = reps(10)
    near = X + 1e-9 * rng.standard_normal(X.shape)  # beyond the Gram expansion's resolution
    Xs = {"X": X, "Y": Y, "X again": X.copy(), "near": near}
    M = measure_matrix(Xs, "rsm_norm_difference", rsm=rsm).matrix
    names = list(Xs)
    for i, j in itertools.product(range(4), repeat=2):
        want = compare(Xs[names[i]], Xs[names[j]], "rsm_norm_difference", rsm=rsm)
        assert M.iloc[i, j] == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert M.loc["X", "X again"] == 0 and M.loc["X", "X"] == 0
    assert 0 < M.loc["X", "near"] < 1e-6
