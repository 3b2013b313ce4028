"""Weight-space spectra (seed 001 sections 3-4): the vectorised KS scan against a
plain loop over xmin, WeightWatcher's conventions (an object passed in, or by
name), one spectrum per weight and alpha-hat's account of the layers it used."""
import io
import contextlib
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from spectral_ext import spectra as Sp
from spectral_ext.compat.weightwatcher import WEIGHTWATCHER


def loop_fit(x, min_tail=10, weightwatcher=False):
    """Independent route: one candidate xmin at a time, as the papers write it."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    x = x[x > (1e-5 if weightwatcher else 0)]
    n = len(x)
    best = None
    last = n - 1 if weightwatcher else n - min_tail + 1
    for i in range(max(last, 0)):
        if not weightwatcher and i > 0 and x[i] == x[i - 1]:
            continue
        tail = x[i:]
        m = len(tail)
        s = np.sum(np.log(tail / x[i]))
        if weightwatcher and n < 20:
            if m < 8 or s <= 1e-12:
                continue
            alpha = 1 + (m - 1) / s
        else:
            alpha = 1 + m / s if s > 0 else np.inf
        if not alpha > 1 or not np.isfinite(alpha) and not weightwatcher:
            continue
        fitted = 1 - (tail / x[i]) ** (1 - alpha)
        d = np.max(np.abs(fitted - np.arange(m) / m))
        if not weightwatcher:
            d = max(d, np.max(np.abs(np.arange(1, m + 1) / m - fitted)))
        if best is None or d < best[2]:
            best = (alpha, x[i], d)
    return best


def spectra_cases():
    rng = np.random.default_rng(0)
    for n in (12, 19, 25, 60, 300, 500, 900):
        yield n, rng.pareto(rng.uniform(1, 3), n) + 1
        yield n, np.linalg.svd(rng.standard_normal((n, n + 7)), compute_uv=False) ** 2
        yield n, np.round(rng.exponential(1.0, n), 1) + 0.05  # many ties


@pytest.mark.parametrize("weightwatcher", [False, True])
def test_vectorised_scan_equals_a_loop_over_xmin(weightwatcher):
    for n, x in spectra_cases():
        expected = loop_fit(x, weightwatcher=weightwatcher)
        fit = Sp.fit_power_law(torch.tensor(x), convention=WEIGHTWATCHER if weightwatcher else Sp.SEED001)
        assert expected is not None
        assert fit.alpha == pytest.approx(expected[0], rel=1e-9), n
        assert fit.xmin == expected[1] and fit.ks == pytest.approx(expected[2], rel=1e-9, abs=1e-12)
        assert fit.sigma == pytest.approx((fit.alpha - 1) / math.sqrt(fit.n_tail))


def test_batched_fits_equal_single_fits_and_too_short_rows_say_so():
    rng = np.random.default_rng(1)
    batch = np.sort(rng.pareto(2.0, (7, 40)) + 1, axis=1)
    batch[3, :35] = 0.0  # 5 positive values: below min_tail
    fits = Sp.fit_power_laws(torch.tensor(batch))
    assert isinstance(fits, Sp.PowerLawFits) and fits.convention is Sp.SEED001
    frame = fits.to_frame()
    for r in range(7):
        single = Sp.fit_power_law(torch.tensor(batch[r]))
        assert frame.iloc[r]["xmin"] == single.xmin or np.isnan(single.xmin)
    assert np.isnan(frame.iloc[3]["alpha"]) and frame.iloc[3]["status"] == "too few eigenvalues"
    assert frame.iloc[3]["n"] == 5 and (frame.drop(index=3)["status"] == "success").all()


def test_weightwatcher_convention_equals_the_real_wwfit():
    from weightwatcher import WW_powerlaw
    for n, x in spectra_cases():
        with contextlib.redirect_stdout(io.StringIO()):
            real = WW_powerlaw.WWFit(np.sort(x[x > 1e-5]))
        fit = Sp.fit_power_law(torch.tensor(x), convention="weightwatcher")
        assert [fit.alpha, fit.xmin, fit.ks, fit.sigma] == pytest.approx(
            [real.alpha, real.xmin, real.D, real.sigma], rel=1e-9)


def test_conventions_are_objects_passed_in_or_named():
    """One resolution: a PowerLawConvention is itself, the names are SEED001 and the adapter's WEIGHTWATCHER;
    a changed copy is a convention of its own, taken by every entry point."""
    assert Sp.power_law_convention("seed001") is Sp.SEED001
    assert Sp.power_law_convention(Sp.SEED001) is Sp.SEED001
    assert Sp.power_law_convention("weightwatcher") is WEIGHTWATCHER and WEIGHTWATCHER.name == "weightwatcher"
    for bad in ("ww", None, 3):
        with pytest.raises(ValueError, match="convention must be a PowerLawConvention"):
            Sp.power_law_convention(bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Sp.SEED001.evals_thresh = 1.0
    x = Sp.sample_power_law(2.5, 1.0, 300, generator=torch.Generator().manual_seed(2)).double()
    assert Sp.fit_power_law(x, convention=WEIGHTWATCHER) == Sp.fit_power_law(x, convention="weightwatcher")
    strict = dataclasses.replace(Sp.SEED001, name="strict", evals_thresh=2.0)
    assert Sp.fit_power_law(x, convention=strict) == Sp.fit_power_law(x[x > 2.0])
    frame = Sp.layer_spectra(small_cnn(), convention=strict).to_frame()
    assert frame.attrs["convention"] == "strict"


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 30), nn.ReLU(), nn.Linear(30, 10))


def test_one_spectrum_per_weight_by_an_independent_route():
    model = small_cnn()
    frame = Sp.layer_spectra(model, torch.zeros(1, 1, 8, 8)).to_frame()
    W = model[2].weight.detach().double()
    sigma = torch.linalg.svdvals(W.reshape(6, -1))
    row = frame.set_index("layer").loc["2"]
    assert row["lambda_max"] == pytest.approx(float(sigma[0] ** 2), rel=1e-10)
    assert row["stable_rank"] == pytest.approx(float((sigma ** 2).sum() / sigma[0] ** 2), rel=1e-10)
    assert row["n_eigenvalues"] == 6 and "too few eigenvalues (6 < min_tail 10)" == row["note"]
    result = Sp.layer_spectra(model, torch.zeros(1, 1, 8, 8), convention="weightwatcher")
    assert isinstance(result, Sp.LayerSpectra) and result.convention is WEIGHTWATCHER
    ww = result.to_frame().set_index("layer")
    slices = W.permute(2, 3, 0, 1).reshape(9, 6, 4)
    pooled = torch.linalg.svdvals(slices).square().reshape(-1).sort(descending=True).values / 2
    assert ww.loc["2", "n_eigenvalues"] == 36
    assert ww.loc["2", "lambda_max"] == pytest.approx(float(pooled[0]), rel=1e-10)
    assert ww.loc["2", "stable_rank"] == pytest.approx(float(pooled.sum() / pooled[0]), rel=1e-10)
    assert np.isfinite(ww.loc["2", "alpha"]) and ww.attrs["convention"] == "weightwatcher"


def test_alpha_hat_names_the_layers_it_leaves_out_and_reuses_the_frame(monkeypatch):
    model = small_cnn()
    x = torch.zeros(1, 1, 8, 8)
    result = Sp.layer_spectra(model, x)
    frame = result.to_frame()
    with pytest.warns(UserWarning, match=r"used 2 of 4 layers; left out: 0 \(too few eigenvalues \(4 < min_tail 10\)\)"):
        value = Sp.alpha_hat(model, x)
    used = frame.dropna(subset=["alpha"])
    assert value == pytest.approx(float((used["alpha"] * np.log(used["lambda_max"])).sum()))
    monkeypatch.setattr(Sp, "weight_singular_values", lambda *a, **k: pytest.fail("recomputed a spectrum"))
    with pytest.warns(UserWarning):
        assert Sp.alpha_hat(frame) == value
    with pytest.warns(UserWarning):
        assert Sp.alpha_hat(result) == value
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        everything = Sp.alpha_hat(model, x, min_tail=2)  # every layer fitted: no warning
    assert everything != value


def test_weightwatcher_alpha_hat_is_its_summary_alpha_weighted():
    import weightwatcher as ww
    model = small_cnn()
    with contextlib.redirect_stdout(io.StringIO()):
        watcher = ww.WeightWatcher(model=model)
        watcher.analyze()
    expected = watcher.get_summary()["alpha_weighted"]
    assert Sp.alpha_hat(model, torch.zeros(1, 1, 8, 8), convention="weightwatcher") == pytest.approx(expected, rel=1e-8)


def test_bad_arguments_name_themselves():
    x = torch.rand(50) + 1
    with pytest.raises(ValueError, match="convention"):
        Sp.fit_power_law(x, convention="ww")
    with pytest.raises(ValueError, match="min_tail"):
        Sp.fit_power_law(x, min_tail=0)
    with pytest.raises(ValueError, match="xmin"):
        Sp.fit_power_law(x, xmin=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        Sp.fit_power_law(torch.tensor([1.0, float("nan")]))
    for convention, status in (("seed001", "too few eigenvalues"), ("weightwatcher", "failed")):
        empty = Sp.fit_power_law(torch.zeros(0, dtype=torch.float64), convention=convention)
        assert np.isnan(empty.alpha) and empty.status == status and empty.n == 0
    with pytest.raises(ValueError, match="eigenvalues must be 1-d"):
        Sp.fit_power_law(torch.ones(2, 3))
    with pytest.raises(ValueError, match="layer_spectra columns"):
        Sp.alpha_hat(__import__("pandas").DataFrame({"a": [1]}))


def test_power_law_fit_is_a_dataclass_not_a_dict():
    x = Sp.sample_power_law(2.5, 1.0, 400, generator=torch.Generator().manual_seed(0)).double()
    fit = Sp.fit_power_law(x)
    fields = dataclasses.asdict(fit)
    assert isinstance(fit, Sp.PowerLawFit) and set(fields) == {
        "alpha", "xmin", "xmax", "ks", "sigma", "n_tail", "n", "status"}
    frame = fit.to_frame()
    assert list(frame.columns) == list(fields) and frame["alpha"].iloc[0] == fit.alpha
    assert fields == Sp.fit_power_laws(x[None]).to_frame().iloc[0].to_dict()  # the batched route, row for row
    assert isinstance(fit.n_tail, int) and fit.status == "success"
    with pytest.raises(TypeError):
        fit["alpha"]  # no longer read as a dict (0.2.0)


def test_a_flat_spectrum_has_no_power_law_and_says_so():
    """An orthogonal initialisation's eigenvalues are all 1 up to float32 rounding: the MLE over such a tail gives
    alpha ~1e6 with a small KS distance, a number about rounding. seed 001's fit refuses tails spanning less
    than FLAT_TAIL_RTOL (alpha NaN, status and note say why); WeightWatcher's convention keeps WWFit's number."""
    torch.manual_seed(0)
    W = torch.nn.init.orthogonal_(torch.empty(64, 256))
    eig = torch.linalg.svdvals(W.double()).square()
    assert float(eig.max() / eig.min() - 1) < 1e-5  # flat to float32 rounding
    fit = Sp.fit_power_law(eig)
    assert math.isnan(fit.alpha) and fit.status == "flat spectrum" and fit.n == 64
    ww = Sp.fit_power_law(eig, convention="weightwatcher")
    assert ww.status == "success" and ww.alpha > 1e5  # WWFit's own answer, reproduced as it is
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48))
    with torch.no_grad():
        model[0].weight.copy_(W)
    frame = Sp.layer_spectra(model, torch.randn(2, 256)).to_frame()
    assert math.isnan(frame["alpha"].iloc[0]) and frame["note"].iloc[0].startswith("flat spectrum")
    assert frame["alpha"].iloc[1] > 1 and frame["note"].iloc[1] == ""
    with pytest.warns(UserWarning, match="left out: 0 \\(flat spectrum"):
        assert Sp.alpha_hat(frame) == pytest.approx(frame["alpha"].iloc[1] * math.log(frame["lambda_max"].iloc[1]))


def test_a_flat_top_cluster_is_never_xmin_and_the_tail_below_it_is_fitted():
    """A power-law sample topped by 60 values equal to 1e-7 relative, spread as a power law of huge alpha
    (exponential quantiles in log): the cluster alone is the tail of least KS distance (alpha ~1e7); the fit
    takes a spanning tail instead, exactly the best of the exhaustive scan without the cluster's candidates."""
    x = Sp.sample_power_law(3.0, 1.0, 100, generator=torch.Generator().manual_seed(1))
    top = float(x.max()) * 2
    spread = -torch.log(1 - (torch.arange(60, dtype=torch.float64) + 0.5) / 60)
    clustered = torch.cat([x, top * (1 + 1e-7 * spread)])
    without = dataclasses.replace(Sp.SEED001, flat_tail_rtol=None)
    assert Sp.fit_power_law(clustered, convention=without).alpha > 1e6  # without the rule the cluster is the tail
    fit = Sp.fit_power_law(clustered)
    assert fit.status == "success" and fit.xmin < top and fit.n_tail > 60 and 1 < fit.alpha < 10
    # the same candidates scanned exhaustively, those inside the cluster left out
    best = None
    xs = clustered.sort().values.numpy()
    for i in range(len(xs) - 10 + 1):
        tail = xs[i:]
        if (i and xs[i] == xs[i - 1]) or tail[-1] < tail[0] * (1 + Sp.FLAT_TAIL_RTOL):
            continue
        alpha = 1 + len(tail) / np.log(tail / tail[0]).sum()
        cdf = 1 - (tail / tail[0]) ** (1 - alpha)
        emp = np.arange(len(tail)) / len(tail)
        d = max(np.abs(cdf - emp).max(), np.abs(cdf - emp - 1 / len(tail)).max())
        if best is None or d < best[0]:
            best = (d, tail[0], alpha)
    assert fit.xmin == best[1] and fit.alpha == pytest.approx(best[2], rel=1e-9)


@pytest.mark.parametrize("openblas", [False, True])
def test_gram_singular_values_on_both_blas_routes_are_the_svd(monkeypatch, openblas):
    """MKL (torch) and, for other vendors' CPUs, numpy's OpenBLAS: the same singular values as a float64 SVD,
    wide and tall, batched, on both sides of the size where numpy's eigvalsh takes over."""
    from spectral_ext import _linalg

    monkeypatch.setattr(_linalg, "_OPENBLAS_CHOICE", openblas)
    g = torch.Generator().manual_seed(0)
    for shape in ((7, 30), (30, 7), (3, 9, 5, 40), (2, 200, 300), (250, 200), (4, 1, 1)):
        M = torch.randn(*shape, generator=g, dtype=torch.float64)
        got = _linalg.gram_singular_values(M)
        want = torch.linalg.svdvals(M)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.max()))
    assert _linalg.gram_singular_values(torch.randn(3, 4, requires_grad=True)).shape == (3,)  # torch's route


def test_openblas_route_keeps_to_torchs_thread_count():
    """Where numpy's OpenBLAS does the products, it runs on torch.get_num_threads() threads, not every core."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from spectral_ext import _linalg

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _linalg._openblas_threads():
            blas = [lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
            assert blas and all(lib["num_threads"] == 1 for lib in blas)
    finally:
        torch.set_num_threads(threads)
