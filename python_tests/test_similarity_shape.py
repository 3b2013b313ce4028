"""The shape metrics (similarity/shape.py): shape_metric, permutation_metric
and bures_distance against routes written differently here (scipy's
orthogonal Procrustes, principal angles, a brute-force search over
permutations, matrix square roots of the N x N kernels), their invariances,
the metric axioms (symmetry, zero on identical inputs, the triangle
inequality on random triples) and the edge cases."""
import itertools

import numpy as np
import pytest
import scipy.linalg
import torch

from spectral_ext.similarity import MEASURES, compare, measure_matrix, table
from spectral_ext.similarity.measure import get_measure as measure
from spectral_ext.similarity.shape import nuclear_norms

NAMES = ("shape_metric", "permutation_metric", "bures_distance")


def rng(seed):
    return np.random.RandomState(seed)


def reps(seed, n=40, d=6, k=6, widths=None):
    """k related representations of n inputs (a shared latent, noise of differing sizes)."""
    r = rng(seed)
    Z = r.randn(n, 5)
    return [Z @ r.randn(5, w) + r.rand() * r.randn(n, w) + r.randn(w) for w in (widths or [d] * k)]


def orthogonal(d, seed):
    return scipy.stats.ortho_group.rvs(d, random_state=seed)


import scipy.stats  # noqa: E402


def procrustes_by_hand(X, Y, center=True):
    """(angle, euclidean) after scipy's orthogonal Procrustes of Y onto X (zero-padded to equal widths)."""
    if center:
        X, Y = X - X.mean(0), Y - Y.mean(0)
    d = max(X.shape[1], Y.shape[1])
    X = np.pad(X, ((0, 0), (0, d - X.shape[1])))
    Y = np.pad(Y, ((0, 0), (0, d - Y.shape[1])))
    R, _ = scipy.linalg.orthogonal_procrustes(Y, X)
    cos = np.sum(X * (Y @ R)) / (np.linalg.norm(X) * np.linalg.norm(Y))
    return np.arccos(np.clip(cos, -1, 1)), np.linalg.norm(X - Y @ R)


def test_registered_as_distances():
    t = table().set_index("name")
    for name in NAMES:
        assert t.loc[name, "kind"] == "distance"
        assert MEASURES[name].reference in ("williams2021", "harvey2023")
        assert t.loc[name, "cost"] and t.loc[name, "invariances"]


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("dy", [6, 4])
def test_procrustes_against_scipy(center, dy):
    X, Y = reps(0, widths=[6, dy])
    angle, dist = procrustes_by_hand(X, Y, center)
    assert compare(X, Y, "shape_metric", center_columns=center) == pytest.approx(angle, abs=1e-12)
    assert compare(X, Y, "shape_metric", distance="euclidean", center_columns=center) == pytest.approx(dist,
                                                                                                       rel=1e-12)
    # the Bures distance of the centred kernels is the Procrustes distance / sqrt(N) (harvey2023's duality)
    if center:
        assert compare(X, Y, "bures_distance") == pytest.approx(dist / np.sqrt(len(X)), rel=1e-12)
        assert compare(X, Y, "bures_distance", distance="angular") == pytest.approx(angle, abs=1e-12)


def test_alpha_zero_is_the_mean_canonical_correlation():
    """Fully whitened: cos = mean of the canonical correlations = cos of scipy's principal angles."""
    X, Y = reps(1, n=60, d=5, k=2)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    ref = np.arccos(np.mean(np.cos(scipy.linalg.subspace_angles(Xc, Yc))))
    assert compare(X, Y, "shape_metric", alpha=0) == pytest.approx(ref, abs=1e-12)


def test_partial_whitening_by_hand():
    """alpha = 0.5: Z = (alpha I + (1 - alpha) C^-1/2) rescaled to keep the total variance, then Procrustes."""
    X, Y = reps(2, n=50, d=4, k=2)

    def white(A):
        A = A - A.mean(0)
        C = A.T @ A
        Z = 0.5 * np.eye(4) + 0.5 * np.linalg.inv(scipy.linalg.sqrtm(C).real)
        return A @ Z * np.sqrt(np.trace(C) / np.trace(Z @ C @ Z))

    Xw, Yw = white(X), white(Y)
    R, _ = scipy.linalg.orthogonal_procrustes(Yw, Xw)
    assert compare(X, Y, "shape_metric", alpha=0.5, distance="euclidean") == pytest.approx(
        np.linalg.norm(Xw - Yw @ R), rel=1e-10)


@pytest.mark.parametrize("d", [3, 4])
def test_permutation_metric_against_brute_force(d):
    X, Y = reps(3, n=30, d=d, k=2)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    best = min(np.linalg.norm(Xc - Yc[:, list(p)]) for p in itertools.permutations(range(d)))
    assert compare(X, Y, "permutation_metric", distance="euclidean") == pytest.approx(best, rel=1e-12)
    cos = max(np.sum(Xc * Yc[:, list(p)]) for p in itertools.permutations(range(d)))
    angle = np.arccos(cos / np.linalg.norm(Xc) / np.linalg.norm(Yc))
    assert compare(X, Y, "permutation_metric") == pytest.approx(angle, abs=1e-12)


@pytest.mark.parametrize("n,d", [(8, 12), (10, 10)])
def test_bures_against_matrix_square_roots(n, d):
    """d_B^2 = tr Kx + tr Ky - 2 tr (Kx^1/2 Ky Kx^1/2)^1/2 with K = X X^T / N (uncentred: N <= D keeps the
    kernels full rank, where sqrtm is accurate), by scipy's sqrtm."""
    r = rng(4)
    X, Y = r.randn(n, d), r.randn(n, d) + 0.3 * r.randn(n, d)
    Kx, Ky = X @ X.T / n, Y @ Y.T / n
    s = scipy.linalg.sqrtm(Kx).real
    F = np.trace(scipy.linalg.sqrtm(s @ Ky @ s).real)
    ref = np.sqrt(np.trace(Kx) + np.trace(Ky) - 2 * F)
    assert compare(X, Y, "bures_distance", center_columns=False) == pytest.approx(ref, rel=1e-10)
    ang = np.arccos(F / np.sqrt(np.trace(Kx) * np.trace(Ky)))
    assert compare(X, Y, "bures_distance", center_columns=False, distance="angular") == pytest.approx(ang,
                                                                                                      abs=1e-10)


def test_bures_centred_kernels_n_greater_than_d():
    """N > D: the kernels are singular and sqrtm's roots of their zero eigenvalues cost ~sqrt(eps)."""
    X, Y = reps(5, n=30, d=4, k=2)
    H = np.eye(30) - 1 / 30
    Kx, Ky = H @ X @ X.T @ H / 30, H @ Y @ Y.T @ H / 30
    s = scipy.linalg.sqrtm(Kx).real
    ref = np.sqrt(np.trace(Kx) + np.trace(Ky) - 2 * np.trace(scipy.linalg.sqrtm(s @ Ky @ s).real))
    assert compare(X, Y, "bures_distance") == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("name,opts", [("shape_metric", {}), ("shape_metric", {"alpha": 0.5}),
                                       ("shape_metric", {"alpha": 0.0, "distance": "euclidean"}),
                                       ("bures_distance", {}), ("bures_distance", {"distance": "angular"}),
                                       ("permutation_metric", {}),
                                       ("permutation_metric", {"distance": "euclidean"})])
def test_orthogonal_or_permutation_invariance_and_translation(name, opts):
    X, Y = reps(6, n=40, d=6, k=2)
    base = compare(X, Y, name, **opts)
    P = np.eye(6)[rng(0).permutation(6)]
    Q = orthogonal(6, 1)
    assert compare(X @ P, Y, name, **opts) == pytest.approx(base, rel=1e-10)
    assert compare(X + 3.0, Y - 1.0, name, **opts) == pytest.approx(base, rel=1e-10)
    if name == "permutation_metric":  # not rotations
        assert abs(compare(X @ Q, Y, name, **opts) - base) > 1e-3
    else:
        assert compare(X @ Q, Y, name, **opts) == pytest.approx(base, rel=1e-10)
    if opts.get("distance", MEASURES[name]().distance) == "angular" and opts.get("alpha", 1.0) in (0.0, 1.0):
        assert compare(7.0 * X, Y, name, **opts) == pytest.approx(base, rel=1e-10)


def test_partial_whitening_is_not_scale_invariant():
    """netrep's weights alpha + (1 - alpha) lam^-1/2 use the unnormalised covariance: at 0 < alpha < 1 the
    angular distance depends on the representations' scale (documented)."""
    X, Y = reps(6, n=40, d=6, k=2)
    assert abs(compare(7.0 * X, Y, "shape_metric", alpha=0.5) - compare(X, Y, "shape_metric", alpha=0.5)) > 1e-4


def test_alpha_zero_invertible_linear_maps_only():
    X, Y = reps(7, n=50, d=5, k=2)
    A = rng(2).randn(5, 5)
    base = compare(X, Y, "shape_metric", alpha=0)
    assert compare(X @ A, Y, "shape_metric", alpha=0) == pytest.approx(base, rel=1e-9)
    # the Euclidean form keeps the total variance ||Xc||^2, which the map changes
    assert compare(X @ A, Y, "shape_metric", alpha=0, distance="euclidean") != pytest.approx(
        compare(X, Y, "shape_metric", alpha=0, distance="euclidean"), rel=1e-3)
    assert compare(X, X @ A, "shape_metric", alpha=0) == pytest.approx(0.0, abs=1e-7)
    assert compare(X, X @ A, "shape_metric", alpha=1) > 0.05  # Procrustes sees the map
    assert compare(X, X @ A, "shape_metric", alpha=0.5) > 0.01


def all_triples_hold(D, slack=1e-10):
    k = len(D)
    return all(D[i, j] <= D[i, m] + D[m, j] + slack for i in range(k) for j in range(k) for m in range(k))


@pytest.mark.parametrize("name,opts", [("shape_metric", {}), ("shape_metric", {"alpha": 0.0}),
                                       ("shape_metric", {"alpha": 0.5, "distance": "euclidean"}),
                                       ("permutation_metric", {}), ("permutation_metric", {"distance": "euclidean"}),
                                       ("bures_distance", {}), ("bures_distance", {"distance": "angular"})])
def test_metric_axioms_and_matrix_equals_pairs(name, opts):
    R = reps(8, n=30, d=5, k=7)
    D = measure_matrix(R, name, **opts).matrix.values
    assert (np.diag(D) == 0).all() and (D >= 0).all()
    np.testing.assert_array_equal(D, D.T)
    assert all_triples_hold(D)
    for i, j in [(0, 1), (2, 5), (3, 6)]:
        assert D[i, j] == pytest.approx(compare(R[i], R[j], name, **opts), abs=1e-12)
        assert compare(R[i], R[j], name, **opts) == pytest.approx(compare(R[j], R[i], name, **opts), abs=1e-12)
    assert compare(R[0], R[0].copy(), name, **opts) == 0.0


def test_triangle_inequality_on_random_triples():
    """Triples far apart and close together (random widths, angular shape metric with zero padding)."""
    r = rng(9)
    for t in range(20):
        A = r.randn(20, 6)
        R = [A @ r.randn(6, w) + s * r.randn(20, w) for w, s in zip(r.randint(2, 6, 3), 2 * r.rand(3) ** 2)]
        for alpha in (0.0, 1.0):
            D = measure_matrix(R, "shape_metric", alpha=alpha).matrix.values
            assert all_triples_hold(D), (t, alpha, D)


@pytest.mark.parametrize("name,opts", [("shape_metric", {"alpha": 0.3, "distance": "euclidean"}),
                                       ("shape_metric", {"alpha": 0.0}), ("permutation_metric", {}),
                                       ("bures_distance", {})])
def test_mixed_widths_matrix_equals_pairs(name, opts):
    R = reps(10, n=25, widths=[4, 6, 3, 6, 5])
    D = measure_matrix(R, name, **opts).matrix.values
    for i, j in itertools.combinations(range(5), 2):
        assert D[i, j] == pytest.approx(compare(R[i], R[j], name, **opts), abs=1e-11)


def test_nuclear_norms_eigvalsh_route_and_fallback():
    r = rng(11)
    full = torch.from_numpy(r.randn(20, 7, 7))
    low = torch.from_numpy(r.randn(5, 7, 2) @ r.randn(5, 2, 7))  # rank 2: the svdvals fall-back
    pad = torch.nn.functional.pad(torch.from_numpy(r.randn(3, 7, 4)), (0, 3))
    M = torch.cat([full, low, pad])
    ref = np.linalg.svd(M.numpy(), compute_uv=False).sum(-1)
    np.testing.assert_allclose(nuclear_norms(M).numpy(), ref, rtol=1e-13)


def test_fewer_inputs_than_features():
    """N < D: the cross-covariance has rank < D; alpha = 0 makes any two such representations equivalent
    (N - 1 centred inputs are always linearly alignable)."""
    X, Y = rng(12).randn(6, 10), rng(13).randn(6, 10)
    angle, dist = procrustes_by_hand(X, Y)
    assert compare(X, Y, "shape_metric") == pytest.approx(angle, abs=1e-12)
    assert compare(X, Y, "shape_metric", distance="euclidean") == pytest.approx(dist, rel=1e-12)
    assert compare(X, Y, "shape_metric", alpha=0) == pytest.approx(0.0, abs=1e-6)


def test_rank_deficient_covariance_alpha_zero_is_regularised():
    """A repeated feature: the zero eigenvalue of Xc^T Xc is raised to 1e-7 (netrep's whiten), so its
    weight is 1e-7^-1/2 ~ 3e3 on a direction that holds only rounding noise (~1e-14): finite, and the same
    angular distance as without the copy."""
    X, Y = reps(14, n=40, d=4, k=2)
    Xd = np.hstack([X, X[:, :1]])
    a = compare(Xd, Y, "shape_metric", alpha=0)
    assert np.isfinite(a)
    assert a == pytest.approx(compare(X, Y, "shape_metric", alpha=0), abs=1e-9)
    D = measure_matrix([Xd, Y, X], "shape_metric", alpha=0).matrix.values
    assert np.isfinite(D).all()


def test_edge_cases_raise_clearly():
    X = rng(15).randn(10, 3)
    with pytest.raises(ValueError, match="alpha"):
        measure("shape_metric", alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        measure("shape_metric", alpha=float("nan"))
    with pytest.raises(ValueError, match="distance"):
        measure("shape_metric", distance="cosine")
    with pytest.raises(ValueError, match="distance"):
        measure("bures_distance", distance="cosine")
    with pytest.raises(TypeError, match="center_columns"):
        measure("permutation_metric", center_columns="yes")
    with pytest.raises(ValueError, match="zero_pad"):
        compare(X, X[:, :2], "shape_metric", zero_pad=False)
    with pytest.raises(ValueError, match="zero_pad"):
        measure_matrix([X, X[:, :2]], "permutation_metric", zero_pad=False)
    with pytest.raises(ValueError, match="constant"):
        compare(np.ones((10, 3)), X, "shape_metric")
    with pytest.raises(ValueError, match="NaN"):
        compare(np.full((10, 3), np.nan), X, "bures_distance")
    with pytest.raises(ValueError, match="N >= 2"):
        compare(X[:1], X[:1], "shape_metric")
    # a constant representation has a Euclidean distance: its norm
    assert compare(np.ones((10, 3)), X, "shape_metric", distance="euclidean") == pytest.approx(
        np.linalg.norm(X - X.mean(0)), rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_nearly_aligned_pairs_are_accurate(name):
    """A rotated (or permuted) and translated copy: distance 0 up to the arccos / square-root cancellation of
    one rounding (sqrt(2 eps) ~ 2e-8 relative), in the pair and in the batched K x K (the SVD route)."""
    X = reps(16, n=50, d=8, k=1)[0]
    T = np.eye(8)[rng(1).permutation(8)] if name == "permutation_metric" else orthogonal(8, 2)
    R = [X, X @ T + 1.0, X[:, ::-1] @ T.T if name != "permutation_metric" else X[:, ::-1]]
    for dist in ("angular", "euclidean"):
        D = measure_matrix(R, name, distance=dist).matrix.values
        scale = 1.0 if dist == "angular" else np.linalg.norm(X - X.mean(0)) / (
            np.sqrt(50) if name == "bures_distance" else 1.0)
        assert np.abs(D).max() <= 5e-8 * scale
        assert compare(R[0], R[1], name, distance=dist) <= 5e-8 * scale
