"""The Singular Value Representation (seed 000): spectral neurons of every
linear map, their adjacency across layers, significance thresholds, internal
dimensions, colour intensities, co-SVR, kernel connections, spectral
activations, the Sobel edge measure and SVD compression.

``spectral_ext.svr`` is the function `svr` below; this module is
``spectral_ext.spectral_neurons`` (a module and a function never share a
name)."""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from . import _checks, _ops
from ._hooks import capturing, check_model, evaluating, models_in_eval_mode
from ._linalg import batched_signed_svd, compute_dtype
from .layers import Connection, ModelGraph, SpectralLayer, discover


class LayerList:
    """Spectral layers (seed 000 section 2.2) in forward order, indexable by position or by the
    module's qualified name."""

    def __init__(self, layers: list[SpectralLayer]):
        self._layers = list(layers)
        self._index = {layer.name: i for i, layer in enumerate(self._layers)}

    def __getitem__(self, key) -> SpectralLayer:
        if isinstance(key, str):
            if key not in self._index:
                raise KeyError(f"no linear map named {key!r}; the maps are {list(self._index)}")
            return self._layers[self._index[key]]
        return self._layers[key]

    def __iter__(self) -> Iterator[SpectralLayer]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __contains__(self, name) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        return list(self._index)

    def __repr__(self) -> str:
        return "LayerList(" + ", ".join(f"{l.name}: {l.kind} rank {l.rank}" for l in self._layers) + ")"


# ---------------------------------------------------------------- seed 000 appendix A

def squared_overlap_moments(n: int) -> dict:
    """Moments of <X, Y>^2 for X, Y uniform on the unit sphere of R^n (seed 000 section 2.4 and Proposition A.1).

    Mean 1/n, fourth moment of <X, Y> 3 / (n^2 + 2n), hence Var(<X, Y>^2) = 3 / (n^2 + 2n) - 1 / n^2, against 2 / n^2
    for the 1/n chi2(1) model.

    Args:
        n: the dimension, at least 1.

    Returns:
        A dict with keys "mean" (1/n), "fourth_moment", "variance" and "chi2_model_variance" (2 / n^2), floats.
    """
    if n < 1:
        raise ValueError(f"n must be a positive dimension, got {n}")
    fourth = 3.0 / (n * n + 2.0 * n)
    return {"mean": 1.0 / n, "fourth_moment": fourth, "variance": fourth - 1.0 / n**2,
            "chi2_model_variance": 2.0 / n**2}


def r_squared_std(c: int, kernel_area: int) -> float:
    """std(r_1^2) = (1/K^2) sqrt((2K^2 - 2) / (c K^2 + 2)) of Proposition A.2 (seed 000).

    The spread of the share of norm one kernel position takes.

    Args:
        c: the number of channels c, positive.
        kernel_area: K^2, the number of kernel positions, positive.

    Returns:
        The standard deviation, a float.
    """
    if c < 1 or kernel_area < 1:
        raise ValueError(f"c and kernel_area must be positive, got {c} and {kernel_area}")
    k2 = float(kernel_area)
    return math.sqrt((2 * k2 - 2) / (c * k2 + 2)) / k2


def adjacency_threshold(p: float, kernel_area: int, n: float) -> float:
    """The coefficient a random network exceeds with probability p: the upper p-quantile of chi2(K^2) / (n K^2).

    Seed 000 sections 2.4 and 4.3; K^2 = 1 for fully connected layers, where it is chi2(1) / n.

    Args:
        p: the significance level, in (0, 1).
        kernel_area: K^2, the number of kernel positions (1 for fully connected layers).
        n: the dimension n, so that 1/n is a random coefficient's mean.

    Returns:
        The threshold, a float.
    """
    p = _checks.number("p", p, low=0, high=1, low_open=True, high_open=True)
    return float(stats.chi2.isf(p, kernel_area) / (n * kernel_area))


def internal_dimensions(A: torch.Tensor, n: float) -> tuple[int, int]:
    """Internal dimensions (d_out, d_in) of an adjacency matrix A, as 1-based counts (seed 000 section 3.2).

    The argmax over (i, j) of B_ij - ij/n, B_ij = sum_{k<=i, l<=j} A_kl.

    Args:
        A: the adjacency matrix (rows: the next map's spectral neurons, columns: the previous map's).
        n: makes 1/n a random coefficient's mean.

    Returns:
        (d_out, d_in), a pair of ints.
    """
    A = A.double()
    B = A.cumsum(0).cumsum(1)
    i = torch.arange(1, A.shape[0] + 1, dtype=A.dtype, device=A.device)
    j = torch.arange(1, A.shape[1] + 1, dtype=A.dtype, device=A.device)
    flat = int(torch.argmax(B - torch.outer(i, j) / n))
    return flat // A.shape[1] + 1, flat % A.shape[1] + 1


# ---------------------------------------------------------------- the SVR

class SVR:
    """The SVR of a model (seed 000 sections 2-4). Build it with `spectral_ext.svr(model, ...)`.

    `.layers`: spectral neurons per linear map (LayerList of SpectralLayer);
    `.edges`: (previous_name, next_name) pairs in topological order; per edge
    `e` (an index into `.edges` or a name pair): `.adjacency(e)` (rows: next
    map's spectral neurons, columns: previous map's), `.threshold(e)`,
    `.significant(e)`, `.internal_dimensions(e)`, `.color_intensity(e)`."""

    def __init__(self, model: nn.Module, graph: ModelGraph, layers: LayerList,
                 adjacencies: list[torch.Tensor], p: float, fold_batchnorm: bool, flattening: str,
                 top: int | None = None):
        self.model = model
        self.graph = graph
        self.layers = layers
        self.connections: list[Connection] = list(graph.connections)
        self.edges = [(c.previous, c.next) for c in self.connections]
        self._adjacency = adjacencies
        self.p = p
        self.fold_batchnorm = fold_batchnorm
        self.flattening = flattening
        self.top = top  # each map keeps its `top` leading spectral neurons (None: all)

    def __repr__(self) -> str:
        top = "" if self.top is None else f", top={self.top}"
        return (f"SVR({self.flattening}, {len(self.layers)} maps, {len(self.edges)} edges, p={self.p}, "
                f"fold_batchnorm={self.fold_batchnorm}{top})")

    def _index(self, e) -> int:
        if isinstance(e, (int, np.integer)):
            if not -len(self.edges) <= e < len(self.edges):
                raise IndexError(f"edge index {e} out of range for {len(self.edges)} edges")
            return int(e) % len(self.edges)
        if isinstance(e, tuple) and len(e) == 2 and e in self.edges:
            return self.edges.index(e)
        raise KeyError(f"no edge {e!r}; edges are indices 0..{len(self.edges) - 1} or pairs such as "
                       f"{self.edges[0] if self.edges else ('a', 'b')}")

    def adjacency(self, e) -> torch.Tensor:
        """Coefficients in [0, 1]: FC |V_{i+1}^T U_i|^2 (section 2.2), conv
        sum_z (sum_k u_km v_kzn)^2 (section 4.2)."""
        return self._adjacency[self._index(e)]

    def connection(self, e) -> Connection:
        return self.connections[self._index(e)]

    def null_dimension(self, e) -> float:
        """n such that a random network's coefficients average 1/n."""
        return self.connections[self._index(e)].null_dimension

    def threshold(self, e) -> float:
        """The coefficient a random network exceeds with probability p: chi2(z)
        / (n z) with z = K^2 of the next map (SVR) or of the previous one
        (co-SVR), times the positions per channel across conv -> flatten ->
        Linear in the co-SVR (section 4.3)."""
        c = self.connection(e)
        if self.flattening == "svr":
            k2 = c.kernel_area
        else:
            # a Linear reading a channel at several inputs (positions after a flatten, heads sharing a value
            # head in grouped-query attention) sums them: its K2 counts too
            k2 = self.graph.maps[c.previous].kernel_area * (c.kernel_area if self.graph.maps[c.next].kind == "linear"
                                                            else 1)
        return adjacency_threshold(self.p, k2, c.null_dimension)

    def significant(self, e, top: int | None = None) -> torch.Tensor:
        """Coefficients above the threshold; with `top`, only among the top
        spectral neurons of both maps (the rest of the mask is False)."""
        mask = self.adjacency(e) > self.threshold(e)
        if top is not None:
            mask[top:, :] = False
            mask[:, top:] = False
        return mask

    def internal_dimensions(self, e) -> tuple[int, int]:
        """(d_out, d_in), 1-based counts: the (row, column) argmax of
        B_ij - ij/n with B the 2-D cumulative sum of the adjacency (section 3.2)."""
        return internal_dimensions(self.adjacency(e), self.null_dimension(e))

    def color_intensity(self, e, normalize: bool = False) -> torch.Tensor:
        """Per spectral neuron j of the edge's previous map: max_i (sum_{k<=i}
        A_kj - i/n) (section 3.2); normalised by its maximum when asked
        (footnote 9), clipped at 0."""
        A = self.adjacency(e).double()
        i = torch.arange(1, A.shape[0] + 1, dtype=A.dtype, device=A.device).unsqueeze(1)
        intensity = (A.cumsum(0) - i / self.null_dimension(e)).amax(0)
        if normalize:
            intensity = intensity.clamp(min=0)
            top = intensity.max()
            intensity = intensity / top if top > 0 else intensity
        return intensity

    def neuron_intensity(self, name: str) -> torch.Tensor:
        """Normalised colour intensity of a map's spectral neurons, from its
        outgoing edges (the maximum over branches; zeros for the last map)."""
        out = [self.color_intensity(k, normalize=True) for k, (a, _) in enumerate(self.edges) if a == name]
        if not out:
            return torch.zeros(self.layers[name].rank, dtype=torch.float64)
        return torch.stack(out).amax(0)

    def adjacency_filters(self, e) -> torch.Tensor:
        """The effective filters A_{n,m} = sum_k u_{k,m} V_{k,n} of seed 000
        section 4.2, one per (next spectral neuron n, previous m): a tensor
        (N, *kernel, M) for conv -> conv (K x K filters for a Conv2d), (N, P, M)
        across conv -> flatten -> Linear (P positions per channel, in the
        Linear's input order) and (N, 1, M) for fully connected edges, so that
        adjacency(e) = (filters ** 2) summed over the middle axes. Signs follow
        the project's singular-vector convention. SVR only."""
        if self.flattening != "svr":
            raise ValueError("adjacency_filters are defined for the SVR (section 4.2), not the co-SVR")
        k = self._index(e)
        c = self.connections[k]
        U = self.layers[c.previous].U[c.channels]  # (shared, M)
        V = self.layers[c.next].V[c.rows]  # (shared, K2, N)
        filters = torch.einsum("km,kzn->nzm", U, V)
        kernel = self.graph.maps[c.next].kernel_size
        if c.kind == "conv" and kernel:
            filters = filters.reshape(filters.shape[0], *kernel, filters.shape[-1])
        return filters

    def entropy(self, normalize: bool = False) -> pd.Series:
        """Per edge, the entropy -sum_{n,m} a_nm log a_nm of its adjacency
        coefficients (the SVR authors' measure, code of seed 000; 0 log 0 = 0).
        normalize=True divides the coefficients by their sum first, the Shannon
        entropy of the adjacency as a distribution. A Series indexed by edge."""
        values = []
        for k in range(len(self.edges)):
            A = self.adjacency(k).double()
            if normalize:
                total = A.sum()
                A = A / total if total > 0 else A
            values.append(float(-torch.special.xlogy(A, A).sum()))
        return pd.Series(values, index=pd.MultiIndex.from_tuples(self.edges, names=["previous", "next"]),
                         name="entropy", dtype=float)

    def path_metric(self, sing_scale: bool = True, sing_threshold: float = 0.0) -> float:
        """The weighted sum over all input-to-output paths of spectral neurons
        (the SVR authors' path metric, code of seed 000): x = 1 on the first
        maps' neurons, then along the edges in topological order x_next +=
        A (x_prev * s_prev), and the sum of x * s over the last maps. Neurons
        with s <= sing_threshold are cut; sing_scale=False counts adjacencies
        only (s = 1). Branches add, so a chain gives the authors' number."""
        def scale(layer):
            s = layer.S.double().cpu()
            return (s if sing_scale else torch.ones_like(s)) * (s > sing_threshold)

        scales = {layer.name: scale(layer) for layer in self.layers}
        has_in = {b for _, b in self.edges}
        has_out = {a for a, _ in self.edges}
        x = {name: torch.ones_like(v) for name, v in scales.items() if name not in has_in}
        for k, (a, b) in enumerate(self.edges):
            term = self.adjacency(k).double().cpu() @ (x[a] * scales[a])
            x[b] = x[b] + term if b in x else term
        return float(sum((x[n] * scales[n]).sum() for n in scales if n not in has_out and n in x))

    # ------------------------------------------------------------ outputs

    def to_frame(self, kind: str = "edges") -> pd.DataFrame:
        """Tidy tables (seed 000 sections 3.2 and 4.3). kind="edges": one row
        per connected pair (null_dimension n, threshold, n_significant and
        significant_fraction of the coefficients, internal dimensions);
        "neurons": one row per spectral neuron (singular value, intensity);
        "coefficients": one row per adjacency coefficient."""
        if kind == "edges":
            rows = []
            for k, (a, b) in enumerate(self.edges):
                c, A = self.connections[k], self.adjacency(k)
                sig = self.significant(k)
                d_out, d_in = self.internal_dimensions(k)
                rows.append({"previous": a, "next": b, "kind": c.kind, "kernel_area": c.kernel_area,
                             "null_dimension": c.null_dimension, "n_next_neurons": A.shape[0],
                             "n_previous_neurons": A.shape[1], "threshold": self.threshold(k),
                             "n_significant": int(sig.sum()),
                             "significant_fraction": float(sig.double().mean()), "d_out": d_out, "d_in": d_in,
                             "max_coefficient": float(A.max())})
            return pd.DataFrame(rows)
        if kind == "neurons":
            frames = []
            for order, layer in enumerate(self.layers):
                frames.append(pd.DataFrame({
                    "layer": layer.name, "layer_order": order, "kind": layer.kind,
                    "index": np.arange(layer.rank), "singular_value": layer.S.double().cpu().numpy(),
                    "color_intensity": self.neuron_intensity(layer.name).cpu().numpy()}))
            return pd.concat(frames, ignore_index=True)
        if kind == "coefficients":
            frames = []
            for k, (a, b) in enumerate(self.edges):
                frame = _matrix_frame(self.adjacency(k), "coefficient", previous=a, next=b)
                frames.append(frame.assign(significant=frame["coefficient"] > self.threshold(k)))
            return pd.concat(frames, ignore_index=True)
        raise ValueError(f"kind must be 'edges', 'neurons' or 'coefficients', got {kind!r}")

    def to_networkx(self, top: int | None = None):
        """DiGraph: nodes (layer, index) with singular_value and
        color_intensity; edges previous -> next for significant coefficients,
        with weight. `top` keeps the top spectral neurons of each map."""
        import networkx as nx

        G = nx.DiGraph(p=self.p, flattening=self.flattening)
        for order, layer in enumerate(self.layers):
            k = layer.rank if top is None else min(top, layer.rank)
            intensity = self.neuron_intensity(layer.name)
            for i in range(k):
                G.add_node((layer.name, i), layer=layer.name, layer_order=order, index=i,
                           singular_value=float(layer.S[i]), color_intensity=float(intensity[i]))
        for k_edge, (a, b) in enumerate(self.edges):
            A = self.adjacency(k_edge).double().cpu()
            mask = self.significant(k_edge, top).cpu()
            for n_, m_ in torch.nonzero(mask).tolist():
                G.add_edge((a, m_), (b, n_), weight=float(A[n_, m_]))
        return G

    def plot(self, ax=None, top: int | None = 64, max_edges: int = 20000, title: str | None = None):
        """The figure of seed 000 Fig. 2/5: maps on x, singular-value rank on
        y, significant edges in grey scale, neurons coloured by intensity."""
        from .plot import svr_graph

        return svr_graph(self, ax=ax, top=top, max_edges=max_edges, title=title)

    def plot_adjacency(self, e, ax=None, title: str | None = None):
        """Heat map of one adjacency matrix (seed 000 Fig. 3/7)."""
        from .plot import adjacency_heatmap

        return adjacency_heatmap(self, e, ax=ax, title=title)

    # ------------------------------------------------------------ compression

    def compression_frame(self, ranks="internal") -> pd.DataFrame:
        """The ranks `compress(ranks)` keeps, one row per map it truncates:
        layer, rank, full_rank, parameters (dense weight) and
        factored_parameters (k (out + in K^2), the two factors U_k S_k and V_k^T).
        `ranks`: a dict {name: k}, one int for every map, or "internal" (each
        map keeps d_in of its outgoing edges, the largest over branches; the
        last map keeps everything)."""
        if self.flattening != "svr":
            raise ValueError("compress works on an SVR, not a co-SVR")
        if isinstance(ranks, str) and ranks == "internal":
            ranks = {}
            for k, (a, _) in enumerate(self.edges):
                ranks[a] = max(ranks.get(a, 0), self.internal_dimensions(k)[1])
        elif isinstance(ranks, int) and not isinstance(ranks, bool):
            ranks = {name: ranks for name in self.layers.names()}
        elif not isinstance(ranks, dict):
            raise TypeError(f"ranks must be 'internal', an int or a dict {{name: k}}, got {ranks!r}")
        rows = []
        for name, k in ranks.items():
            if name not in self.graph.maps:
                raise KeyError(f"ranks names {name!r}, which is not a linear map of the model")
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ValueError(f"ranks[{name!r}] must be a positive int, got {k!r}")
            lmap, layer = self.graph.maps[name], self.layers[name]
            if getattr(lmap.module, "groups", 1) > 1:
                raise ValueError(f"{name!r} is a grouped convolution: a low-rank weight is not grouped")
            out, inp = lmap.out_channels, lmap.in_channels * lmap.kernel_area
            full = min(out, inp)
            if k > layer.rank and layer.rank < full:
                raise ValueError(f"ranks[{name!r}] = {k} exceeds the {layer.rank} spectral neurons this SVR "
                                 f"holds (it was built with top={self.top})")
            k = min(k, full)
            rows.append({"layer": name, "rank": k, "full_rank": full, "parameters": out * inp,
                         "factored_parameters": k * (out + inp)})
        return pd.DataFrame(rows, columns=["layer", "rank", "full_rank", "parameters", "factored_parameters"])

    def compress(self, ranks="internal") -> nn.Module:
        """A copy of the model with chosen maps replaced by their top-k
        spectral neurons, W_k = U_k diag(S_k) V_k^T (section 3.1), from the
        SVDs this SVR holds (nothing is recomputed); `ranks` as in
        compression_frame. With fold_batchnorm the truncated map is the folded
        one, diag(gamma / sqrt(var + eps)) W, and the BatchNorm scale is
        divided back out, so the copy's conv followed by its BatchNorm computes
        the truncated map (a channel with gamma = 0 keeps its weights)."""
        frame = self.compression_frame(ranks)
        model = copy.deepcopy(self.model)
        copied = self.graph.for_model(model).maps  # a map's module in the copy (an attention's in_proj is none)
        for name, k in zip(frame["layer"], frame["rank"]):
            module, layer, lmap = copied[name].module, self.layers[name], self.graph.maps[name]
            W = module.weight.detach()
            k = min(int(k), layer.rank)
            low = (layer.U[:, :k].double() * layer.S[:k].double()) @ layer.V[:, :k].double().T
            scale = lmap.batchnorm_scale(torch.float64) if self.fold_batchnorm else None
            if scale is not None:
                scale = scale.to(low.device)
                kept = scale == 0
                low = low / torch.where(kept, torch.ones_like(scale), scale).unsqueeze(1)
                low[kept] = W.reshape(W.shape[0], -1)[kept.to(W.device)].to(low)
            with torch.no_grad():
                module.weight.copy_(low.reshape(W.shape).to(W.dtype))
        return model


def _stack_by_shape(items: dict, compute) -> dict:
    """Group {key: (a, b)} by the shapes of a and b and call compute on each
    stacked group; returns {key: result}."""
    groups: dict = {}
    for key, (a, b) in items.items():
        groups.setdefault((tuple(a.shape), tuple(b.shape), a.dtype, a.device), []).append(key)
    out = {}
    for keys in groups.values():
        result = compute(torch.stack([items[k][0] for k in keys]), torch.stack([items[k][1] for k in keys]))
        for i, k in enumerate(keys):
            out[k] = result[i]
    return out


def _check_weights(graph: ModelGraph):
    for name, m in graph.maps.items():
        w = m.module.weight
        # One pass without a boolean copy (1.3 s of VGG11's SVR); any NaN or inf makes the sum
        # non-finite, and a finite overflow falls to the exact test.
        if not torch.isfinite(w.detach().sum()) and not torch.isfinite(w).all():
            raise ValueError(f"the weight of {name!r} contains NaN or infinite values")


def _check_top(top):
    if top is not None and (not isinstance(top, (int, np.integer)) or isinstance(top, bool) or top < 1):
        raise ValueError(f"top must be a positive int (the spectral neurons kept per map) or None, got {top!r}")
    return None if top is None else int(top)


def _co_conv_linear(prev: SpectralLayer, nxt: SpectralLayer, c: Connection) -> torch.Tensor:
    """The co-SVR across conv -> flatten -> Linear: the Linear's co-SVR input
    rows are (channel, position) pairs, so the squared overlaps are summed over
    the previous kernel's positions z and the Linear's positions p,
    a[n, m] = sum_{z, p} (sum_k v~_{(k, p), n} u~_{k, z, m})^2, bounded by 1,
    mean 1/c for random maps, chi2(K^2 P) / (c K^2 P) under the null (the
    SVR authors' code sums the same axes)."""
    k2_prev = prev.U.shape[0] // c.previous_channels
    U = prev.U.reshape(c.previous_channels, k2_prev * prev.U.shape[1])[c.channels]  # (shared, K2 M)
    V = nxt.V[c.rows]  # (shared, P, N)
    A = _ops.conv_adjacency(U, V)  # (N, K2 M)
    return A.reshape(A.shape[0], k2_prev, -1).sum(1)


def _build_many(models, example_input, p, fold_batchnorm, dtype, flattening, graph=None, top=None,
                progress=True, bound=None) -> list[SVR]:
    """SVRs of models sharing one architecture: one trace, then one batched
    SVD per distinct matrix shape and one batched adjacency call per distinct
    edge shape across all models. bound: the models' graphs, bound and
    checked by the caller (svr_many's graphs)."""
    p = _checks.number("p", p, low=0, high=1, low_open=True, high_open=True)
    top = _check_top(top)
    if not models:
        raise ValueError("models is empty: nothing to analyse")
    if bound is not None:
        first, graphs = bound[0], list(bound)
    else:
        first = graph if graph is not None else discover(models[0], example_input)
        graphs = [first if i == 0 and graph is None else first.for_model(m) for i, m in enumerate(models)]
        for g in graphs:
            _check_weights(g)
    dtype = compute_dtype(dtype, [m.module.weight for g in graphs for m in g.maps.values()])
    svds = batched_signed_svd({(i, n): m.flattening(flattening, fold_batchnorm, dtype)
                               for i, g in enumerate(graphs) for n, m in g.maps.items()},
                              top=top, progress=progress, desc=f"{flattening.upper()}: SVDs of the linear maps")
    all_layers = [LayerList([SpectralLayer(n, g.maps[n].kind, *svds[(i, n)], module=g.maps[n].module)
                             for n in g.maps])
                  for i, g in enumerate(graphs)]
    operands, direct = {}, {}
    for i, layers in enumerate(all_layers):
        for k, c in enumerate(first.connections):
            prev, nxt = layers[c.previous], layers[c.next]
            if flattening == "svr":
                # U_prev rows are output channels; V_next rows the next map's flattened input.
                operands[(i, k)] = (prev.U[c.channels], nxt.V[c.rows])
                continue
            # co-SVR (section 4.4): next's co-V rows are its input channels, prev's co-U
            # rows are (output channel, kernel position); the roles of U and V swap.
            if nxt.kind == "linear" and c.kernel_area > 1:  # conv -> flatten -> Linear, or a GQA value -> output
                direct[(i, k)] = _co_conv_linear(prev, nxt, c)
                continue
            k2_prev = prev.U.shape[0] // c.previous_channels
            inputs = c.rows[:, 0] // c.kernel_area if c.kind != "conv_linear" else c.rows[:, 0]
            operands[(i, k)] = (nxt.V[inputs], prev.U.reshape(c.previous_channels, k2_prev, -1)[c.channels])
    results = _stack_by_shape(operands, _ops.conv_adjacency)
    if flattening != "svr":
        results = {key: A.T for key, A in results.items()}
    results.update(direct)
    out = []
    for i, (model, g) in enumerate(zip(models, graphs)):
        adjacencies = [results[(i, k)] for k in range(len(first.connections))]
        out.append(SVR(model, g, all_layers[i], adjacencies, p, fold_batchnorm, flattening, top))
    return out


def _build(model, example_input, p, fold_batchnorm, dtype, flattening, graph=None, top=None,
           progress=True) -> SVR:
    return _build_many([model], example_input, p, fold_batchnorm, dtype, flattening, graph, top, progress)[0]


@models_in_eval_mode
def svr_many(models, example_input=None, p: float = 0.15, fold_batchnorm: bool = False,
             dtype: torch.dtype | None = None, graph: ModelGraph | None = None, top: int | None = None,
             progress: bool = True, graphs: list[ModelGraph] | None = None) -> list[SVR]:
    """The SVRs (seed 000 sections 2-4) of many models of one architecture (a
    model zoo) in one go: the dataflow is traced once on the first model, and
    every SVD and adjacency runs batched across models.

    Args:
        models: an iterable of nn.Modules with the same linear maps (models
            whose maps differ raise ValueError naming the map).
        example_input: an input the dataflow is traced on, as in `svr`.
        p: the edge-significance level of seed 000 section 4, as in `svr`.
        fold_batchnorm: fold BatchNorm into the maps first, as in `svr`.
        dtype: the dtype of the SVDs, as in `svr`.
        top: keep the top singular vectors of each map only, as in `svr`.
        progress: a tqdm bar over the models.
        graph: a ModelGraph of the architecture (layers.discover), bound to
            each model here (ModelGraph.for_model) and its weights checked.
        graphs: instead of graph, each model's own ModelGraph, already bound
            and its weights checked (a zoo run binds and checks every member
            once: zoo.members), one per model in order: they are used as
            given, their maps' names and shapes checked against the first.

    Returns:
        A list of SVR, one per model, in order.
    """
    if isinstance(models, nn.Module) or not isinstance(models, Iterable):
        raise TypeError(f"models must be an iterable of nn.Modules (a list), got {type(models).__name__}")
    models = list(models)
    for i, m in enumerate(models):
        check_model(f"models[{i}]", m)
    if graphs is not None:
        graphs = _check_bound(graphs, len(models), graph)
    return _build_many(models, example_input, p, fold_batchnorm, dtype, "svr", graph, top, progress, graphs)


def _check_bound(graphs, count: int, graph) -> list[ModelGraph]:
    """svr_many's graphs, as a list: one ModelGraph per model, the same maps and shapes as the first."""
    if graph is not None:
        raise ValueError("give graph (bound here) or graphs (bound by the caller), not both")
    if isinstance(graphs, ModelGraph) or not isinstance(graphs, Iterable):
        raise TypeError(f"graphs must be a list of ModelGraphs, one per model, got {type(graphs).__name__}")
    graphs = list(graphs)
    if len(graphs) != count:
        raise ValueError(f"graphs must hold one ModelGraph per model: {count} models, {len(graphs)} graphs")
    shapes = None
    for i, g in enumerate(graphs):
        if not isinstance(g, ModelGraph):
            raise TypeError(f"graphs[{i}] must be a ModelGraph, got {type(g).__name__}")
        these = [(name, tuple(m.module.weight.shape)) for name, m in g.maps.items()]
        shapes = these if shapes is None else shapes
        if these != shapes:
            raise ValueError(f"graphs[{i}] has other maps than graphs[0]: {these} against {shapes}")
    return graphs


@models_in_eval_mode
def svr(model: nn.Module, example_input=None, p: float = 0.15, fold_batchnorm: bool = False,
        dtype: torch.dtype | None = None, graph: ModelGraph | None = None, top: int | None = None,
        progress: bool = True) -> SVR:
    """The Singular Value Representation of `model` (seed 000).

    Args:
        model: any nn.Module whose linear maps are Linear or Conv1d/2d/3d.
        example_input: a tensor, a tuple of inputs, or a dict of keyword inputs ({"input_ids": ...} for a transformers
            model) the model runs on, used to trace its dataflow (layers.discover: torch.fx, else one eager forward;
            made up for MLPs; a few image sizes are tried for CNNs).
        p: significance level; p = 0.15 (default) keeps what a random network exceeds with probability 0.15 (sections
            2.4, 4.3).
        fold_batchnorm: scale each conv by the BatchNorm that follows it (default False: seed 000 B.3 ignores BN
            scales).
        dtype: compute the SVDs in this dtype (torch.float64 for LAPACK reference-quality numbers; float32 weights go
            through the float64 Gram matrix, see spectral_ext._linalg.signed_svd; float16/bfloat16 weights are
            computed in float32, with a warning).
        graph: a ModelGraph from spectral_ext.layers.discover to skip tracing (zoos of one architecture).
        top: keep only the `top` leading spectral neurons of each map (the SVR authors' max_dim_svd): exact leading
            singular triplets from a partial eigensolver, so each adjacency is the top-left block of the full one
            (thresholds and null dimensions are those of the full maps); None, the default, keeps all.
        progress: a progress bar over the SVDs (it appears after 2 s; default True).

    Returns:
        An SVR.
    """
    return _build(model, example_input, p, fold_batchnorm, dtype, "svr", graph, top, progress)


@models_in_eval_mode
def co_svr(model: nn.Module, example_input=None, p: float = 0.15, fold_batchnorm: bool = False,
           dtype: torch.dtype | None = None, graph: ModelGraph | None = None, top: int | None = None,
           progress: bool = True) -> SVR:
    """The co-SVR (seed 000 section 4.4): each conv flattened as (out * K^2, in), the SVR seen by back-propagation.

    That is, the SVR seen by the gradient in back-propagation. Adjacency between consecutive maps: a[n, m] = sum_z
    (sum_k v~_{k,n} u~_{k,z,m})^2, with the chi2(K^2) / (c K^2) threshold of the previous map's kernel. Across conv ->
    flatten -> Linear the Linear's inputs are (channel, position) pairs and the positions are summed too (see
    _co_conv_linear).

    Args:
        model: as in `svr`.
        example_input: as in `svr`.
        p: as in `svr` (default 0.15).
        fold_batchnorm: as in `svr` (default False).
        dtype: as in `svr`.
        graph: as in `svr`.
        top: as in `svr` (default None: all).
        progress: as in `svr` (default True).

    Returns:
        An SVR whose flattening is "co-svr".
    """
    return _build(model, example_input, p, fold_batchnorm, dtype, "co-svr", graph, top, progress)


def _matrix_frame(A: torch.Tensor, value: str, **columns) -> pd.DataFrame:
    """One row per entry of a matrix (rows: next map's spectral neurons,
    columns: previous map's), with the given constant columns first."""
    A = A.double().cpu()
    nxt, prev = torch.meshgrid(torch.arange(A.shape[0]), torch.arange(A.shape[1]), indexing="ij")
    return pd.DataFrame({**columns, "next_index": nxt.reshape(-1).numpy(),
                         "previous_index": prev.reshape(-1).numpy(), value: A.reshape(-1).numpy()})


@dataclass(frozen=True, eq=False)
class KernelConnections:
    """|V~_{i+1}^T U-bar_i| per edge (seed 000 section 5.2.1): `matrices`
    {(previous, next): (k~_next, k_previous) tensor}; `.to_frame()` is
    one row per entry (previous, next, next_index, previous_index, value)."""

    matrices: dict

    def to_frame(self) -> pd.DataFrame:
        frames = [_matrix_frame(M, "value", previous=a, next=b) for (a, b), M in self.matrices.items()]
        columns = ["previous", "next", "next_index", "previous_index", "value"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


@models_in_eval_mode
def kernel_connections(model: nn.Module, example_input=None, fold_batchnorm: bool = False,
                       dtype: torch.dtype | None = None, graph: ModelGraph | None = None,
                       progress: bool = True) -> KernelConnections:
    """|V~_{i+1}^T U-bar_i| for every edge (seed 000 section 5.2.1).

    How the SVR spectral neurons of a map reach the co-SVR spectral neurons of the next. A conv -> flatten -> Linear
    edge has no such matrix (the Linear's inputs are (channel, position) pairs, section 5.2.1 treats conv -> conv): it
    is left out, with a warning naming it, and the other edges are returned.

    Args:
        model: as in `svr`.
        example_input: as in `svr`.
        fold_batchnorm: as in `svr` (default False).
        dtype: as in `svr`.
        graph: as in `svr`.
        progress: as in `svr` (default True).

    Returns:
        KernelConnections (`.matrices` {(previous, next): (k~_next, k_previous) tensor}, `.to_frame()`).
    """
    graph = graph if graph is not None else discover(model, example_input)
    _check_weights(graph)
    dtype = compute_dtype(dtype, [m.module.weight for m in graph.maps.values()])
    bar = batched_signed_svd({n: m.flattening("svr", fold_batchnorm, dtype) for n, m in graph.maps.items()},
                             progress=progress, desc="kernel connections: SVR SVDs")
    tilde = batched_signed_svd({n: m.flattening("co-svr", fold_batchnorm, dtype) for n, m in graph.maps.items()},
                               progress=progress, desc="kernel connections: co-SVR SVDs")
    out, skipped = {}, []
    for c in graph.connections:
        if graph.maps[c.next].kind == "linear" and c.kernel_area > 1:  # also a channel read by several heads (GQA)
            skipped.append(f"{c.previous!r} -> {c.next!r}")
            continue
        inputs = c.rows[:, 0] // c.kernel_area if c.kind != "conv_linear" else c.rows[:, 0]
        V_tilde = tilde[c.next][2][inputs]  # (shared, k~)
        U_bar = bar[c.previous][0][c.channels]  # (shared, k)
        out[(c.previous, c.next)] = (V_tilde.T @ U_bar).abs()
    if skipped:
        warnings.warn("kernel connections skip the conv -> flatten -> Linear edge(s) " + ", ".join(skipped) +
                      " (section 5.2.1 defines them between convolutions)", stacklevel=2)
    return KernelConnections(out)


@dataclass(frozen=True, eq=False)
class SpectralActivations:
    """Spectral activations Y = V^T psi(X) per map (seed 000 sections 2.2 and
    4.1): `activations` {layer: tensor}, (N, ..., k) for a Linear, the
    spectral images (N, k, *spatial) for a conv. `.to_frame()`: per layer and
    spectral neuron the mean |Y| over samples and positions; `.plot(layer)`:
    one sample's spectral images (a conv2d map)."""

    activations: dict

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for layer, Y in self.activations.items():
            axis = Y.dim() - 1 if Y.dim() <= 2 else 1  # the spectral-neuron axis
            mean_abs = Y.abs().double().movedim(axis, 0).reshape(Y.shape[axis], -1).mean(1).cpu()
            rows += [{"layer": layer, "index": i, "mean_abs": float(v)} for i, v in enumerate(mean_abs)]
        return pd.DataFrame(rows, columns=["layer", "index", "mean_abs"])

    def plot(self, layer: str, sample: int = 0, nodes=None, ncols: int = 8):
        """The spectral images of `layer` for one sample (seed 000 Fig. 4)."""
        from .plot import signal_heatmaps

        if layer not in self.activations:
            raise KeyError(f"layer {layer!r} has no spectral activations here; choose among {list(self.activations)}")
        Y = self.activations[layer]
        if Y.dim() != 4:
            raise ValueError(f"layer {layer!r}: spectral images need a conv2d map, got activations {tuple(Y.shape)}")
        sample = _checks.integer("sample", sample, low=0, high=Y.shape[0] - 1)
        return signal_heatmaps(Y[sample], nodes=nodes, ncols=ncols)


def _spectral_images(inp: torch.Tensor, layer: SpectralLayer, module: nn.Module) -> torch.Tensor:
    """One captured input through the map's spectral filters V (section 4.1);
    `module` (the caller's model's, not the SVR's) gives stride and padding."""
    V = layer.V.to(inp.dtype).to(inp.device)
    if layer.kind == "linear":
        return inp @ V
    kernel = tuple(module.kernel_size)
    if layer.kind == "conv2d" and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return _ops.signal_projection(inp, V, torch.ones(V.shape[1], dtype=V.dtype, device=V.device),
                                      module.stride, module.padding, module.dilation, None, kernel)
    if module.padding_mode != "zeros":
        inp = F.pad(inp, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    else:
        padding = module.padding
    conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[layer.kind]
    filters = V.T.reshape(V.shape[1], module.in_channels, *kernel)
    return conv(inp, filters, None, module.stride, padding, module.dilation)


def spectral_activations(model: nn.Module, svr: SVR, layers, data, batch_size: int = 256,
                         progress: bool = True) -> SpectralActivations:
    """Spectral activations Y = V^T psi(X) of each map's input (seed 000
    sections 2.2 and 4.1): for a Linear, its input projected on V (..., k);
    for a conv, the input convolved with the k spectral filters (B, k, H', W'),
    the "spectral images".

    Args:
        model: the model `svr` was built from (or one of its architecture).
        svr: its SVR.
        layers: a map name or a list of them; None for all.
        data: inputs in any form spectral_ext._data.batches accepts (a tensor,
            an (inputs, labels) pair, a DataLoader, an iterable of batches),
            streamed, the results concatenated over samples.
        batch_size: the batch size for a tensor.
        progress: a bar over the batches.

    Returns:
        SpectralActivations (`.activations` {layer: tensor}, `.to_frame()`,
        `.plot(layer)`)."""
    from tqdm.auto import tqdm

    from ._data import batches

    check_model("model", model)
    if not isinstance(svr, SVR):
        raise TypeError(f"svr must be the SVR of the model (spectral_ext.svr(model)), got {type(svr).__name__}")
    if svr.flattening != "svr":
        raise ValueError("spectral activations are defined for the SVR, not the co-SVR")
    names = svr.layers.names() if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    modules = dict(model.named_modules())
    for name in names:
        if name not in svr.layers or name not in modules:
            raise KeyError(f"{name!r} is not a linear map of this SVR")
    out: dict = {name: [] for name in names}
    with capturing(model, names, inputs=True) as (captured, _), torch.no_grad(), evaluating(model):
        for x, _ in tqdm(batches(data, batch_size), desc="spectral activations", disable=not progress,
                         leave=False):
            captured.clear()
            model(x)
            for name in names:
                out[name].append(_spectral_images(captured[name], svr.layers[name], modules[name]))
    return SpectralActivations({name: torch.cat(v) for name, v in out.items()})


def sobel_similarity(spectral_images: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between |spectral image| and the Sobel edge map of the greyscaled input.

    The input is average-pooled to the spectral images' size (seed 000 section 5.1 and B.4).

    Args:
        spectral_images: (B, k, H', W').
        images: (B, C, H, W), the inputs (floating or uint8).

    Returns:
        A tensor (k,), one value per spectral neuron.
    """
    _checks.tensor("spectral_images", spectral_images, ndims=(4,), shape="(B, k, H', W')")
    _checks.tensor("images", images, ndims=(4,), shape="(B, C, H, W)",
                   dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8))
    if _checks.data_free(spectral_images, images):
        raise ValueError("spectral_images and images must hold data (not meta tensors)")
    if spectral_images.shape[0] != images.shape[0]:
        raise ValueError(f"spectral_images (B, k, H', W') and images (B, C, H, W) must share B, got "
                         f"{tuple(spectral_images.shape)} and {tuple(images.shape)}")
    dtype = spectral_images.dtype
    grey = images.to(dtype).mean(1, keepdim=True)
    grey = F.adaptive_avg_pool2d(grey, spectral_images.shape[-2:])
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=dtype, device=grey.device)
    kernels = torch.stack([gx, gx.T]).unsqueeze(1)
    grad = F.conv2d(grey, kernels, padding=1)
    edges = grad.square().sum(1).sqrt().flatten(1)  # (B, H'W')
    spectral = spectral_images.abs().flatten(2)  # (B, k, H'W')
    cos = F.cosine_similarity(spectral, edges.unsqueeze(1).expand_as(spectral), dim=-1, eps=1e-12)
    return cos.mean(0)

