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
