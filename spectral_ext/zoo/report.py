"""The zoo report: every metric against test accuracy, across the zoo and
across the training epochs of one model, and accuracy predicted from the
weights alone, as in Unterthiner et al. 2020 ("Predicting Neural Network
Accuracy from Weights"): a gradient-boosted regressor (section 4; they use
GBMs as their strongest simple predictor) on per-layer weight statistics
(section 4.1: mean, variance and the 0, 25, 50, 75, 100 percentiles of every
weight tensor), compared with one on the spectral metrics and one on
alpha-hat alone (seed 001 section 5), cross-validated with whole models held
out (every checkpoint of a model in the same fold), scored by R^2 and
Kendall's tau (their section 5 metrics).

report(out, tables, metadata) writes out/report.md and its PNG figures;
the pieces (features, correlations, predict_accuracy) are usable alone."""
from __future__ import annotations

import math
import pathlib

import numpy as np
import pandas as pd
import torch

from .. import _checks
from ..plot import natural_key

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
LAYER_METRICS = ("numerical_rank", "stable_rank", "alpha", "spectral_norm")
ACCURACY_COLUMNS = ("test_accuracy", "accuracy")


def _stem(name) -> str:
    """A member name without folders and checkpoint suffix: zoo tables and
    metadata then match however either names its members."""
    name = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".safetensors", ".pth", ".pt", ".bin"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_metadata(metadata) -> tuple[pd.DataFrame, pathlib.Path | None]:
    """(table, its folder) from a CSV or Parquet path or a DataFrame; the
    table needs a `model` column and `test_accuracy` or `accuracy`."""
    folder = None
    if isinstance(metadata, pd.DataFrame):
        table = metadata.copy()
    else:
        path = pathlib.Path(metadata)
        if not path.is_file():
            raise ValueError(f"metadata: no such file {path}")
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype={"model": str})
        folder = path.parent
    accuracy = next((c for c in ACCURACY_COLUMNS if c in table), None)
    if "model" not in table or accuracy is None:
        raise ValueError("metadata must be a table with columns model and test_accuracy (or accuracy), got "
                         f"{list(table.columns)}")
    table["model"] = table["model"].astype(str)
    table["_key"] = table["model"].map(_stem)
    table["_accuracy"] = table[accuracy].astype(float)
    return table, folder


# ---------------------------------------------------------------------------------------------
# Features


def spectral_features(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per model (index: the member's stem): alpha_hat, the mean of
    each per-layer metric over layers (mean_<metric>) and each per-layer value
    (<metric>[<layer>]); with SVR edges, the mean significant count and
    internal dimensions too."""
    models, layers = tables.get("models", pd.DataFrame()), tables.get("layers", pd.DataFrame())
    frame = pd.DataFrame(index=pd.Index(sorted({_stem(m) for m in layers.get("model", [])}), name="model"))
    if "alpha_hat" in models:
        frame["alpha_hat"] = models.assign(model=models["model"].map(_stem)).set_index("model")["alpha_hat"]
    if len(layers):
        layers = layers.assign(model=layers["model"].map(_stem), layer=layers["layer"].astype(str))
        present = [c for c in LAYER_METRICS if c in layers]
        means = layers.groupby("model")[present].mean().add_prefix("mean_")
        frame = frame.join(means)
        wide = layers.pivot_table(index="model", columns="layer", values=present, aggfunc="first")
        wide = wide[sorted(wide.columns, key=lambda c: (c[0], natural_key(c[1])))]
        wide.columns = [f"{metric}[{layer}]" for metric, layer in wide.columns]
        frame = frame.join(wide)
    edges = tables.get("edges", pd.DataFrame())
    if len(edges):
        edges = edges.assign(model=edges["model"].map(_stem))
        frame = frame.join(edges.groupby("model")[["n_significant", "d_out", "d_in"]].mean().add_prefix("mean_"))
    return frame


def weight_statistics(state: dict) -> dict[str, float]:
    """Unterthiner et al. section 4.1's features of one checkpoint: for every
    floating weight tensor, its mean, variance and 0/25/50/75/100 percentiles."""

    row = {}
    for name, tensor in state.items():
        if not torch.is_floating_point(tensor):
            continue  # integer buffers (an activation code, BatchNorm's counter) are not weights
        values = tensor.detach().double().flatten()
        row[f"mean[{name}]"] = float(values.mean())
        row[f"var[{name}]"] = float(values.var(unbiased=False))
        for q, v in zip(QUANTILES, torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64))):
            row[f"q{int(q * 100)}[{name}]"] = float(v)
    return row


def weight_features(metadata: pd.DataFrame, folder, progress: bool = True) -> pd.DataFrame:
    """weight_statistics of every checkpoint named in the metadata's
    `checkpoint` column (paths relative to the metadata file), by model
    (Unterthiner et al. section 4.1). progress: a tqdm bar."""
    from tqdm.auto import tqdm

    from safetensors.torch import load_file

    rows = {}
    for key, relative in tqdm(list(zip(metadata["_key"], metadata["checkpoint"])), desc="weight statistics",
                              disable=not progress, leave=False):
        path = pathlib.Path(folder or ".") / str(relative)
        try:
            state = load_file(str(path)) if path.suffix == ".safetensors" else \
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable checkpoint is already an error row of the zoo tables
            continue
        rows[key] = weight_statistics(state)
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")


# ---------------------------------------------------------------------------------------------
# Correlations


def correlations(frame: pd.DataFrame, metrics, accuracy: str = "_accuracy") -> pd.DataFrame:
    """Spearman's rho and Kendall's tau (scipy.stats, with p-values) of each
    metric against accuracy over the rows where both are finite."""
    from scipy import stats

    rows = []
    for metric in metrics:
        part = frame[[metric, accuracy]].astype(float)
        part = part[np.isfinite(part).all(axis=1)]
        if len(part) < 3 or part[metric].nunique() < 2 or part[accuracy].nunique() < 2:
            rows.append({"metric": metric, "n": len(part), "spearman": math.nan, "spearman_p": math.nan,
                         "kendall": math.nan, "kendall_p": math.nan})
            continue
        rho = stats.spearmanr(part[metric], part[accuracy])
        tau = stats.kendalltau(part[metric], part[accuracy])
        rows.append({"metric": metric, "n": len(part), "spearman": float(rho.statistic), "spearman_p": float(rho.pvalue),
                     "kendall": float(tau.statistic), "kendall_p": float(tau.pvalue)})
    return pd.DataFrame(rows)


def rank_correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman's rho and Kendall's tau-b (scipy.stats' statistics, ties
    included) of two short series, without p-values: the per-model part of
    epoch_correlations, called once per model and metric, where scipy's and
    pandas' per-call overhead took minutes on a 1,000-model zoo."""
    from scipy import stats

    rho = np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1]
    sx, sy = np.sign(x[:, None] - x[None, :]), np.sign(y[:, None] - y[None, :])
    tau = (sx * sy).sum() / math.sqrt((sx * sx).sum() * (sy * sy).sum())
    return float(rho), float(tau)


def epoch_correlations(frame: pd.DataFrame, metrics, accuracy: str = "_accuracy") -> pd.DataFrame:
    """Per metric, the Spearman and Kendall correlations with accuracy across
    the checkpoints of each model (run) with 3 or more (over the checkpoints
    where both are finite; none where either is constant), summarised by
    their median over models and the number of models."""
    runs = list(frame.groupby("run").indices.values())
    target = frame[accuracy].to_numpy(dtype=float)
    rows = []
    for metric in metrics:
        values = frame[metric].to_numpy(dtype=float)
        per_run = []
        for index in runs:
            x, y = values[index], target[index]
            keep = np.isfinite(x) & np.isfinite(y)
            x, y = x[keep], y[keep]
            if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
                per_run.append(rank_correlations(x, y))
        rho, tau = (np.array([r[k] for r in per_run]) for k in (0, 1))
        rows.append({"metric": metric, "models": len(per_run),
                     "median_spearman": float(np.median(rho)) if per_run else math.nan,
                     "median_kendall": float(np.median(tau)) if per_run else math.nan})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Accuracy prediction


def predict_accuracy(features: pd.DataFrame, accuracy, groups, feature_sets: dict[str, list[str]],
                     n_splits: int = 5, generator=None) -> tuple[pd.DataFrame, dict, dict]:
    """Cross-validated accuracy prediction from each feature set (Unterthiner
    et al. 2020 sections 4-5 predict accuracy from weight statistics with
    gradient-boosted trees, LightGBM there; alpha-hat of seed 001 section 5
    as one feature set). generator: the trees' randomness (None: drawn from
    torch's global RNG, an int seed, a torch.Generator; `seed=` is its
    former name).

    scikit-learn's HistGradientBoostingRegressor per feature set (its
    LightGBM-style binned trees: 20x faster than GradientBoostingRegressor on
    a 1,000-model zoo, and a missing value - alpha where a layer had too few
    eigenvalues - goes down a branch of its own), GroupKFold over `groups`
    (a model's checkpoints stay in one fold: every score is on held-out
    models); plus the constant predictor (the training folds' mean) as the
    floor. Returns (scores: one row per feature set with R^2 and Kendall tau
    of the out-of-fold predictions, predictions {set: array}, importances
    {set: Series}: the permutation importance of each feature on the held-out
    folds, the mean drop in R^2 when it is shuffled)."""
    from sklearn.model_selection import GroupKFold
    from threadpoolctl import threadpool_limits

    y = np.asarray(accuracy, dtype=float)
    groups = np.asarray(groups)
    folds = min(n_splits, len(np.unique(groups)))
    if folds < 2:
        raise ValueError(f"predict_accuracy needs models of at least 2 groups, got {len(np.unique(groups))}")
    splits = list(GroupKFold(n_splits=folds).split(features, y, groups))
    seed = generator if isinstance(generator, int) and not isinstance(generator, bool) else \
        int(torch.randint(0, 2**31 - 1, (), generator=_checks.generator(generator)))  # scikit-learn takes an int

    # One OpenMP thread for scikit-learn: on a zoo's few hundred rows every tree's parallel region costs more
    # than it saves, and on a loaded machine its threads wait on each other (a 400-checkpoint report took
    # 7 min on 2 busy cores, 17 s with one thread).
    with threadpool_limits(limits=1, user_api="openmp"):
        return _predict_accuracy(features, y, groups, feature_sets, splits, folds, seed)


def _predict_accuracy(features, y, groups, feature_sets, splits, folds, seed):
    from scipy import stats
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.inspection import permutation_importance
    from sklearn.metrics import r2_score

    rows, predictions, importances = [], {}, {}
    for name, columns in {"constant (mean accuracy)": [], **feature_sets}.items():
        X = features[columns].to_numpy(dtype=float) if columns else None
        if X is not None:
            X = np.where(np.isfinite(X), X, np.nan)  # an infinity is as missing as a NaN
        predicted, drops = np.empty_like(y), []
        for train, test in splits:
            if X is None:
                predicted[test] = y[train].mean()
                continue
            model = HistGradientBoostingRegressor(max_iter=150, max_depth=3, learning_rate=0.05,
                                                  early_stopping=False, random_state=seed).fit(X[train], y[train])
            predicted[test] = model.predict(X[test])
            drops.append(permutation_importance(model, X[test], y[test], n_repeats=2,
                                                random_state=seed).importances_mean)
        tau = stats.kendalltau(y, predicted).statistic if np.ptp(predicted) > 0 else 0.0
        rows.append({"features": name, "n_features": len(columns), "r2": float(r2_score(y, predicted)),
                     "kendall_tau": float(tau), "n_checkpoints": len(y), "n_models": len(np.unique(groups)),
                     "folds": folds})
        predictions[name] = predicted
        if X is not None:
            importances[name] = pd.Series(np.mean(drops, axis=0), index=columns)
    return pd.DataFrame(rows), predictions, importances


# ---------------------------------------------------------------------------------------------
# The report


def _table(frame: pd.DataFrame) -> list[str]:
    return ["```", frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"), "```", ""]


def report(out, tables: dict[str, pd.DataFrame], metadata=None, progress: bool = True) -> pathlib.Path:
    """out/report.md with figures: members and errors, per-layer metric
    distributions, pair measures; with metadata (a table with model and
    test_accuracy or accuracy; run and epoch for the across-epochs part;
    checkpoint paths for the weight statistics), each metric against
    accuracy with Spearman and Kendall, and the accuracy prediction
    (Unterthiner et al.; alpha-hat of seed 001 section 5, a fixed generator 0:
    the report is reproducible). tables: a ZooTables or {name: DataFrame}.
    progress: a tqdm bar over the weight statistics. Returns report.md's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import plot

    out = pathlib.Path(out)
    if not hasattr(tables, "get"):
        raise TypeError(f"tables must be a ZooTables or a dict {{name: DataFrame}}, got {type(tables).__name__}")
    out.mkdir(parents=True, exist_ok=True)
    models, layers, pairs = (tables.get(k, pd.DataFrame()) for k in ("models", "layers", "pairs"))
    errors = models[models["error"].fillna("").astype(str) != ""] if "error" in models else models.iloc[0:0]
    lines = ["# Zoo report", "", f"- members: {len(models)}", f"- errors: {len(errors)}", ""]
    if len(errors):
        lines += ["| model | error |", "| --- | --- |"]
        lines += [f"| {r.model} | {' '.join(str(r.error).split()).replace('|', '/')} |" for r in errors.itertuples()]
        lines.append("")
    figures = []

    def save(fig, name, caption):
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        figures.append((name, caption))

    for column in ("numerical_rank", "stable_rank", "alpha"):
        if column in layers and layers[column].notna().any():
            save(plot.zoo_histograms(layers, column), column, f"{column} per layer across the zoo")
    if "alpha_hat" in models and models["alpha_hat"].notna().any():
        lines += ["## alpha-hat across the zoo", ""] + _table(models["alpha_hat"].describe().to_frame().T)
    if len(pairs):
        summary = pairs.groupby(["layer", "measure"])["value"].agg(["mean", "std", "count"]).reset_index()
        summary = summary.iloc[sorted(range(len(summary)), key=lambda i: natural_key(summary["layer"].iloc[i]))]
        lines += ["## pairwise measures", ""] + _table(summary)
    if metadata is not None:
        lines += _accuracy_sections(out, tables, metadata, save, progress)
    lines += ["## figures", ""]
    lines += [f"![{caption}]({name}.png)" for name, caption in figures]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _accuracy_sections(out, tables, metadata, save, progress) -> list[str]:
    from .. import plot

    meta, folder = load_metadata(metadata)
    spectral = spectral_features(tables)
    joined = meta.join(spectral, on="_key", how="inner")
    if not len(joined):
        return ["## metrics against accuracy", "", "No zoo member matches a metadata row (column model).", ""]
    lines = []
    if {"run", "epoch"} <= set(meta.columns):
        last = meta.loc[meta.groupby("run")["epoch"].idxmax()]
        quantiles = last["_accuracy"].quantile([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
        lines += ["## the zoo", "", f"{len(last)} models, {len(meta)} checkpoints (epochs "
                  f"{', '.join(str(e) for e in sorted(meta['epoch'].unique()))}). Test accuracy of the last checkpoints, "
                  "quantiles 0, 10, 25, 50, 75, 90, 100%: " + ", ".join(f"{v:.3f}" for v in quantiles), ""]
        by = [c for c in ("optimizer", "activation", "w_init") if c in last]
        for column in by:
            medians = last.groupby(column)["_accuracy"].median()
            lines.append(f"- median test accuracy by {column}: " +
                         ", ".join(f"{k} {v:.3f}" for k, v in medians.items()))
        lines.append("")
    lines += ["## metrics against test accuracy", ""]
    summary = [c for c in ("alpha_hat", "mean_numerical_rank", "mean_stable_rank", "mean_alpha", "mean_spectral_norm",
                           "mean_n_significant", "mean_d_out") if c in joined and joined[c].notna().any()]
    has_epochs = {"run", "epoch"} <= set(joined.columns)
    # Across the zoo: every model's last checkpoint (its trained state).
    final = joined.loc[joined.groupby("run")["epoch"].idxmax()] if has_epochs else joined
    across = correlations(final, summary)
    lines += [f"Across the zoo ({len(final)} models{', last checkpoint of each' if has_epochs else ''}): "
              "Spearman's rho and Kendall's tau with test accuracy (scipy.stats); NaN where the metric is "
              "constant across the models.", ""] + _table(across)
    for row in across.itertuples():
        fig = plot.metric_vs_accuracy(final[row.metric], final["_accuracy"], row.metric, spearman=row.spearman,
                                      kendall=row.kendall)
        save(fig, f"{row.metric}_vs_accuracy", f"{row.metric} against test accuracy across the zoo")
    if has_epochs and joined.groupby("run").size().max() >= 3:
        over_epochs = epoch_correlations(joined, summary)
        lines += ["Across the training epochs of each model (checkpoints of one model), the median over models:",
                  ""] + _table(over_epochs)
        # The models shown: spread over the final accuracy range.
        ranked = final.sort_values("_accuracy")["run"].tolist()
        shown = [ranked[int(round(i))] for i in np.linspace(0, len(ranked) - 1, min(6, len(ranked)))]
        for row in over_epochs.itertuples():
            if row.metric not in ("alpha_hat", "mean_stable_rank"):
                continue
            fig = plot.epoch_trajectories(joined.rename(columns={"_accuracy": "test accuracy"}), row.metric,
                                          "test accuracy", shown, median_spearman=row.median_spearman)
            save(fig, f"{row.metric}_over_epochs", f"{row.metric} against test accuracy during training")
    lines += _prediction_section(joined, spectral, folder, save, progress, has_epochs)
    return lines


def _prediction_section(joined, spectral, folder, save, progress, has_epochs) -> list[str]:
    from .. import plot

    rows = joined[joined["epoch"] > 0] if has_epochs else joined  # initialisations: chance accuracy, trivially told
    groups = rows["run"] if has_epochs else rows["_key"]
    if groups.nunique() < 10:
        return ["## accuracy prediction", "", f"Left out: {groups.nunique()} models (10 or more needed).", ""]
    spectral_columns = [c for c in spectral.columns if rows[c].notna().any()]
    feature_sets = {"alpha-hat alone": ["alpha_hat"]} if "alpha_hat" in rows and rows["alpha_hat"].notna().any() else {}
    feature_sets["spectral metrics"] = spectral_columns
    frame = rows
    note = ""
    if "checkpoint" in rows:
        weights = weight_features(rows, folder, progress)
        if len(weights):
            frame = rows.join(weights, on="_key")
            feature_sets["weight statistics (Unterthiner et al.)"] = list(weights.columns)
            feature_sets["weight statistics + spectral"] = list(weights.columns) + spectral_columns
    else:
        note = "The metadata has no checkpoint column: the weight-statistics predictor is left out."
    scores, predictions, importances = predict_accuracy(frame, frame["_accuracy"], groups, feature_sets, generator=0)
    lines = ["## accuracy prediction from the weights", "",
             f"Gradient-boosted trees (scikit-learn), {scores['folds'].iloc[0]}-fold cross-validation with whole "
             f"models held out; {len(frame)} checkpoints{' after epoch 0' if has_epochs else ''} of "
             f"{groups.nunique()} models. R^2 and Kendall's tau of the held-out predictions:", ""]
    lines += _table(scores.drop(columns=["folds"]))
    if note:
        lines += [note, ""]
    best = scores.iloc[1:].sort_values("r2").iloc[-1]["features"]
    fig = plot.prediction_scatter(frame["_accuracy"], predictions[best], best,
                                  float(scores.set_index("features").loc[best, "r2"]),
                                  float(scores.set_index("features").loc[best, "kendall_tau"]))
    save(fig, "prediction", f"held-out predictions from {best}")
    top = importances[best].sort_values(ascending=False).head(10)
    lines += [f"What carries the prediction ({best}, permutation importances on the held-out models: the drop in R^2 when the feature is shuffled):", ""]
    lines += _table(top.rename("importance").reset_index().rename(columns={"index": "feature"}))
    save(plot.feature_importances(importances[best], title=f"feature importances: {best}"), "feature_importances",
         f"feature importances ({best})")
    return lines
