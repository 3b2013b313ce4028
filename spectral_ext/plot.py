"""matplotlib figures for the method modules."""
from __future__ import annotations

import numpy as np


def _axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def svr_graph(svr, ax=None, top: int | None = 64, max_edges: int = 20000):
    """Seed 000 Fig. 2/5: one column per linear map (forward order), spectral
    neurons by singular-value rank (rank 1 on top), significant edges drawn in
    grey scale by coefficient, neurons coloured by their intensity."""
    from matplotlib.collections import LineCollection

    fig, ax = _axes(ax, (max(6, 1.2 * len(svr.layers)), 6))
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
        shade = w[order] / w.max()
        lines = LineCollection([segments[i] for i in order], colors=[(1 - s, 1 - s, 1 - s) for s in shade],
                               linewidths=0.6, zorder=1)
        ax.add_collection(lines)
    for layer in svr.layers:
        k = layer.rank if top is None else min(top, layer.rank)
        intensity = svr.neuron_intensity(layer.name).cpu().numpy()[:k]
        ax.scatter(np.full(k, x_of[layer.name]), np.arange(1, k + 1), c=intensity, cmap="Blues", vmin=0, vmax=1,
                   s=14, edgecolors="k", linewidths=0.3, zorder=2)
    ax.set_xticks(range(len(svr.layers)))
    ax.set_xticklabels(svr.layers.names(), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("spectral neuron (singular-value rank)")
    ax.invert_yaxis()
    ax.set_title(f"{svr.flattening.upper()} (p = {svr.p}): significant edges, neurons by colour intensity")
    fig.tight_layout()
    return fig


def adjacency_heatmap(svr, e, ax=None):
    """Seed 000 Fig. 3/7: one adjacency matrix, rows the next map's spectral
    neurons, columns the previous map's, with the internal dimensions marked."""
    fig, ax = _axes(ax, (6, 5))
    A = svr.adjacency(e).double().cpu().numpy()
    a, b = svr.edges[svr._index(e)]
    image = ax.imshow(A, cmap="Greys", aspect="auto", interpolation="nearest")
    d_out, d_in = svr.internal_dimensions(e)
    ax.axhline(d_out - 0.5, color="tab:red", lw=0.8)
    ax.axvline(d_in - 0.5, color="tab:red", lw=0.8)
    ax.set_xlabel(f"{a} spectral neurons")
    ax.set_ylabel(f"{b} spectral neurons")
    ax.set_title(f"adjacency {a} -> {b} (internal dimensions d_out={d_out}, d_in={d_in})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def partial_rank(frame, ax=None):
    """Seed 003 Fig. 1 (a-c): partial rank of the Jacobian per layer, one line
    per patch (appendix D), averaged over samples."""
    fig, ax = _axes(ax, (max(6, 0.45 * frame["layer"].nunique()), 4))
    for patch, part in frame.groupby("patch", sort=False):
        mean = part.groupby("layer", sort=False)["rank"].mean()
        ax.plot(range(len(mean)), mean.to_numpy(), marker="o", ms=3, label=f"patch {patch}")
        ax.set_xticks(range(len(mean)))
        ax.set_xticklabels(mean.index, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("numerical rank of the partial Jacobian")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def classification_dimension(result, ax=None):
    """Seed 003 Fig. 2: accuracy against the fraction of eigenvectors kept,
    with the target and the classification dimension marked."""
    fig, ax = _axes(ax, (5, 4))
    ev = result.evaluations
    ax.plot(ev["fraction"], ev["accuracy"], marker="o", ms=3)
    ax.axhline(result.target, color="tab:red", lw=0.8, label=f"target {result.target:.3f}")
    ax.axvline(ev["fraction"].iloc[0] * result.dimension / ev["k"].iloc[0], color="tab:green", lw=0.8,
               label=f"ClsDim = {result.dimension}")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of eigenvectors kept (k / d)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def rank_decay(frame, ax=None):
    """Seed 003 Fig. 1 (d-f): Jacobian rank and feature dimension of the
    Gaussian MLP against depth, on a log scale (Theorem 5's exponential law)."""
    fig, ax = _axes(ax, (5, 4))
    ax.plot(frame["layer"], frame["jacobian_rank"], label="rank of the Jacobian")
    ax.plot(frame["layer"], frame["feature_dimension"], label="feature dimension")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("numerical rank")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def similarity_heatmap(frame, ax=None, title: str | None = None):
    """Seed 004 Fig. 2/5: similarity of every layer pair as a heatmap, model
    a's layers as rows, model b's as columns."""
    fig, ax = _axes(ax, (6, 5))
    table = frame.pivot(index="layer_a", columns="layer_b", values="value")
    table = table.loc[list(dict.fromkeys(frame["layer_a"])), list(dict.fromkeys(frame["layer_b"]))]
    image = ax.imshow(table.to_numpy(), cmap="magma", vmin=0, vmax=1, origin="lower")
    ax.set_xticks(range(table.shape[1]))
    ax.set_xticklabels(table.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(table.shape[0]))
    ax.set_yticklabels(table.index, fontsize=7)
    ax.set_xlabel("model b")
    ax.set_ylabel("model a")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
