"""matplotlib figures for the method modules."""
from __future__ import annotations

import numpy as np


def _axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def _finish(fig, ax, xlabel, ylabel, xscale=None, yscale=None, legend=True):
    """The common last steps of a line figure: labels, scales, legend, layout."""
    if xscale:
        ax.set_xscale(xscale)
    if yscale:
        ax.set_yscale(yscale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int = 60) -> str:
    """Long titles (deep layer names) on several lines instead of clipped."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False))


def svr_graph(svr, ax=None, top: int | None = 64, max_edges: int = 20000, title: str | None = None):
    """Seed 000 Fig. 2/5: the SVR as a graph of spectral neurons.

    One column per linear map (forward order), spectral neurons by singular-value rank (rank 1 on top),
    significant edges drawn in grey scale by coefficient, neurons coloured by their intensity (colour bar).

    Args:
        svr: an SVR (spectral_ext.svr's result).
        ax: a matplotlib Axes to draw on (default None: a new figure).
        top: the spectral neurons shown per map, and among which edges are drawn (default 64; None: all).
        max_edges: the most edges drawn, the strongest kept when there are more (default 20000).
        title: names the figure (say "trained" or "at initialisation"); the default (None) says what is drawn.

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    from matplotlib.collections import LineCollection

    fig, ax = _axes(ax, (max(6, 1.0 * len(svr.layers) + 3), 6))
    x_of = {layer.name: i for i, layer in enumerate(svr.layers)}
    segments, weights = [], []
    for k, (a, b) in enumerate(svr.edges):
        A = svr.adjacency(k).double().cpu()
        mask = svr.significant(k, top).cpu()
        idx = np.argwhere(mask.numpy())
        vals = A.numpy()[mask.numpy()]
        if len(vals) > max_edges:  # keep the strongest when a figure would drown in lines
            keep = np.argsort(vals)[-max_edges:]
            idx, vals = idx[keep], vals[keep]
        for (n, m), v in zip(idx, vals):
            segments.append([(x_of[a], m + 1), (x_of[b], n + 1)])
            weights.append(v)
    if segments:
        w = np.asarray(weights)
        order = np.argsort(w)  # strongest drawn last, on top
        shade = 0.85 * w[order] / w.max() + 0.15
        lines = LineCollection([segments[i] for i in order], colors=[(1 - s, 1 - s, 1 - s) for s in shade],
                               linewidths=0.6, zorder=1)
        ax.add_collection(lines)
    points = None
    for layer in svr.layers:
        k = layer.rank if top is None else min(top, layer.rank)
        intensity = svr.neuron_intensity(layer.name).cpu().numpy()[:k]
        points = ax.scatter(np.full(k, x_of[layer.name]), np.arange(1, k + 1), c=intensity, cmap="Blues", vmin=0,
                            vmax=1, s=14, edgecolors="k", linewidths=0.3, zorder=2)
    if points is not None:
        fig.colorbar(points, ax=ax, fraction=0.04, pad=0.02, label="colour intensity (section 3.2, normalised)")
    ax.set_xticks(range(len(svr.layers)))
    names = [n if len(n) <= 28 else "..." + n[-25:] for n in svr.layers.names()]
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(svr.layers) - 0.5)
    ax.set_xlabel("linear map (forward order)")
    ax.set_ylabel("spectral neuron (singular-value rank)")
    ax.invert_yaxis()
    shown = "" if top is None else f", top {top} neurons per map"
    default = f"{svr.flattening.upper()} (p = {svr.p:g}{shown}): significant edges, neurons by colour intensity"
    ax.set_title(_wrap(title if title is not None else default, 70), fontsize=10)
    fig.tight_layout()
    return fig


def adjacency_heatmap(svr, e, ax=None, title: str | None = None):
    """Seed 000 Fig. 3/7: one adjacency matrix as a heatmap.

    Rows are the next map's spectral neurons, columns the previous map's, with the internal dimensions
    (d_out, d_in) marked by the block they bound, drawn inside the axes.

    Args:
        svr: an SVR (spectral_ext.svr's result).
        e: the edge, an index into svr.edges or an (a, b) pair of layer names.
        ax: a matplotlib Axes to draw on (default None: a new figure).
        title: the figure's title (default None: "adjacency a -> b").

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    from matplotlib.patches import Rectangle

    fig, ax = _axes(ax, (6.5, 5.5))
    A = svr.adjacency(e).double().cpu().numpy()
    a, b = svr.edges[svr._index(e)]
    image = ax.imshow(A, cmap="Greys", aspect="auto", interpolation="nearest")
    d_out, d_in = svr.internal_dimensions(e)
    # The block's edges sit half a cell inside the border, so a full-size d_out or d_in stays visible.
    ax.add_patch(Rectangle((-0.5, -0.5), d_in - 0.1, d_out - 0.1, fill=False, edgecolor="tab:red", lw=1.6,
                           zorder=3, label=f"internal dimensions: d_out = {d_out}, d_in = {d_in}"))
    ax.legend(loc="upper right", fontsize=7, framealpha=0.9)
    ax.set_xlabel(_wrap(f"spectral neurons of {a} (previous map, by singular-value rank)"))
    ax.set_ylabel(_wrap(f"spectral neurons of {b} (next map)", 45))
    default = f"adjacency {a} -> {b}"
    ax.set_title(_wrap(title if title is not None else default), fontsize=10)
    fig.colorbar(image, ax=ax, label="adjacency coefficient")
    fig.tight_layout()
    return fig


def partial_rank(frame, ax=None):
    """Seed 003 Fig. 1 (a-c): partial rank of the Jacobian per layer.

    One line per patch (appendix D), averaged over samples.

    Args:
        frame: jacobian_partial_rank's JacobianPartialRank or its frame.
        ax: a matplotlib Axes to draw on (default None: a new figure).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    frame = frame.to_frame() if hasattr(frame, "to_frame") else frame
    fig, ax = _axes(ax, (max(6, 0.45 * frame["layer"].nunique()), 4))
    for patch, part in frame.groupby("patch", sort=False):
        mean = part.groupby("layer", sort=False)["rank"].mean()
        ax.plot(range(len(mean)), mean.to_numpy(), marker="o", ms=3, label=f"patch {patch}")
        ax.set_xticks(range(len(mean)))
        ax.set_xticklabels(mean.index, rotation=60, ha="right", fontsize=7)
    return _finish(fig, ax, "layer (forward order, model output last)", "numerical rank of the partial Jacobian")


def classification_dimension(result, ax=None):
    """Seed 003 Fig. 2 (section 3.3): accuracy against the fraction of eigenvectors kept.

    The target and the classification dimension are marked.

    Args:
        result: a ClassificationDimension.
        ax: a matplotlib Axes to draw on (default None: a new figure).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    fig, ax = _axes(ax, (5, 4))
    ev = result.evaluations
    ax.plot(ev["fraction"], ev["accuracy"], marker="o", ms=3)
    ax.axhline(result.target, color="tab:red", lw=0.8, label=f"target {result.target:.3f}")
    ax.axvline(ev["fraction"].iloc[0] * result.dimension / ev["k"].iloc[0], color="tab:green", lw=0.8,
               label=f"ClsDim = {result.dimension}")
    return _finish(fig, ax, "fraction of eigenvectors kept (k / d)", "accuracy", xscale="log")


def rank_decay(frame, ax=None):
    """Seed 003 Fig. 1 (d-f): Jacobian rank and feature dimension of the Gaussian MLP against depth.

    On a log scale (Theorem 5's exponential law).

    Args:
        frame: rank.mlp_rank_decay's DataFrame.
        ax: a matplotlib Axes to draw on (default None: a new figure).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    fig, ax = _axes(ax, (5, 4))
    ax.plot(frame["layer"], frame["jacobian_rank"], label="rank of the Jacobian")
    ax.plot(frame["layer"], frame["feature_dimension"], label="feature dimension")
    return _finish(fig, ax, "layer", "numerical rank", yscale="log")


def similarity_heatmap(frame, ax=None, title: str | None = None, annotate: bool | None = None):
    """A heatmap of pair values.

    Similarities in [0, 1] are drawn on a fixed 0..1 scale, other values (distances) on their own range.

    Args:
        frame: a similarity_matrix result or its frame (seed 004 Fig. 2/5: model a's layers as rows, model b's
            as columns), a measure_matrix result or its square .matrix (K x K models), or a pairwise_similarity
            result (its pairs; cells not computed left blank).
        ax: a matplotlib Axes to draw on (default None: a new figure).
        title: the figure's title (default None: none).
        annotate: print the values in the cells (default None: up to 12 x 12).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    fig, ax = _axes(ax, (6, 5))
    if hasattr(frame, "layers_a"):  # a SimilarityMatrix
        frame = frame.to_frame()
    elif hasattr(frame, "pairs"):  # a PairwiseSimilarity: its pairs as a model x model table
        tidy = frame.to_frame()
        names = list(dict.fromkeys([*tidy["model_a"], *tidy["model_b"]]))
        frame = tidy.pivot(index="model_a", columns="model_b", values="value").reindex(index=names,
                                                                                       columns=names)
    elif hasattr(frame, "matrix"):  # a MeasureMatrix
        frame = frame.matrix
    if "layer_a" in getattr(frame, "columns", ()):
        table = frame.pivot(index="layer_a", columns="layer_b", values="value")
        table = table.loc[list(dict.fromkeys(frame["layer_a"])), list(dict.fromkeys(frame["layer_b"]))]
        xlabel, ylabel, origin = "model b", "model a", "lower"
    else:  # a K x K matrix: the diagonal from the top left, as it prints
        table, xlabel, ylabel, origin = frame, "", "", "upper"
    values = table.to_numpy(dtype=float)
    unit = values.min() >= 0 and values.max() <= 1
    image = ax.imshow(values, cmap="magma", vmin=0 if unit else None, vmax=1 if unit else None, origin=origin)
    ax.set_xticks(range(table.shape[1]))
    ax.set_xticklabels(table.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(table.shape[0]))
    ax.set_yticklabels(table.index, fontsize=7)
    if annotate or (annotate is None and max(values.shape) <= 12):
        for (i, j), v in np.ndenumerate(values):
            r, g, b, _ = image.cmap(image.norm(v))
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")  # legible on the cell
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def _penalties_by_layer(frame, by: str, labels: dict, ax, ylabel: str):
    """One line per value of `by`: the mean penalty per layer (first-seen
    order) with error bars of one standard deviation (none for one value)."""
    layers = list(dict.fromkeys(frame["layer"]))
    fig, ax = _axes(ax, (max(5, 0.6 * len(layers)), 4))
    for key, part in frame.groupby(by, sort=False):
        stats = part.groupby("layer", sort=False)["penalty"].agg(["mean", "std"]).reindex(layers)
        ax.errorbar(range(len(layers)), stats["mean"].to_numpy(), yerr=stats["std"].fillna(0).to_numpy(),
                    marker="o", ms=4, capsize=3, label=labels.get(key, key))
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
    ax.axhline(0, color="grey", lw=0.6)
    return _finish(fig, ax, "layer", ylabel)


def rotation_penalties(frame, ax=None):
    """Seed 004 Fig. 4 (section 3.3): the rotation penalty per layer.

    One line per transform (G_ReLU, orthogonal), the mean over trials with error bars of one standard deviation.

    Args:
        frame: symmetry.rotation_penalties' table.
        ax: a matplotlib Axes to draw on (default None: a new figure).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    return _penalties_by_layer(frame, "transform", {"grelu": "A in G_ReLU", "orthogonal": "A orthogonal"}, ax,
                               "rotation penalty (accuracy before - after)")


def stitching_penalties(frame, ax=None):
    """Seed 004 Fig. 1/6/7 (equation 4.3): the stitching penalty per layer.

    One line per kind of stitching layer, the mean over model pairs with error bars of one standard deviation;
    rows without a penalty are left out.

    Args:
        frame: StitchResult.to_frame() rows concatenated (columns layer, kind, penalty).
        ax: a matplotlib Axes to draw on (default None: a new figure).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    labels = {"affine": "full", "lowrank": "reduced rank", "grelu": "G_ReLU", "softsort": "G_ReLU (SoftSort)",
              "l1": "l1-regularised"}
    return _penalties_by_layer(frame.dropna(subset=["penalty"]), "kind", labels, ax, "stitching penalty")

def signal_heatmaps(maps, singular_values=None, nodes=None, ncols: int = 8):
    """Seed 001 Fig. 5: per-position signals of one image, one small heatmap per singular vector.

    Red is positive, blue negative, on one symmetric colour scale.

    Args:
        maps: the signals (r, H, W), a tensor or an array.
        singular_values: the singular values, shown in the titles (default None: not shown).
        nodes: the singular vectors to show, indices into maps (default None: all).
        ncols: the heatmaps per row (default 8).

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    maps = np.asarray(maps.detach().double().cpu() if hasattr(maps, "detach") else maps)
    nodes = list(range(maps.shape[0])) if nodes is None else list(nodes)
    rows = max(1, int(np.ceil(len(nodes) / ncols)))
    fig, axes = plt.subplots(rows, min(ncols, len(nodes)), figsize=(1.4 * min(ncols, len(nodes)), 1.5 * rows),
                             squeeze=False)
    limit = np.abs(maps[nodes]).max() or 1.0
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, nodes):
        ax.imshow(maps[i], cmap="RdBu_r", vmin=-limit, vmax=limit)
        title = f"v{i}" if singular_values is None else f"v{i} s={float(singular_values[i]):.2f}"
        ax.set_title(title, fontsize=6)
    fig.tight_layout()
    return fig


def hypergraph(h, ax=None):
    """Seed 001 Fig. 6/7: the hypergraph as an incidence matrix.

    Classes as rows, equivalence classes of singular vectors as columns (largest first).

    Args:
        h: a Hypergraph (spectral_ext.hypergraph's result).
        ax: a matplotlib Axes to draw on (default None: a new figure).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    fig, ax = _axes(ax, (max(4, 0.6 * len(h.nodes)), max(3, 0.35 * len(h.classes))))
    groups = h.equivalence_classes()
    keys = sorted(groups, key=lambda s: (-len(s), groups[s][0]))
    matrix = np.array([[c in key for key in keys] for c in h.classes], dtype=float)
    ax.imshow(matrix, cmap="Greys", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"v{groups[k][0]} ({len(groups[k])})" for k in keys], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(h.classes)))
    ax.set_yticklabels([str(c) for c in h.classes], fontsize=7)
    ax.set_title(f"{h.layer} hypergraph: q = {h.q}, p = {h.p}")
    fig.tight_layout()
    return fig


def semantic_hierarchy(graph, ax=None):
    """Seed 001 Fig. 6/7 right: the Hasse diagram of equivalence classes.

    More general classes (more classes) on top.

    Args:
        graph: the networkx DiGraph of semantic_hierarchy (node attributes classes and label).
        ax: a matplotlib Axes to draw on (default None: a new figure).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    import networkx as nx

    fig, ax = _axes(ax, (6, 5))
    levels: dict = {}
    for node, data in graph.nodes(data=True):
        levels.setdefault(len(data["classes"]), []).append(node)
    pos = {}
    for depth, (size, nodes) in enumerate(sorted(levels.items(), reverse=True)):
        for i, node in enumerate(nodes):
            pos[node] = (i - (len(nodes) - 1) / 2, -depth)
    labels = {n: f"{d['label']}\n{','.join(map(str, d['classes']))}" for n, d in graph.nodes(data=True)}
    nx.draw_networkx(graph, pos, ax=ax, labels=labels, node_color="#cde", node_size=900, font_size=6,
                     arrows=True)
    ax.axis("off")
    fig.tight_layout()
    return fig


def image_grid(images, titles=None, ncols: int = 8):
    """Exemplary images (seed 001 section 6) in a grid.

    Args:
        images: the images (N, C, H, W), a tensor or an array.
        titles: one title per image (default None: none).
        ncols: the images per row (default 8).

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    images = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images)
    n = len(images)
    rows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(rows, min(ncols, n), figsize=(1.3 * min(ncols, n), 1.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (ax, image) in enumerate(zip(axes.flat, images)):
        ax.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), cmap="gray")
        if titles is not None:
            ax.set_title(str(titles[k]), fontsize=6)
    fig.tight_layout()
    return fig


def esd(eigenvalues, ax=None, fit=None, label: str | None = None):
    """Seed 001 Fig. 3: histogram of an ESD on log-log axes with the fitted power-law tail.

    Only the positive eigenvalues are drawn; a ValueError is raised when none are, or when any is not finite.

    Args:
        eigenvalues: the eigenvalues of W W^T, a tensor (any shape).
        ax: a matplotlib Axes to draw on (default None: a new figure).
        fit: spectra.fit_power_law's PowerLawFit, or a mapping with its alpha, xmin and n_tail (default None:
            no tail drawn).
        label: the histogram's legend entry (default None: "ESD").

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    import dataclasses
    import math

    import torch

    from .spectra import _real_values

    eig = np.asarray(_real_values(eigenvalues).detach().double().cpu()).reshape(-1)
    eig = eig[eig > 0]
    if eig.size == 0 or not np.isfinite(eig).all():
        raise ValueError("eigenvalues must hold finite values, some of them positive")
    fig, ax = _axes(ax, (5, 4))
    bins = np.logspace(math.log10(eig.min()), math.log10(eig.max()), 40)
    ax.hist(eig, bins=bins, density=True, alpha=0.6, label=label or "ESD")
    fit = dataclasses.asdict(fit) if dataclasses.is_dataclass(fit) else fit
    if fit and np.isfinite(fit["alpha"]):
        xs = np.logspace(math.log10(fit["xmin"]), math.log10(eig.max()), 50)
        share = fit["n_tail"] / len(eig)
        ax.plot(xs, share * (fit["alpha"] - 1) / fit["xmin"] * (xs / fit["xmin"]) ** -fit["alpha"], "r-",
                label=f"alpha = {fit['alpha']:.2f}")
    return _finish(fig, ax, "eigenvalue of W W^T", "density", xscale="log", yscale="log")


def weight_spectra(frame, layer: str, ax=None):
    """Seed 002 spectra: trained and initial eigenvalues against rank on a log scale.

    With the Marchenko-Pastur upper edge, and the count of eigenvalues above it in the legend.

    Args:
        frame: covariance.weight_spectra's frame.
        layer: the layer to draw, a value of the frame's layer column.
        ax: a matplotlib Axes to draw on (default None: a new figure).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    fig, ax = _axes(ax, (5, 4))
    part = frame[frame["layer"] == layer]
    ax.plot(part["rank"], part["eigenvalue"], label="trained")
    if part["init_eigenvalue"].notna().any():
        ax.plot(part["rank"], part["init_eigenvalue"], "--", label="initialisation")
    ax.axhline(float(part["mp_upper_edge"].iloc[0]), color="tab:red", lw=0.8,
               label=f"Marchenko-Pastur edge ({int(part['n_learned'].iloc[0])} above)")
    ax.set_title(f"layer {layer}")
    return _finish(fig, ax, "rank", "weight covariance eigenvalue", yscale="log")


def stability(matrix, ax=None, top: int = 50):
    """The eigenvector-stability matrix |E1 A E2^T| (top-left block).

    Args:
        matrix: covariance.stability's result, a tensor (k1, k2) with values in [0, 1].
        ax: a matplotlib Axes to draw on (default None: a new figure).
        top: the leading ranks shown of each network (default 50).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    fig, ax = _axes(ax, (5, 4))
    image = ax.imshow(matrix[:top, :top].T.cpu().numpy(), cmap="cividis", vmin=0, vmax=1)
    ax.set_xlabel("rank (network 1)")
    ax.set_ylabel("rank (network 2)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def clipping(frame, ax=None, label: str | None = None):
    """Seed 002: accuracy after clipping to the top-k principal components, against k.

    Args:
        frame: covariance.clip's Clipping or its frame.
        ax: a matplotlib Axes to draw on (default None: a new figure).
        label: the line's legend entry (default None: "clipped").

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    frame = frame.to_frame() if hasattr(frame, "to_frame") else frame
    fig, ax = _axes(ax, (5, 4))
    ax.plot(frame["k"], frame["accuracy"], marker="o", ms=3, color="tab:red", label=label or "clipped")
    return _finish(fig, ax, "maximum rank k", "accuracy")


def rainbow(result, ax=None):
    """Seed 002 generate_network: the explained fraction r^2 of each aligned layer of a generated network.

    Its test accuracy against the reference's goes in the title when measured.

    Args:
        result: covariance.rainbow's Rainbow.
        ax: a matplotlib Axes to draw on (default None: a new figure).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    fig, ax = _axes(ax, (5, 4))
    frame = result.to_frame()
    ax.bar(range(len(frame)), frame["r2"], color="tab:purple")
    ax.set_xticks(range(len(frame)))
    ax.set_xticklabels(frame["layer"], fontsize=7)
    ax.set_ylim(0, 1)
    if result.generated_accuracy is not None:
        ax.set_title(f"generated {result.generated_accuracy:.3f} vs reference {result.reference_accuracy:.3f}")
    return _finish(fig, ax, "aligned layer", "alignment r^2", legend=False)


# ---------------------------------------------------------------------------------------------
# Model zoo report (zoo/report.py)


def natural_key(name) -> tuple:
    """Sort key reading runs of digits as numbers.

    Layers sort 0, 2, 5, 8, 10 (not 0, 10, 2, ...), and features[2] before features[10].

    Args:
        name: the name to sort (anything; its str is used).

    Returns:
        A tuple of (0, number, "") for runs of digits and (1, 0, text) for the rest, comparable across names.
    """
    import re

    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", str(name)) if part)


def zoo_histograms(layers, column: str, ax=None, bins: int = 20):
    """The distribution of one per-layer metric across a zoo, one histogram per layer.

    Layers in numeric order. Values spanning decades get log bins; otherwise, when a few far outliers would
    stretch it, the central 98% sets the range, and how many fall outside is in the title.

    Args:
        layers: the zoo's per-layer table (columns model, layer and the metric).
        column: the metric, a column of layers.
        ax: a matplotlib Axes to draw on (default None: a new figure).
        bins: the number of bins (default 20).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    fig, ax = _axes(ax, (6, 3.8))
    names = sorted(layers["layer"].astype(str).unique(), key=natural_key)
    values = layers[column].astype(float)
    finite = values[np.isfinite(values)]
    # Values spanning decades (alpha of degenerate fits on 16 eigenvalues reaches 1e7) get log bins;
    # otherwise the central 98% sets the range, and how many fall outside is in the title.
    log = len(finite) > 0 and finite.min() > 0 and finite.max() / finite.min() > 100
    if log:
        low, high = finite.min(), finite.max()
        edges = np.logspace(np.log10(low), np.log10(high), bins + 1)
    else:
        low, high = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
        q_low, q_high = np.quantile(finite, [0.01, 0.99]) if len(finite) else (low, high)
        if high - low > 5 * (q_high - q_low):  # a few far outliers
            low, high = q_low, q_high
        high = high if high > low else low + 1.0
        edges = np.linspace(low, high, bins + 1)
    outside = int(((finite < low) | (finite > high)).sum())
    for name in names:
        part = values[layers["layer"].astype(str) == name]
        part = part[np.isfinite(part)]
        ax.hist(part[(part >= low) & (part <= high)], bins=edges, alpha=0.5, label=f"layer {name}")
    note = f", {outside} outside the range shown" if outside else ""
    ax.set_title(f"{column} per layer across the zoo ({layers['model'].nunique()} checkpoints{note})", fontsize=9)
    if log:
        ax.set_xscale("log")
    ax.legend(fontsize=7, ncol=2, title="layer", title_fontsize=7)
    return _finish(fig, ax, column, "checkpoints", legend=False)


def metric_vs_accuracy(x, y, xlabel: str, ylabel: str = "test accuracy", spearman: float | None = None,
                       kendall: float | None = None, color=None, color_label: str | None = None, ax=None):
    """One metric against accuracy across a zoo, the rank correlations in the title.

    Args:
        x: the metric, one value per model.
        y: the accuracy, one value per model.
        xlabel: the metric's name, on the x axis and in the title.
        ylabel: the accuracy's name (default "test accuracy").
        spearman: the Spearman correlation for the title (default None: no correlations shown; not finite: the
            title says the metric is constant).
        kendall: the Kendall correlation for the title, shown with spearman.
        color: values that colour the points (e.g. the epoch), with a colour bar (default None: one colour).
        color_label: the colour bar's label.
        ax: a matplotlib Axes to draw on (default None: a new figure).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    fig, ax = _axes(ax, (5, 4))
    points = ax.scatter(x, y, s=9, c=color, cmap="viridis" if color is not None else None, alpha=0.8)
    if color is not None:
        fig.colorbar(points, ax=ax, label=color_label)
    stats = "" if spearman is None else f"\nSpearman {spearman:+.2f}, Kendall {kendall:+.2f} (n = {len(x)})"
    if spearman is not None and not np.isfinite(spearman):
        stats = f"\nno rank correlation: the metric is constant across these {len(x)} models"
    ax.set_title(f"{xlabel} vs {ylabel}{stats}", fontsize=9)
    return _finish(fig, ax, xlabel, ylabel, legend=False)


def epoch_trajectories(frame, metric: str, accuracy: str = "test_accuracy", runs=None, ax=None,
                       median_spearman: float | None = None):
    """A metric against accuracy across the checkpoints of a few models.

    Each model is a line in epoch order, its last checkpoint marked and labelled with the epoch.

    Args:
        frame: rows run, epoch, metric, accuracy.
        metric: the metric's column.
        accuracy: the accuracy's column (default "test_accuracy").
        runs: the models to draw, values of the run column (default None: the first six).
        ax: a matplotlib Axes to draw on (default None: a new figure).
        median_spearman: the median Spearman correlation over all models' epochs, for the title (default None:
            not shown).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    fig, ax = _axes(ax, (5.5, 4))
    runs = list(runs if runs is not None else frame["run"].unique()[:6])
    for run in runs:
        part = frame[frame["run"] == run].sort_values("epoch")
        line, = ax.plot(part[metric], part[accuracy], marker="o", ms=3, lw=1, label=str(run))
        ax.annotate(f"epoch {int(part['epoch'].iloc[-1])}", (part[metric].iloc[-1], part[accuracy].iloc[-1]),
                    fontsize=6, color=line.get_color(), xytext=(3, 3), textcoords="offset points")
    extra = "" if median_spearman is None else f"\nmedian Spearman over all models' epochs: {median_spearman:+.2f}"
    ax.set_title(f"{metric} vs {accuracy} during training{extra}", fontsize=9)
    ax.legend(fontsize=6, title="model", title_fontsize=7)
    return _finish(fig, ax, metric, accuracy, legend=False)


def prediction_scatter(actual, predicted, label: str, r2: float, tau: float, ax=None):
    """Held-out predicted accuracy against the true one, with the diagonal.

    Args:
        actual: the true test accuracies.
        predicted: the cross-validated predictions, one per actual.
        label: what the accuracy was predicted from, for the title.
        r2: the held-out R^2, for the title.
        tau: the held-out Kendall tau, for the title.
        ax: a matplotlib Axes to draw on (default None: a new figure).

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    fig, ax = _axes(ax, (4.5, 4))
    ax.scatter(actual, predicted, s=8, alpha=0.7)
    low, high = float(min(np.min(actual), np.min(predicted))), float(max(np.max(actual), np.max(predicted)))
    ax.plot([low, high], [low, high], "k--", lw=0.8, label="perfect prediction")
    ax.set_title(f"accuracy predicted from {label}\nheld-out models: R^2 {r2:.3f}, Kendall tau {tau:.3f}", fontsize=9)
    return _finish(fig, ax, "true test accuracy", "predicted test accuracy (cross-validated)")


def feature_importances(importances, ax=None, top: int = 15, title: str = "feature importances",
                        xlabel: str = "importance (held-out R^2 lost when shuffled)"):
    """Horizontal bars of the `top` largest importances.

    Args:
        importances: a pandas Series, importance by feature name.
        ax: a matplotlib Axes to draw on (default None: a new figure).
        top: the number of bars (default 15).
        title: the figure's title (default "feature importances").
        xlabel: the x axis label (default "importance (held-out R^2 lost when shuffled)").

    Returns:
        The matplotlib Figure (ax's figure when ax is given).
    """
    series = importances.sort_values(ascending=False).head(top)[::-1]
    fig, ax = _axes(ax, (6, 0.3 * len(series) + 1.2))
    ax.barh(range(len(series)), series.to_numpy(), color="tab:blue")
    ax.set_yticks(range(len(series)))
    ax.set_yticklabels([str(i) for i in series.index], fontsize=7)
    ax.set_title(title, fontsize=9)
    return _finish(fig, ax, xlabel, "feature", legend=False)
