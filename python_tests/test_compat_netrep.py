"""spectral_ext.compat.netrep against netrep's own numbers (python_tests/data/
netrep_values.json, written by scripts/netrep_fixture.py from netrep's source
at the commit it records; netrep is not on the package index) and against
formulas written out here (scipy's orthogonal Procrustes and assignment,
the whitening by hand)."""
import importlib.util
import json
import os

import numpy as np
import pytest
import scipy.linalg
from scipy.optimize import linear_sum_assignment

from spectral_ext.compat import netrep as cn
from spectral_ext.similarity import compare, measure_matrix

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "netrep_values.json")) as f:
    DATA = json.load(f)
_spec = importlib.util.spec_from_file_location("netrep_fixture",
                                               os.path.join(os.path.dirname(HERE), "scripts", "netrep_fixture.py"))
fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture)


#: netrep's arccos of a cosine within one rounding of 1 is sqrt(2 eps) = 1.5e-8 (a zero distance, seed 2,
#: N < D at alpha = 0); elsewhere the agreement is ~1e-12
ANGLE_TOL = 2e-8


def unique_alignment(row):
    """The test score needs netrep's choice of U, V: unique unless padded or N <= D."""
    return row["Dx"] == row["Dy"] and row["N"] > row["Dx"]


def test_fixture_provenance():
    assert len(DATA["netrep_commit"]) == 40
    assert DATA["shapes"]["pairs"] == [list(p) for p in fixture.PAIRS]
    assert os.path.getsize(os.path.join(HERE, "data", "netrep_values.json")) < 100_000


@pytest.mark.parametrize("row", DATA["pairs"], ids=lambda r: f"s{r['seed']}-a{r['alpha']}-{r['score_method']}-"
                                                             f"c{int(r['center_columns'])}")
def test_linear_metric_matches_netrep(row):
    X, Y, Xt, Yt = fixture.inputs(row["seed"], row["N"], row["Dx"], row["Dy"])
    m = cn.LinearMetric(alpha=row["alpha"], center_columns=row["center_columns"], score_method=row["score_method"])
    assert m.fit_score(X, Y) == pytest.approx(row["train"], abs=ANGLE_TOL)
    if unique_alignment(row):
        assert m.score(Xt, Yt) == pytest.approx(row["test"], abs=1e-8)
        ref = np.array(row["WxWyT"])
        np.testing.assert_allclose(m.Wx_ @ m.Wy_.T, ref, atol=1e-8 * np.abs(ref).max())
    # the measure (no fit object) gives the training distance
    got = compare(X, Y, "shape_metric", alpha=row["alpha"], distance=row["score_method"],
                  center_columns=row["center_columns"])
    assert got == pytest.approx(row["train"], abs=ANGLE_TOL)


@pytest.mark.parametrize("row", DATA["permutation"], ids=lambda r: f"s{r['seed']}-{r['score_method']}")
def test_permutation_metric_matches_netrep(row):
    X, Y, Xt, Yt = fixture.inputs(row["seed"], row["N"], row["Dx"], row["Dy"])
    m = cn.PermutationMetric(score_method=row["score_method"])
    assert m.fit_score(X, Y) == pytest.approx(row["train"], abs=1e-10)
    assert m.score(Xt, Yt) == pytest.approx(row["test"], abs=1e-10)
    if row["Dx"] == row["Dy"]:  # padded rows are ties: any order of them is optimal
        assert m.Px_.tolist() == row["Px"] and m.Py_.tolist() == row["Py"]
    assert compare(X, Y, "permutation_metric", distance=row["score_method"]) == pytest.approx(row["train"],
                                                                                              abs=1e-10)


@pytest.mark.parametrize("row", DATA["pairwise"], ids=lambda r: f"{r['metric']}-{r.get('alpha')}-{r['score_method']}")
def test_pairwise_distances_match_netrep(row):
    train, test = fixture.networks()
    if row["metric"] == "LinearMetric":
        metric = cn.LinearMetric(alpha=row["alpha"], score_method=row["score_method"])
        name, opts = "shape_metric", {"alpha": row["alpha"]}
    else:
        metric = cn.PermutationMetric(score_method=row["score_method"])
        name, opts = "permutation_metric", {}
    D_train, D_test = cn.pairwise_distances(metric, train, test, verbose=False)
    np.testing.assert_allclose(D_train, row["train"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(D_test, row["test"], rtol=0, atol=1e-8)
    assert isinstance(cn.pairwise_distances(metric, train, verbose=False), np.ndarray)
    M = measure_matrix(train, name, distance=row["score_method"], **opts).matrix.values
    np.testing.assert_allclose(M, row["train"], rtol=0, atol=1e-8)
    # the method form: (D_train, D_test), D_test inf off the diagonal without test data
    A, B = metric.pairwise_distances(train, verbose=False)
    np.testing.assert_allclose(A, row["train"], rtol=0, atol=1e-8)
    assert np.isinf(B[~np.eye(4, dtype=bool)]).all() and (np.diag(B) == 0).all()


@pytest.mark.parametrize("row", DATA["bures"], ids=lambda r: f"s{r['seed']}")
def test_bures_matches_netrep_sq_bures_metric(row):
    """netrep.utils.sq_bures_metric of the N x N centred kernels / N. Its square roots of the kernels' zero
    eigenvalues (N > D: rank <= D) cost ~sqrt(eps) relative, hence the tolerance."""
    X, Y, _, _ = fixture.inputs(row["seed"], row["N"], row["Dx"], row["Dy"])
    assert compare(X, Y, "bures_distance") ** 2 == pytest.approx(row["sq_bures"], rel=1e-6, abs=1e-6)


def whiten_by_hand(X, alpha, center=True):
    """netrep's whiten written as in the paper: Z = (alpha I + (1 - alpha) C^-1/2) rescaled to keep tr C."""
    Xc = X - X.mean(0) if center else X
    C = Xc.T @ Xc
    if alpha == 1:
        return Xc
    w, V = np.linalg.eigh(C)
    w = np.maximum(w, 1e-7)
    Z = alpha * np.eye(len(C)) + (1 - alpha) * (V / np.sqrt(w)) @ V.T
    return Xc @ Z * np.sqrt(w.sum() / np.trace(Z @ C @ Z))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("method", ["angular", "euclidean"])
def test_linear_metric_against_orthogonal_procrustes(alpha, method):
    X, Y, Xt, Yt = fixture.inputs(11, 60, 7, 7)
    Xw, Yw = whiten_by_hand(X, alpha), whiten_by_hand(Y, alpha)
    R, _ = scipy.linalg.orthogonal_procrustes(Yw, Xw)  # Yw R ~ Xw
    if method == "angular":
        ref = np.arccos(np.sum(Xw * (Yw @ R)) / (np.linalg.norm(Xw) * np.linalg.norm(Yw)))
    else:
        ref = np.linalg.norm(Xw - Yw @ R)
    m = cn.LinearMetric(alpha=alpha, score_method=method)
    assert m.fit_score(X, Y) == pytest.approx(ref, abs=1e-10)
    tX, tY = m.transform(X, Y)
    np.testing.assert_allclose(tX, (X - X.mean(0)) @ m.Wx_, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(tX - tY), np.linalg.norm(Xw - Yw @ R), atol=1e-10)
    np.testing.assert_allclose(m.mx_, X.mean(0), atol=1e-14)
    D = cn.pairwise_distances(m, [X, Y, X + 1.0], verbose=False)
    # a translation: 0 up to the nuclear-norm route's sqrt(eps) ||Xw|| (sqrt(|X|^2 + |Y|^2 - 2 n) cancels)
    assert D[0, 2] == pytest.approx(0.0, abs=1e-7 * (np.linalg.norm(Xw) if method == "euclidean" else 1))
    assert D[0, 1] == pytest.approx(ref, abs=1e-10)


def test_permutation_metric_against_scipy_assignment():
    X, Y, _, _ = fixture.inputs(12, 50, 9, 9)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    r, c = linear_sum_assignment(Xc.T @ Yc, maximize=True)
    ref = np.linalg.norm(Xc[:, r] - Yc[:, c])
    assert cn.PermutationMetric(score_method="euclidean").fit_score(X, Y) == pytest.approx(ref, abs=1e-10)
    perm = np.random.RandomState(0).permutation(9)
    assert cn.PermutationMetric().fit_score(X, X[:, perm]) == pytest.approx(0.0, abs=1e-7)


def test_partial_fit_finalize_fit_and_attributes():
    X, Y, _, _ = fixture.inputs(13, 30, 4, 4)
    m = cn.LinearMetric(alpha=0.5)
    mx, Xw, Zx = m.partial_fit(X)
    np.testing.assert_allclose(Xw, (X - mx) @ Zx, atol=1e-12)
    np.testing.assert_allclose(Xw, whiten_by_hand(X, 0.5), atol=1e-10)
    m.finalize_fit((mx, Xw, Zx), m.partial_fit(Y))
    assert {"mx_", "my_", "Wx_", "Wy_"} <= set(vars(m))
    assert m.score(X, Y) == pytest.approx(cn.LinearMetric(alpha=0.5).fit_score(X, Y), abs=1e-12)
    assert m.get_params() == {"alpha": 0.5, "center_columns": True, "zero_pad": True, "score_method": "angular"}
    assert "LinearMetric(alpha=0.5" in repr(m)


def test_errors_are_netreps():
    with pytest.raises(ValueError, match="between zero and one"):
        cn.LinearMetric(alpha=1.5)
    with pytest.raises(ValueError, match="score_method"):
        cn.LinearMetric(score_method="cosine")
    with pytest.raises(ValueError, match="score_method"):
        cn.PermutationMetric(score_method="cosine")
    with pytest.raises(AttributeError, match="not fitted"):
        cn.LinearMetric().score(np.ones((5, 2)), np.ones((5, 2)))
    X = np.random.RandomState(0).randn(10, 3)
    with pytest.raises(ValueError, match="equal dimensions"):
        cn.LinearMetric(zero_pad=False).fit(X, X[:, :2])
    with pytest.raises(ValueError, match="2d arrays"):
        cn.LinearMetric().fit(X[None], X[None])
    with pytest.raises(ValueError, match="NaN"):
        cn.LinearMetric().fit(np.full((4, 2), np.nan), X[:4, :2])
    with pytest.raises(ValueError, match="wrong shape"):
        cn.LinearMetric().fit(X, X)._transform_X(X[:, :2])


class _Loop:
    """A metric object pairwise_distances does not know: run pair by pair."""

    def __init__(self):
        self.inner = cn.LinearMetric(alpha=0.5)

    def partial_fit(self, X):
        return self.inner.partial_fit(X)

    def finalize_fit(self, a, b):
        self.inner.finalize_fit(a, b)

    def fit(self, X, Y):
        self.inner.fit(X, Y)

    def score(self, X, Y):
        return self.inner.score(X, Y)


@pytest.mark.parametrize("caching", [False, True])
def test_pairwise_distances_other_metric_objects_loop(caching):
    train, test = fixture.networks(widths=(5, 5, 5))
    A = cn.pairwise_distances(_Loop(), train, test, verbose=False, enable_caching=caching)
    B = cn.pairwise_distances(cn.LinearMetric(alpha=0.5), train, test, verbose=False)
    np.testing.assert_allclose(A[0], B[0], atol=1e-10)
    np.testing.assert_allclose(A[1], B[1], atol=1e-10)
