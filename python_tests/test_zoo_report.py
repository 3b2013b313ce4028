"""The zoo report: rank correlations equal to their definitions (and
scipy.stats), weight statistics as defined, a prediction that beats the
constant predictor on held-out models of a real small zoo, figures with
titles and layers in numeric order, and the report end to end from the
command line."""
import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from spectral_ext import plot
from spectral_ext.zoo import report as zoo_report
from spectral_ext.cli import main


@pytest.fixture(scope="module")
def trained_zoo(tmp_path_factory):
    """24 digits CNNs with checkpoints after 0, 1, 2 and 4 epochs, analysed
    from the command line with no argument but the folder."""
    out = tmp_path_factory.mktemp("zoo")
    assert main(["make-zoo", str(out), "--n", "24", "--epochs", "4", "--checkpoints", "0,1,2,4", "--group-size",
                 "12", "--quiet"]) == 0
    assert main(["zoo", str(out), "--quiet"]) == 0
    return out


def kendall_by_pairs(x, y):
    """Kendall's tau-a by counting concordant minus discordant pairs (no ties)."""
    pairs = list(itertools.combinations(range(len(x)), 2))
    return sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs) / len(pairs)


def test_correlations_match_their_definitions():
    from scipy import stats

    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    frame = pd.DataFrame({"m": x, "noise": rng.normal(size=40), "_accuracy": 0.5 * x + rng.normal(size=40) * 0.5})
    frame.loc[3, "m"] = np.nan  # dropped, not propagated
    table = zoo_report.correlations(frame, ["m", "noise"]).set_index("metric")
    part = frame.dropna()
    ranks = part.rank()
    assert table.loc["m", "n"] == 39
    assert table.loc["m", "spearman"] == pytest.approx(np.corrcoef(ranks["m"], ranks["_accuracy"])[0, 1])
    assert table.loc["m", "kendall"] == pytest.approx(kendall_by_pairs(part["m"].to_numpy(), part["_accuracy"].to_numpy()))
    assert table.loc["m", "spearman_p"] == pytest.approx(stats.spearmanr(part["m"], part["_accuracy"]).pvalue)
    assert table.loc["m", "spearman"] > 0.5 and abs(table.loc["noise", "spearman"]) < 0.4
    assert np.isnan(zoo_report.correlations(frame.assign(c=1.0), ["c"])["spearman"].iloc[0])  # constant: no value


def test_epoch_correlations_are_per_model_medians():
    rng = np.random.default_rng(1)
    rows = [{"run": f"r{r}", "epoch": e, "m": e * (1 if r % 2 else -1) + rng.normal() * 0.1,
             "_accuracy": e + rng.normal() * 0.1} for r in range(5) for e in range(5)]
    frame = pd.DataFrame(rows)
    table = zoo_report.epoch_correlations(frame, ["m"]).iloc[0]
    per_run = [zoo_report.correlations(part, ["m"]).iloc[0] for _, part in frame.groupby("run")]
    assert table["models"] == 5 and table["median_spearman"] == pytest.approx(np.median([r.spearman for r in per_run]))
    assert table["median_kendall"] == pytest.approx(np.median([r.kendall for r in per_run]))


def test_rank_correlations_are_scipys_with_ties():
    from scipy import stats

    rng = np.random.default_rng(2)
    for n in (3, 4, 7, 13):
        x, y = rng.integers(0, 3, n).astype(float), rng.normal(size=n).round(1)
        x[0], x[1] = 0.0, 2.0  # not constant
        rho, tau = zoo_report.rank_correlations(x, y)
        assert rho == pytest.approx(stats.spearmanr(x, y).statistic)
        assert tau == pytest.approx(stats.kendalltau(x, y).statistic)


def test_weight_statistics_are_the_papers():
    state = {"w": torch.arange(11.0).reshape(1, 11), "code": torch.tensor(1)}
    row = zoo_report.weight_statistics(state)
    assert set(row) == {f"{s}[w]" for s in ("mean", "var", "q0", "q25", "q50", "q75", "q100")}  # integers skipped
    assert row["mean[w]"] == 5.0 and row["var[w]"] == pytest.approx(np.var(np.arange(11.0)))
    assert (row["q0[w]"], row["q25[w]"], row["q50[w]"], row["q100[w]"]) == (0.0, 2.5, 5.0, 10.0)


def test_prediction_beats_the_constant_on_held_out_models(trained_zoo):
    meta = pd.read_parquet(trained_zoo / "metadata.parquet")
    meta["_key"], meta["_accuracy"] = meta["model"], meta["test_accuracy"]
    meta = meta[meta["epoch"] > 0].reset_index(drop=True)
    weights = zoo_report.weight_features(meta, trained_zoo).reset_index()
    frame = meta.merge(weights, left_on="_key", right_on="model", suffixes=("", "_w"))
    columns = [c for c in weights.columns if c != "model"]
    scores, predictions, importances = zoo_report.predict_accuracy(frame, frame["_accuracy"], frame["run"],
                                                                   {"weights": columns}, generator=0)
    scores = scores.set_index("features")
    constant, weights = scores.loc["constant (mean accuracy)"], scores.loc["weights"]
    assert constant["r2"] <= 0.0  # the training folds' mean never beats the held-out mean
    assert weights["r2"] > constant["r2"] + 0.2 and weights["kendall_tau"] > 0.3
    top = importances["weights"].sort_values().index[-1]
    assert importances["weights"][top] > 0.01  # shuffling the most important feature costs held-out R^2
    # Held out means held out: the out-of-fold prediction of a run does not change with its own labels.
    shuffled = frame["_accuracy"].to_numpy().copy()
    first_run = (frame["run"] == frame["run"].iloc[0]).to_numpy()
    shuffled[first_run] = 0.0
    _, again, _ = zoo_report.predict_accuracy(frame, shuffled, frame["run"], {"weights": columns}, generator=0)
    np.testing.assert_allclose(again["weights"][first_run], predictions["weights"][first_run])


def test_report_end_to_end(trained_zoo):
    analysis = trained_zoo / "analysis"
    report = (analysis / "report.md").read_text()
    for section in ("## metrics against test accuracy", "Across the training epochs",
                    "## accuracy prediction from the weights", "alpha-hat alone", "weight statistics (Unterthiner",
                    "What carries the prediction"):
        assert section in report, section
    for figure in ("alpha_hat_vs_accuracy", "mean_stable_rank_vs_accuracy", "alpha_hat_over_epochs", "prediction",
                   "feature_importances", "numerical_rank", "alpha"):
        assert (analysis / f"{figure}.png").exists(), figure
        assert f"({figure}.png)" in report
    # The correlation the report prints is scipy's on the last checkpoints of each model.
    from scipy import stats

    meta = pd.read_parquet(trained_zoo / "metadata.parquet")
    models = pd.read_csv(analysis / "models.csv", dtype={"model": str})
    models["model"] = models["model"].map(zoo_report._stem)
    last = meta[meta["epoch"] == 4].merge(models, on="model")
    rho = stats.spearmanr(last["alpha_hat"], last["test_accuracy"]).statistic
    line = next(l for l in report.splitlines() if l.strip().startswith("alpha_hat"))
    assert f"{rho:.4g}" in line


def test_zoo_figures_have_titles_and_numeric_layer_order():
    import matplotlib

    matplotlib.use("Agg")
    layers = pd.DataFrame({"model": [f"m{i}" for i in range(4) for _ in range(4)],
                           "layer": ["10", "2", "0", "5"] * 4, "alpha": np.linspace(2, 5, 16)})
    fig = plot.zoo_histograms(layers, "alpha")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["layer 0", "layer 2", "layer 5", "layer 10"]
    assert "alpha" in ax.get_title() and ax.get_xlabel() == "alpha" and ax.get_ylabel()
    assert sorted(["features.10", "features.2", "classifier.0"], key=plot.natural_key) == \
        ["classifier.0", "features.2", "features.10"]
    fig = plot.metric_vs_accuracy(np.arange(5.0), np.arange(5.0), "alpha_hat", spearman=1.0, kendall=1.0)
    assert "Spearman +1.00" in fig.axes[0].get_title() and fig.axes[0].get_ylabel() == "test accuracy"
    matplotlib.pyplot.close("all")


def test_metadata_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        zoo_report.load_metadata(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="test_accuracy"):
        zoo_report.load_metadata(pd.DataFrame({"model": ["a"], "score": [1.0]}))


def test_zoo_figures_draw_their_data():
    import matplotlib

    matplotlib.use("Agg")
    layers = pd.DataFrame({"model": [f"m{i}" for i in range(4) for _ in range(2)], "layer": ["0", "2"] * 4,
                           "alpha": [2.0, 3.0, 2.0, 3.5, 2.5, 3.0, 2.0, 4.0]})
    ax = plot.zoo_histograms(layers, "alpha", bins=4).axes[0]
    heights = [[p.get_height() for p in c.patches] for c in ax.containers]  # one histogram per layer
    assert heights == [list(np.histogram([2.0, 2.0, 2.5, 2.0], bins=np.linspace(2, 4, 5))[0]),
                       list(np.histogram([3.0, 3.5, 3.0, 4.0], bins=np.linspace(2, 4, 5))[0])]
    x, y = np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.7, 0.6])
    ax = plot.metric_vs_accuracy(x, y, "alpha_hat", spearman=0.5, kendall=0.33).axes[0]
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), np.c_[x, y])
    frame = pd.DataFrame({"run": [0, 0, 0, 1, 1, 1], "epoch": [2, 0, 1, 0, 1, 2],
                          "alpha_hat": [3.0, 1.0, 2.0, 5.0, 4.0, 6.0], "test_accuracy": [.9, .1, .5, .2, .4, .8]})
    ax = plot.epoch_trajectories(frame, "alpha_hat", runs=[0, 1]).axes[0]
    assert [list(line.get_xdata()) for line in ax.lines] == [[1.0, 2.0, 3.0], [5.0, 4.0, 6.0]]  # epoch order
    assert [list(line.get_ydata()) for line in ax.lines] == [[.1, .5, .9], [.2, .4, .8]]
    assert [t.get_text() for t in ax.texts] == ["epoch 2", "epoch 2"]
    ax = plot.prediction_scatter(np.array([.2, .8]), np.array([.3, .6]), "spectral metrics", 0.5, 1.0).axes[0]
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), [[.2, .3], [.8, .6]])
    assert list(ax.lines[0].get_xdata()) == [.2, .8] and "R^2 0.500" in ax.get_title()
    importances = pd.Series({"a": 0.1, "b": 0.6, "c": 0.3})
    ax = plot.feature_importances(importances, top=2).axes[0]
    assert [p.get_width() for p in ax.patches] == [0.3, 0.6]  # the top 2, largest at the top
    assert [t.get_text() for t in ax.get_yticklabels()] == ["c", "b"]
    matplotlib.pyplot.close("all")


def test_predict_accuracy_takes_a_generator_and_refuses_seed():
    rng = np.random.default_rng(0)
    features = pd.DataFrame({"f": rng.normal(size=40)})
    y = features["f"].to_numpy() * 0.1 + rng.normal(size=40) * 0.01
    groups = np.repeat(np.arange(10), 4)
    first = zoo_report.predict_accuracy(features, y, groups, {"f": ["f"]}, generator=3)[0]
    pd.testing.assert_frame_equal(first, zoo_report.predict_accuracy(features, y, groups, {"f": ["f"]}, generator=3)[0])
    with pytest.raises(TypeError, match="unexpected keyword argument 'seed'"):  # its name before issue 17
        zoo_report.predict_accuracy(features, y, groups, {"f": ["f"]}, seed=3)
    with pytest.raises(TypeError, match="generator must be"):
        zoo_report.predict_accuracy(features, y, groups, {"f": ["f"]}, generator="x")


def test_prediction_takes_missing_features():
    """A metric that could not be computed for some checkpoints (alpha of a layer with too few eigenvalues)
    is NaN in the tables: the prediction still runs and uses the rest (the 1,000-model zoo had such rows)."""
    rng = np.random.default_rng(0)
    signal = rng.normal(size=200)
    features = pd.DataFrame({"signal": signal, "noise": rng.normal(size=200)})
    features.loc[::7, "signal"] = np.nan
    features.loc[::11, "noise"] = np.inf
    y = signal.copy()
    y[::7] = 5.0  # missing signal marks its own group of targets, as a tree branch would
    scores, _, importances = zoo_report.predict_accuracy(features, y, np.arange(200) // 4,
                                                         {"both": ["signal", "noise"]}, generator=0)
    assert scores.set_index("features").loc["both", "r2"] > 0.8
    assert importances["both"]["signal"] > importances["both"]["noise"]
