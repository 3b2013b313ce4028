"""spectral_ext.compat.weightwatcher against the real WeightWatcher 0.7.7 on
small models, column by column: the same rows, spectra to 1e-8, fits to the
fit's own rounding, the same summary, describe and get_ESD."""
import contextlib
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from spectral_ext.compat import weightwatcher as se_ww

ww = pytest.importorskip("weightwatcher")


def models():
    torch.manual_seed(0)
    return {
        "cnn": nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, (3, 5)), nn.BatchNorm2d(32),
                             nn.Flatten(), nn.Linear(32 * 4, 64), nn.Linear(64, 10)),
        # kernel sizes 1 (too few eigenvalues), 2 (an even kernel with out < in: N < M there), 3, 1x4, 5
        "kernels": nn.Sequential(nn.Conv2d(8, 4, 1), nn.Conv2d(4, 12, 2), nn.Conv2d(12, 6, 3), nn.Conv2d(6, 5, (1, 4)),
                                 nn.Conv2d(5, 20, 5), nn.Conv2d(20, 10, 2)),
        "mlp": nn.Sequential(nn.Linear(30, 50), nn.ReLU(), nn.Linear(50, 25), nn.Linear(25, 3), nn.Embedding(40, 7)),
    }


def real(model, method="analyze", **kwargs):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watcher = ww.WeightWatcher(model=model)
        return watcher, getattr(watcher, method)(**kwargs)


def assert_same_frames(expected, got):
    assert list(got.columns) == list(expected.columns)
    assert len(got) == len(expected) and got["layer_id"].tolist() == expected["layer_id"].tolist()
    for column in expected.columns:
        a, b = expected[column].to_numpy(), got[column].to_numpy()
        if a.dtype.kind in "fiub" and b.dtype.kind in "fiub":
            np.testing.assert_allclose(b.astype(float), a.astype(float), rtol=1e-8, atol=1e-12, err_msg=column)
        else:
            assert [str(v) for v in b] == [str(v) for v in a], column


@pytest.mark.parametrize("name", ["cnn", "kernels", "mlp"])
@pytest.mark.parametrize("kwargs", [{}, {"min_evals": 30}, {"layers": [1, 2]}, {"layers": ["-2"]},
                                    {"conv2d_norm": False}])
def test_analyze_equals_weightwatcher_column_by_column(name, kwargs):
    model = models()[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    watcher, expected = real(model, **kwargs)
    mine = se_ww.WeightWatcher(model=model)
    assert_same_frames(expected, mine.analyze(**kwargs))
    summary = mine.get_summary()
    assert summary.keys() == watcher.get_summary().keys()
    assert list(summary.values()) == pytest.approx(list(watcher.get_summary().values()), rel=1e-8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mp_fit_and_randomize_equal_weightwatcher_with_one_seed():
    model = models()["kernels"]
    np.random.seed(3)
    _, expected = real(model, mp_fit=True, randomize=True)
    np.random.seed(3)
    got = se_ww.WeightWatcher(model=model).analyze(mp_fit=True, randomize=True)
    assert {"mp_softrank", "sigma_mp", "rand_distance", "num_traps"} <= set(got.columns)
    assert_same_frames(expected, got)


@pytest.mark.parametrize("name", ["cnn", "kernels", "mlp"])
def test_describe_and_get_esd_equal_weightwatcher(name):
    model = models()[name]
    watcher, expected = real(model, "describe")
    mine = se_ww.WeightWatcher(model=model)
    assert_same_frames(expected, mine.describe())
    for layer in expected["layer_id"].tolist() + [expected["name"].iloc[-1]]:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            esd = watcher.get_ESD(layer=layer)
        np.testing.assert_allclose(mine.get_ESD(layer=layer), esd, rtol=1e-8, atol=1e-12)


def test_unreproduced_options_and_bad_input_say_so():
    model = models()["mlp"]
    watcher = se_ww.WeightWatcher(model=model)
    with pytest.raises(ValueError, match="pool=False"):
        watcher.analyze(pool=False)
    with pytest.raises(ValueError, match="glorot_fix"):
        watcher.analyze(glorot_fix=True)
    with pytest.raises(TypeError, match="unexpected argument 'nope'"):
        watcher.analyze(nope=1)
    with pytest.raises(ValueError, match="min_evals"):
        watcher.analyze(min_evals=20, max_evals=10)
    with pytest.raises(ValueError, match="all >= 0"):
        watcher.analyze(layers=[1, -2])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        se_ww.WeightWatcher(model="resnet")
    with pytest.warns(UserWarning, match="Conv1d"):
        se_ww.WeightWatcher(model=nn.Sequential(nn.Conv1d(4, 8, 3), nn.Linear(8, 12))).analyze()


def test_plot_draws_one_esd_per_layer(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    model = models()["cnn"]
    watcher = se_ww.WeightWatcher(model=model)
    details = watcher.analyze(plot=True, savefig=str(tmp_path)).set_index("layer_id")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ww.layer{i}.esd.png" for i in details.index]
    for layer_id, fig in watcher.figures.items():
        ax = fig.axes[0]
        assert ax.get_xscale() == "log" and ax.get_xlabel() == "eigenvalue of W W^T"
        assert len(ax.containers[0]) == 39  # the histogram: 39 log-spaced bins over the ESD
        line = ax.get_lines()[0]
        assert line.get_label() == f"alpha = {details.loc[layer_id, 'alpha']:.2f}"
        assert line.get_xdata()[0] == pytest.approx(details.loc[layer_id, "xmin"])
