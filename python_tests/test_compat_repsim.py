"""spectral_ext.compat.repsim against the installed repsim 0.1.5 (its C++/Eigen
functions): the same (M, M) arrays on several random inputs (Gaussian, ReLU
features with a large mean, rank-deficient and constant columns, N < D,
mixed widths) to 1e-8 relative, and the same exception types on bad input.
repsim's sdist (/tmp/rs/repsim-0.1.5) ships no test suite."""
import numpy as np
import pytest
import repsim
import torch

from spectral_ext.compat import repsim as ours


def inputs(kind, seed=0):
    g = np.random.default_rng(seed)
    if kind == "gaussian":
        return [g.standard_normal((50, d)) for d in (6, 6, 9, 4)]
    if kind == "related":
        X = g.standard_normal((60, 8))
        return [X, X @ g.standard_normal((8, 5)) + 0.3 * g.standard_normal((60, 5)),
                np.tanh(X @ g.standard_normal((8, 10))), g.standard_normal((60, 7))]
    if kind == "relu":  # all positive, a large mean: svcca's threshold drops the mean direction
        return [np.maximum(g.standard_normal((70, 12)) + 0.8, 0) * 5 for _ in range(3)]
    if kind == "deficient":  # a duplicated and a constant column
        X = g.standard_normal((40, 5))
        return [np.column_stack([X, X[:, 0], np.full(40, 2.0)]), g.standard_normal((40, 6)), X[:, :3]]
    if kind == "wide":  # N < D
        return [g.standard_normal((20, 30)), g.standard_normal((20, 8)), g.standard_normal((20, 25))]
    raise ValueError(kind)


KINDS = ["gaussian", "related", "relu", "deficient", "wide"]


def assert_close(a, b, rtol=1e-8):
    assert isinstance(a, np.ndarray) and a.dtype == np.float64 and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("summary", [None, "yanai", "pillai", " Pillai "])
def test_cca_and_svcca(kind, summary):
    mats = inputs(kind)
    assert_close(ours.cca(mats, summary), repsim.cca(mats, summary))
    assert_close(ours.svcca(mats, summary), repsim.svcca(mats, summary))


@pytest.mark.parametrize("kind", KINDS)
def test_pwcca_and_dot_product(kind):
    mats = inputs(kind, seed=1)
    assert_close(ours.pwcca(mats), repsim.pwcca(mats))
    assert_close(ours.dot_product(mats), repsim.dot_product(mats))


@pytest.mark.parametrize("kind", ["gaussian", "related", "relu", "wide"])
@pytest.mark.parametrize("kernel", [None, "linear", "rbf", "rbf_mean", "rbf_dualmed"])
@pytest.mark.parametrize("estimator", [None, "gretton", "song", "lange"])
def test_cka_and_hsic(kind, kernel, estimator):
    mats = inputs(kind, seed=2)
    assert_close(ours.cka(mats, kernel, estimator), repsim.cka(mats, kernel, estimator))
    assert_close(ours.hsic(mats, kernel, estimator), repsim.hsic(mats, kernel, estimator))


def test_small_n_falls_back_to_gretton_and_tuples_tensors_lists():
    mats = [np.random.default_rng(3).standard_normal((3, 4)) for _ in range(2)]
    assert_close(ours.hsic(mats, "linear", "song"), repsim.hsic(mats, "linear", "song"))
    mats = inputs("gaussian")
    assert_close(ours.cka(tuple(mats), "linear"), repsim.cka(tuple(mats), "linear"))
    assert_close(ours.cca([torch.from_numpy(m) for m in mats]), repsim.cca(mats))
    assert_close(ours.dot_product([m.tolist() for m in mats]), repsim.dot_product([m.tolist() for m in mats]))


def test_linear_regression_measure_against_repsim_core():
    # repsim's core_LinReg is compiled but not exported: uncentred R^2 averaged over both directions
    from spectral_ext.similarity.measure import measure_matrix

    mats = inputs("related", seed=4)
    assert_close(measure_matrix(mats, "linear_regression", symmetric=True, centered=False).matrix.values,
          repsim._repsim.cpp_linreg(mats))


def test_exports():
    assert set(repsim.__all__) <= set(ours.__all__)
    assert ours.repsim_kernels() == repsim.repsim_kernels()
    assert ours.repsim_hsic() == repsim.repsim_hsic()
    assert ours.__version__ == repsim.__version__


def assert_same_error(call, *args):
    with pytest.raises(Exception) as theirs:
        call(repsim, *args)
    with pytest.raises(type(theirs.value)):
        call(ours, *args)


BAD = [
    "not a list",
    [],
    [np.zeros(5)],
    [np.ones((4, 2)), np.ones((5, 2))],
    [np.array([[1.0, np.nan], [2.0, 3.0]])],
    [np.array([[1.0, np.inf], [2.0, 3.0]])],
    [object()],
]


@pytest.mark.parametrize("mats", BAD, ids=range(len(BAD)))
@pytest.mark.parametrize("fn", ["cca", "svcca", "pwcca", "dot_product", "cka", "hsic"])
def test_bad_mats(fn, mats):
    assert_same_error(lambda mod, m: getattr(mod, fn)(m), mats)


def test_bad_options():
    mats = inputs("gaussian")
    for fn in ("cca", "svcca"):
        assert_same_error(lambda mod: getattr(mod, fn)(mats, "mean"))
        assert_same_error(lambda mod: getattr(mod, fn)(mats, 3))  # repsim calls .strip(): AttributeError
    for fn in ("cka", "hsic"):
        assert_same_error(lambda mod: getattr(mod, fn)(mats, kernel_type="poly"))
        assert_same_error(lambda mod: getattr(mod, fn)(mats, estimator="biased"))


def test_degenerate_inputs_refused_where_repsim_returns_placeholders():
    g = np.random.default_rng(5)
    X = g.standard_normal((30, 4))
    with pytest.raises(ValueError, match=r"mats\[1\]"):
        ours.cca([X, np.full((30, 3), 1.0)])
    with pytest.raises(ValueError, match=r"mats\[1\]"):
        ours.cka([X, np.full((30, 3), 1.0)], "linear")
