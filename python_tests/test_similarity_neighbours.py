"""The neighbourhood measures (mutual_knn, knn_jaccard, second_order_cosine)
and ReSi's baselines (eigenspace_overlap, magnitude_difference,
concentricity_difference): each against an independent route (sklearn's
NearestNeighbors, python sets, the published formulas re-derived here in
numpy/scipy), their properties, invariances and edge cases."""
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import sklearn.metrics
import sklearn.neighbors
import torch

from spectral_ext.similarity import baselines, neighbours
from spectral_ext.similarity.measure import MEASURES, compare, measure_matrix

KNN = ["mutual_knn", "knn_jaccard", "second_order_cosine"]
ALL = KNN + ["eigenspace_overlap", "magnitude_difference", "concentricity_difference"]


def data(n=90, d=12, seed=0, related=True):
    g = np.random.default_rng(seed)
    X = g.standard_normal((n, d))
    Y = X @ g.standard_normal((d, d + 3)) + 0.8 * g.standard_normal((n, d + 3)) if related \
        else g.standard_normal((n, d + 3))
    return X, Y


def orthogonal(d, seed=1):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))[0]


def sk_knn(X, k, metric="cosine"):
    """ReSi's neighbour route: k + 1 neighbours by sklearn, the first (the point itself) dropped."""
    nn = sklearn.neighbors.NearestNeighbors(n_neighbors=k + 1, metric=metric).fit(X)
    return nn.kneighbors(X)[1][:, 1:]


def platonic_mutual_knn(X, Y, k):
    """Huh et al.'s mutual_knn (platonic-rep metrics.py and measure_alignment.py),
    re-derived in numpy: L2-normalise, inner products, the diagonal set to -1e8,
    the top k by sort, then the mean of |A & B| / k by 0/1 masks."""
    def knn(F):
        F = F / np.linalg.norm(F, axis=1, keepdims=True)
        S = F @ F.T
        np.fill_diagonal(S, -1e8)
        return np.argsort(-S, axis=1)[:, :k]
    n = len(X)
    a, b = np.zeros((n, n)), np.zeros((n, n))
    np.put_along_axis(a, knn(X), 1.0, 1)
    np.put_along_axis(b, knn(Y), 1.0, 1)
    return float(((a * b).sum(1) / k).mean())


def resi_jaccard(X, Y, k, metric="cosine"):
    sx, sy = [set(r) for r in sk_knn(X, k, metric)], [set(r) for r in sk_knn(Y, k, metric)]
    return float(np.mean([len(p & q) / len(p | q) for p, q in zip(sx, sy)]))


def resi_second_order(X, Y, k, values="distances"):
    """ReSi's second_order_cosine_similarity (repsim/measures/nearest_neighbor.py),
    re-derived: union of the two neighbour sets, cosine distances (or the
    similarities, the survey's definition) to them, scipy's cosine per input."""
    nx, ny = sk_knn(X, k), sk_knn(Y, k)
    if values == "distances":
        dx = sklearn.metrics.pairwise_distances(X, metric="cosine")
        dy = sklearn.metrics.pairwise_distances(Y, metric="cosine")
    else:
        dx, dy = sklearn.metrics.pairwise.cosine_similarity(X), sklearn.metrics.pairwise.cosine_similarity(Y)
    out = []
    for i in range(len(X)):
        u = sorted(set(nx[i]) | set(ny[i]))
        out.append(1 - scipy.spatial.distance.cosine(dx[i, u], dy[i, u]))
    return float(np.mean(out))


# ---- against independent routes ----------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 10])
def test_knn_indices_match_sklearn(k):
    X, Y = data()
    for metric in ("cosine", "euclidean"):
        for F in (X, Y):
            ours = neighbours.knn_indices(torch.from_numpy(F), k, metric).numpy()
            theirs = sk_knn(F, k, metric)
            assert [set(r) for r in ours] == [set(r) for r in theirs]


@pytest.mark.parametrize("k", [1, 4, 10])
def test_mutual_knn_matches_platonic_formula(k):
    X, Y = data(seed=k)
    assert compare(X, Y, "mutual_knn", k=k) == pytest.approx(platonic_mutual_knn(X, Y, k), abs=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k", [1, 6, 10])
def test_knn_jaccard_matches_resi_sets(k, metric):
    X, Y = data(seed=10 + k)
    assert compare(X, Y, "knn_jaccard", k=k, metric=metric) == pytest.approx(resi_jaccard(X, Y, k, metric),
                                                                             abs=1e-12)


def test_mutual_knn_and_jaccard_by_hand_sets():
    """A definition by hand: python sets from a brute-force ranking (N = 25)."""
    X, Y = data(n=25, d=4, seed=3)
    k = 4

    def sets(F):
        F = F / np.linalg.norm(F, axis=1, keepdims=True)
        return [set(sorted((j for j in range(len(F)) if j != i), key=lambda j: -F[i] @ F[j])[:k])
                for i in range(len(F))]
    sx, sy = sets(X), sets(Y)
    mutual = np.mean([len(p & q) / k for p, q in zip(sx, sy)])
    jac = np.mean([len(p & q) / len(p | q) for p, q in zip(sx, sy)])
    assert compare(X, Y, "mutual_knn", k=k) == pytest.approx(mutual, abs=1e-12)
    assert compare(X, Y, "knn_jaccard", k=k) == pytest.approx(jac, abs=1e-12)


@pytest.mark.parametrize("values", ["distances", "similarities"])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_second_order_cosine_matches_resi_formula(k, values):
    X, Y = data(seed=20 + k)
    ours = compare(X, Y, "second_order_cosine", k=k, values=values)
    assert ours == pytest.approx(resi_second_order(X, Y, k, values), abs=1e-12)


def test_eigenspace_overlap_matches_scipy_orth_and_projections():
    X, Y = data(n=40, d=9, seed=4)
    Z = X[:, :5] @ np.random.default_rng(5).standard_normal((5, 14))  # rank 5 of 14 features
    for A, B in [(X, Y), (X, Z), (Z, Y)]:
        Qa, Qb = scipy.linalg.orth(A), scipy.linalg.orth(B)  # same rank rule: s > s_max max(N, D) eps
        expected = np.linalg.norm(Qa.T @ Qb) ** 2 / max(A.shape[1], B.shape[1])
        assert compare(A, B, "eigenspace_overlap") == pytest.approx(expected, abs=1e-12)
        Pa, Pb = A @ np.linalg.pinv(A, rcond=1e-10), B @ np.linalg.pinv(B, rcond=1e-10)  # projections
        assert compare(A, B, "eigenspace_overlap") == pytest.approx(np.trace(Pa @ Pb) / max(A.shape[1], B.shape[1]),
                                                                    abs=1e-9)
    # rank r of D features: identical inputs give r / D, as ReSi's normalisation
    assert compare(Z, Z, "eigenspace_overlap") == pytest.approx(5 / 14, abs=1e-12)


def test_statistics_match_resi_formulas():
    X, Y = data(seed=6)
    X = X + 0.7
    mag = abs(np.linalg.norm(X.mean(0)) - np.linalg.norm(Y.mean(0)))
    assert compare(X, Y, "magnitude_difference") == pytest.approx(mag, abs=1e-12)

    def concentricity(F):  # ReSi: 1 - sklearn's cosine distance to the mean vector
        return (1 - sklearn.metrics.pairwise_distances(F, F.mean(0, keepdims=True), metric="cosine")).mean()
    assert compare(X, Y, "concentricity_difference") == pytest.approx(abs(concentricity(X) - concentricity(Y)),
                                                                      abs=1e-12)
    Xz = X.copy()
    Xz[3] = 0.0  # a zero row: cosine 0, as sklearn
    assert compare(Xz, Y, "concentricity_difference") == pytest.approx(abs(concentricity(Xz) - concentricity(Y)),
                                                                       abs=1e-12)


# ---- the K x K against the pairs ----------------------------------------------------------

@pytest.mark.parametrize("name,opts", [("mutual_knn", {}), ("knn_jaccard", {"metric": "euclidean"}),
                                       ("second_order_cosine", {}),
                                       ("second_order_cosine", {"values": "distances"}),
                                       ("eigenspace_overlap", {}), ("magnitude_difference", {}),
                                       ("concentricity_difference", {})])
def test_matrix_equals_pairs(name, opts, monkeypatch):
    g = np.random.default_rng(7)
    base = g.standard_normal((70, 6))
    reps = {f"r{i}": np.hstack([base, s * g.standard_normal((70, 1 + i))]) for i, s in enumerate([0.1, 0.5, 1, 2, 4])}
    reps["low"] = base[:, :2] @ g.standard_normal((2, 8))
    opts = {"k": 5, **opts} if name in KNN else opts
    M = measure_matrix(reps, name, **opts).matrix
    names = list(reps)
    for a in names:
        for b in names:
            assert M.loc[a, b] == pytest.approx(compare(reps[a], reps[b], name, **opts), abs=1e-12)
    np.testing.assert_allclose(M.values, M.values.T, atol=0)
    # row blocks of a few inputs give the same numbers
    monkeypatch.setattr(neighbours, "_BLOCK", 1000)
    np.testing.assert_allclose(measure_matrix(reps, name, **opts).matrix.values, M.values, atol=1e-12)


def test_second_order_gather_and_product_routes_agree():
    """K = 2 on N = 100 gathers the neighbours' rows; K = 4 takes the N x N
    product blocks: the shared pairs agree."""
    X, Y = data(n=100, seed=8)
    m = MEASURES["second_order_cosine"](k=5)
    red = [m.reduce(torch.from_numpy(F)) for F in (X, Y, X[:, ::-1] * 2 + 1, Y ** 2)]
    small, big = m.matrix(red[:2]), m.matrix(red)
    assert 8 * 2 * 5 < 100 <= 8 * 4 * 5
    assert float(small[0, 1]) == pytest.approx(float(big[0, 1]), abs=1e-12)


# ---- properties and invariances -------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_identity_symmetry_range(name):
    X, Y = data(seed=9)
    kind = MEASURES[name].kind
    same = compare(X, X, name)
    assert same == pytest.approx(1.0 if kind == "similarity" else 0.0, abs=1e-12)
    xy, yx = compare(X, Y, name), compare(Y, X, name)
    assert xy == pytest.approx(yx, abs=1e-12)
    if kind == "similarity":
        assert 0.0 <= xy <= 1.0
    else:
        assert xy >= 0.0
    # unrelated representations: the neighbourhood measures are near chance, well below 1
    if name in KNN:
        X0, Y0 = data(seed=9, related=False)
        assert compare(X0, Y0, name) < 0.5


@pytest.mark.parametrize("name", KNN + ["eigenspace_overlap", "concentricity_difference",
                                        "magnitude_difference"])
def test_orthogonal_and_scaling_invariance(name):
    X, Y = data(seed=11)
    Q = orthogonal(X.shape[1])
    ref = compare(X, Y, name)
    assert compare(X @ Q, Y, name) == pytest.approx(ref, abs=1e-10)
    if name != "magnitude_difference":
        assert compare(3.7 * X, Y, name) == pytest.approx(ref, abs=1e-10)
    else:
        assert compare(3.7 * X, Y, name) != pytest.approx(ref, abs=1e-6)


def test_eigenspace_overlap_invertible_linear_invariance():
    X, Y = data(seed=12)
    A = np.random.default_rng(13).standard_normal((X.shape[1], X.shape[1])) + 3 * np.eye(X.shape[1])
    assert compare(X @ A, Y, "eigenspace_overlap") == pytest.approx(compare(X, Y, "eigenspace_overlap"), abs=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_not_translation_invariant(name):
    X, Y = data(seed=14)
    shift = 2.0 * np.random.default_rng(15).standard_normal(X.shape[1])
    ref = compare(X, Y, name)
    assert abs(compare(X + shift, Y, name) - ref) > 1e-3


def test_euclidean_neighbours_are_translation_invariant():
    X, Y = data(seed=16)
    shift = 5.0 * np.random.default_rng(17).standard_normal(X.shape[1])
    for name in ("mutual_knn", "knn_jaccard"):
        assert compare(X + shift, Y, name, metric="euclidean") == pytest.approx(
            compare(X, Y, name, metric="euclidean"), abs=1e-12)


def test_input_permutation_invariance():
    X, Y = data(seed=18)
    p = np.random.default_rng(19).permutation(len(X))
    for name in ALL:
        assert compare(X[p], Y[p], name) == pytest.approx(compare(X, Y, name), abs=1e-12)


# ---- edge cases -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", KNN)
def test_k_not_below_n_is_refused(name):
    X, Y = data(n=8, d=3)
    with pytest.raises(ValueError, match=r"k = 8 .*N = 8"):
        compare(X, Y, name, k=8)
    with pytest.raises(ValueError, match=r"k = 10 .*N = 8"):
        measure_matrix([X, Y], name)
    assert 0.0 <= compare(X, Y, name, k=7) <= 1.0  # k = N - 1: every other input


@pytest.mark.parametrize("name", KNN)
def test_bad_options_name_the_option(name):
    with pytest.raises((TypeError, ValueError), match="k"):
        MEASURES[name](k=0)
    with pytest.raises(TypeError, match="k"):
        MEASURES[name](k=2.5)
    bad = {"second_order_cosine": "values"}.get(name, "metric")
    with pytest.raises(ValueError, match=bad):
        MEASURES[name](**{bad: "manhattan"})


def test_ties_go_to_the_lower_index():
    """Axis-aligned rows give exact similarities 1, 0 and -1: many ties,
    broken towards the lower index, as a python sort by (-similarity, index)."""
    rows = [[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [-1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]]
    X = np.array(rows, dtype=float)
    for k in range(1, len(X)):
        ours = neighbours.knn_indices(torch.from_numpy(X), k).numpy()
        for i in range(len(X)):
            expected = sorted((j for j in range(len(X)) if j != i), key=lambda j: (-(X[i] @ X[j]), j))[:k]
            assert set(ours[i]) == set(expected), (k, i)
    # duplicate rows: identical representations still score 1, and the measure is deterministic
    Xd = np.repeat(data(n=20, d=3)[0], 3, axis=0)
    for name in KNN:
        assert compare(Xd, Xd, name, k=4) == pytest.approx(1.0, abs=1e-12)
        assert compare(Xd, Xd[:, ::-1], name, k=4) == compare(Xd, Xd[:, ::-1], name, k=4)


def test_zero_rows_have_cosine_zero():
    X, Y = data(n=30, d=5, seed=21)
    X[[0, 7]] = 0.0
    idx = neighbours.knn_indices(torch.from_numpy(X), 3).numpy()
    assert set(idx[0]) == {1, 2, 3}  # all similarities 0: the lowest other indices
    assert set(idx[7]) == {0, 1, 2}
    for name in KNN:
        v = compare(X, Y, name, k=3)
        assert np.isfinite(v) and 0.0 <= v <= 1.0
        assert compare(X, X, name, k=3) == pytest.approx(1.0, abs=1e-12)
    # second-order cosine: an all-zero vector of similarities (the zero row 0) has cosine 0
    # with a nonzero one and 1 with another zero one, never NaN
    W = np.random.default_rng(0).standard_normal((30, 5))
    per_input = []
    nx, nw = neighbours.knn_indices(torch.from_numpy(X), 3).numpy(), neighbours.knn_indices(torch.from_numpy(W), 3)
    sx, sw = sklearn.metrics.pairwise.cosine_similarity(X), sklearn.metrics.pairwise.cosine_similarity(W)
    for i in range(30):
        u = sorted(set(nx[i]) | set(nw[i].numpy()))
        a, b = sx[i, u], sw[i, u]
        per_input.append(0.0 if not a.any() else 1 - scipy.spatial.distance.cosine(a, b))
    assert compare(X, W, "second_order_cosine", k=3) == pytest.approx(np.mean(per_input), abs=1e-12)


def test_degenerate_baselines():
    X, _ = data(n=20, d=4)
    zero = np.zeros((20, 4))
    assert compare(zero, X, "eigenspace_overlap") == 0.0  # rank 0: no overlap (ReSi's rule)
    assert compare(zero, zero, "eigenspace_overlap") == 0.0
    centred = X - X.mean(0)
    assert compare(centred, centred, "concentricity_difference") == 0.0  # zero mean: concentricity 0
    assert compare(centred, X, "magnitude_difference") == pytest.approx(np.linalg.norm(X.mean(0)), abs=1e-12)
    const = np.ones((20, 4))
    assert compare(const, const, "eigenspace_overlap") == pytest.approx(0.25, abs=1e-12)  # rank 1 of 4
    M = measure_matrix([zero, X, const], "eigenspace_overlap").matrix
    assert np.isfinite(M.values).all() and M.values[0].max() == 0.0


@pytest.mark.parametrize("name", ALL)
def test_nan_is_refused(name):
    X, Y = data(n=20, d=4)
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compare(X, Y, name)
    with pytest.raises(ValueError, match="NaN"):
        measure_matrix({"x": X, "y": Y}, name)


def test_registered_with_attributes():
    for name in ALL:
        cls = MEASURES[name]
        assert cls.name == name and cls.kind in ("similarity", "distance")
        assert cls.invariances and cls.reference and cls.cost and cls.__doc__
    assert MEASURES["magnitude_difference"].kind == "distance"
    assert baselines.EigenspaceOverlap.reference == "may2019"
