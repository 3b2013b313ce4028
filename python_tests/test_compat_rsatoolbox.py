"""spectral_ext.compat.rsatoolbox against the installed rsatoolbox 0.3.2
itself: calc_rdm and compare give the same RDMs objects, numbers (~1e-12),
NaN, warnings and exceptions."""
import importlib
import warnings

import numpy as np
import pytest
import rsatoolbox
import rsatoolbox.rdm as rsr

rsr_compare = importlib.import_module("rsatoolbox.rdm.compare")  # (rsr.compare is the function)

import spectral_ext.compat.rsatoolbox as srt

COMPARE_OURS = ["cosine", "spearman", "corr", "kendall", "tau-b", "tau-a", "rho-a"]
COMPARE_DELEGATED = ["corr_cov", "cosine_cov", "bures", "bures_metric"]


def datasets(k=3, n=20, d=5, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rsatoolbox.data.Dataset(
        rng.standard_normal((n, d)).astype(dtype), descriptors={"subj": i, "session": 0},
        obs_descriptors={"conds": np.arange(n) % 6, "fold": np.arange(n) // (n // 2)},
        channel_descriptors={"rois": np.array(["V1", "V4", "IT", "IT", "V1"][:d] + ["V1"] * (d - 5))})
        for i in range(k)]


def assert_same_rdms(ours, theirs, atol=1e-12):
    assert type(ours) is type(theirs) is rsr.RDMs
    assert ours.dissimilarities.shape == theirs.dissimilarities.shape
    assert ours.dissimilarities.dtype == theirs.dissimilarities.dtype
    np.testing.assert_allclose(ours.dissimilarities, theirs.dissimilarities, rtol=0, atol=atol)
    np.testing.assert_array_equal(np.isnan(ours.dissimilarities), np.isnan(theirs.dissimilarities))
    assert ours.dissimilarity_measure == theirs.dissimilarity_measure
    for name in ("descriptors", "rdm_descriptors", "pattern_descriptors"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


@pytest.mark.parametrize("method", ["euclidean", "correlation", "mahalanobis"])
@pytest.mark.parametrize("descriptor", [None, "conds"])
def test_calc_rdm_single_and_list(method, descriptor):
    ds = datasets()
    assert_same_rdms(srt.calc_rdm(ds[0], method=method, descriptor=descriptor),
                     rsr.calc_rdm(ds[0], method=method, descriptor=descriptor))
    assert_same_rdms(srt.calc_rdm(ds, method=method, descriptor=descriptor),
                     rsr.calc_rdm(ds, method=method, descriptor=descriptor))


def test_calc_rdm_options_and_helpers():
    ds = datasets(2)
    for remove_mean in (False, True):
        assert_same_rdms(srt.calc_rdm(ds, "euclidean", remove_mean=remove_mean),
                         rsr.calc_rdm(ds, "euclidean", remove_mean=remove_mean))
    assert_same_rdms(srt.calc_rdm(ds[0].split_channel(by="rois"), method="correlation"),
                     rsr.calc_rdm(ds[0].split_channel(by="rois"), method="correlation"))
    assert_same_rdms(srt.calc_rdm_euclidean(ds[0], "conds"), rsr.calc_rdm_euclidean(ds[0], "conds"))
    assert_same_rdms(srt.calc_rdm_correlation(ds[1]), rsr.calc_rdm_correlation(ds[1]))
    # float32 and integer measurements: rsatoolbox's result dtypes
    f32 = datasets(1, dtype=np.float32)[0]
    assert_same_rdms(srt.calc_rdm(f32), rsr.calc_rdm(f32), atol=1e-5)
    ints = rsatoolbox.data.Dataset(np.random.default_rng(1).integers(-5, 5, (8, 4)))
    assert_same_rdms(srt.calc_rdm(ints), rsr.calc_rdm(ints))


def test_calc_rdm_delegated_methods_and_errors():
    ds = datasets(2)
    pos = [rsatoolbox.data.Dataset(np.abs(d.measurements), descriptors=d.descriptors,
                                   obs_descriptors=d.obs_descriptors) for d in ds]
    assert_same_rdms(srt.calc_rdm(pos, "poisson", descriptor="conds"), rsr.calc_rdm(pos, "poisson", descriptor="conds"))
    noise = np.eye(5) * 2
    assert_same_rdms(srt.calc_rdm(ds[0], "mahalanobis", noise=noise), rsr.calc_rdm(ds[0], "mahalanobis", noise=noise))
    assert_same_rdms(srt.calc_rdm(ds[0], "crossnobis", descriptor="conds", cv_descriptor="fold"),
                     rsr.calc_rdm(ds[0], "crossnobis", descriptor="conds", cv_descriptor="fold"))
    for module in (srt, rsr):
        with pytest.raises(NotImplementedError):
            module.calc_rdm(ds[0], method="cosine")
        with pytest.raises(ValueError, match="descriptor must be a string"):
            module.calc_rdm(ds[0], method="crossnobis")


def test_calc_rdm_constant_pattern_nan_and_warning():
    X = np.random.default_rng(2).standard_normal((7, 4))
    X[3] = 1.5
    ds = rsatoolbox.data.Dataset(X)
    results = []
    for module in (rsr, srt):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(module.calc_rdm(ds, method="correlation"))
        assert [(w.category, str(w.message)) for w in caught] == [(RuntimeWarning,
                                                                   "invalid value encountered in divide")]
    assert np.isnan(results[0].dissimilarities).sum() == 6
    assert_same_rdms(results[1], results[0])


def rdm_sets(seed=0):
    rng = np.random.default_rng(seed)
    continuous = rsr.RDMs(rng.random((4, 28)))
    tied = rsr.RDMs(np.round(rng.random((3, 28)), 1))
    tied.dissimilarities[2] = 0.5  # constant: NaN for tau-b, 0 for the correlations
    zero = rsr.RDMs(np.vstack([np.zeros(28), rng.random(28)]))
    return continuous, tied, zero


def pairwise(module, a, b, method):
    """module.compare one pair of single RDMs at a time."""
    return np.array([[module.compare(a[i], b[j], method=method)[0, 0] for j in range(b.n_rdm)]
                     for i in range(a.n_rdm)])


@pytest.mark.parametrize("method", COMPARE_OURS + COMPARE_DELEGATED)
def test_compare_matches_rsatoolbox(method):
    continuous, tied, zero = rdm_sets()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for a, b in [(continuous, tied[[0, 1]]), (tied[[0, 1]], tied[[0, 1]]), (continuous, continuous), (tied[[0, 1]], continuous.copy())]:
            ours, theirs = srt.compare(a, b, method=method), rsr.compare(a, b, method=method)
            assert isinstance(ours, np.ndarray) and ours.shape == theirs.shape == (a.n_rdm, b.n_rdm)
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
            np.testing.assert_allclose(ours, pairwise(srt, a, b, method), rtol=0, atol=1e-12)
        # a constant or zero RDM: 0 for the cosine-based comparisons, NaN for tau-b, as rsatoolbox
        # gives pair by pair (its stacked _cosine misplaces the other values: np.putmask repeats
        # them by flat position, so there we follow its pairwise values)
        for a, b in [(continuous, tied), (tied, tied), (zero, continuous), (zero, zero)]:
            if method in COMPARE_DELEGATED:  # rsatoolbox's own, as it is
                if a is not zero and b is not zero:
                    np.testing.assert_array_equal(srt.compare(a, b, method), rsr.compare(a, b, method))
                continue
            ours = srt.compare(a, b, method=method)
            np.testing.assert_allclose(ours, pairwise(rsr, a, b, method), rtol=0, atol=1e-12, equal_nan=True)
    if method in ("corr", "spearman"):
        assert np.abs(rsr.compare(continuous, tied, method=method) - srt.compare(continuous, tied, method=method)).max() > 0.01


def test_compare_functions_numpy_inputs_and_nan_patterns():
    continuous, tied, _ = rdm_sets(1)
    tied = tied[[0, 1]]  # no constant RDM (see test_compare_matches_rsatoolbox)
    pairs = {"compare_cosine": "cosine", "compare_correlation": "corr", "compare_spearman": "spearman",
             "compare_rho_a": "rho-a", "compare_kendall_tau": "kendall", "compare_kendall_tau_a": "tau-a"}
    for fn in pairs:
        np.testing.assert_allclose(getattr(srt, fn)(continuous, tied), getattr(rsr_compare, fn)(continuous, tied),
                                   atol=1e-12, equal_nan=True)
        # numpy vectors, one and two dimensional
        v1, v2 = continuous.get_vectors()[0], tied.get_vectors()
        np.testing.assert_allclose(getattr(srt, fn)(v1, v2), getattr(rsr_compare, fn)(v1, v2), atol=1e-12)
    # NaN entries (a repeated pattern) are dropped in both
    sub1 = continuous.subsample_pattern("index", [0, 1, 1, 3, 4, 5, 6, 7])
    sub2 = tied[[0, 1]].subsample_pattern("index", [0, 1, 1, 3, 4, 5, 6, 7])
    assert np.isnan(sub1.dissimilarities).any()
    for method in COMPARE_OURS:
        np.testing.assert_allclose(srt.compare(sub1, sub2, method), rsr.compare(sub1, sub2, method), atol=1e-12)


def test_compare_errors():
    continuous, _, _ = rdm_sets()
    other = rsr.RDMs(np.random.default_rng(0).random((2, 15)))
    for module in (srt, rsr):
        with pytest.raises(ValueError, match="Unknown RDM comparison method requested!"):
            module.compare(continuous, continuous, method="pearson")
        with pytest.raises(ValueError, match="rdm1 and rdm2 must be RDMs of equal shape"):
            module.compare(continuous, other, method="spearman")
        with pytest.raises(ValueError, match="different nan positions"):
            module.compare_spearman(np.array([1.0, np.nan, 3.0]), np.array([np.nan, 2.0, 3.0]))


def test_compare_two_conditions_corner_case():
    """One entry per RDM (two conditions): rsatoolbox's own values, whatever they are."""
    a = rsr.RDMs(np.array([[0.3], [0.7]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("tau-a", "kendall", "cosine"):
            np.testing.assert_array_equal(srt.compare(a, a, method), rsr.compare(a, a, method))


def test_calc_then_compare_pipeline_many():
    """The benchmark's pipeline, smaller: the K x K of K datasets' RDMs."""
    ds = [rsatoolbox.data.Dataset(m) for m in np.random.default_rng(4).standard_normal((6, 40, 8))]
    ours = srt.compare(r := srt.calc_rdm(ds, method="euclidean"), r, method="spearman")
    theirs_rdms = rsr.calc_rdm(ds, method="euclidean")
    np.testing.assert_allclose(ours, rsr.compare(theirs_rdms, theirs_rdms, method="spearman"), atol=1e-12)
    np.testing.assert_allclose(np.diag(ours), 1, atol=1e-12)
