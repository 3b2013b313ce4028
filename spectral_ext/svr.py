"""The Singular Value Representation (seed 000): spectral neurons of every
linear map, their adjacency across layers, significance thresholds, internal
dimensions, colour intensities, co-SVR, kernel connections, spectral
activations, the Sobel edge measure and SVD compression."""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from . import _checks, _ops
from ._hooks import evaluating
from ._linalg import batched_signed_svd, compute_dtype
from .layers import Connection, ModelGraph, discover


@dataclass
class SpectralLayer:
    """The spectral neurons of one linear map: W = U diag(S) V^T with the
    flattening of seed 000 section 4.2 (SVR) or 4.4 (co-SVR). U (out, k),
    S (k,), V (in * K2, k) for the SVR; U (out * K2, k), V (in, k) for the
    co-SVR. Columns are in decreasing singular value."""

    name: str
    kind: str
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.S.numel())


class LayerList:
    """Spectral layers in forward order, indexable by position or by the
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
    """Moments of <X, Y>^2 for X, Y uniform on the unit sphere of R^n (seed 000
    section 2.4 and Proposition A.1): mean 1/n, fourth moment of <X, Y>
    3 / (n^2 + 2n), hence Var(<X, Y>^2) = 3 / (n^2 + 2n) - 1 / n^2, against
    2 / n^2 for the 1/n chi2(1) model."""
    if n < 1:
        raise ValueError(f"n must be a positive dimension, got {n}")
    fourth = 3.0 / (n * n + 2.0 * n)
    return {"mean": 1.0 / n, "fourth_moment": fourth, "variance": fourth - 1.0 / n**2,
            "chi2_model_variance": 2.0 / n**2}


def r_squared_std(c: int, kernel_area: int) -> float:
    """std(r_1^2) = (1/K^2) sqrt((2K^2 - 2) / (c K^2 + 2)) of Proposition A.2
    (seed 000): the spread of the share of norm one kernel position takes."""
    if c < 1 or kernel_area < 1:
        raise ValueError(f"c and kernel_area must be positive, got {c} and {kernel_area}")
    k2 = float(kernel_area)
    return math.sqrt((2 * k2 - 2) / (c * k2 + 2)) / k2


def adjacency_threshold(p: float, kernel_area: int, n: float) -> float:
    """The coefficient a random network exceeds with probability p: the upper
    p-quantile of chi2(K^2) / (n K^2) (seed 000 sections 2.4 and 4.3; K^2 = 1
    for fully connected layers, where it is chi2(1) / n)."""
    p = _checks.number("p", p, low=0, high=1, low_open=True, high_open=True)
    return float(stats.chi2.isf(p, kernel_area) / (n * kernel_area))


def internal_dimensions(A: torch.Tensor, n: float) -> tuple[int, int]:
    """Internal dimensions (d_out, d_in) of an adjacency matrix A (rows: the
    next map's spectral neurons, columns: the previous map's), as 1-based
    counts: argmax over (i, j) of B_ij - ij/n, B_ij = sum_{k<=i, l<=j} A_kl
    (seed 000 section 3.2; n makes 1/n a random coefficient's mean)."""
    A = A.double()
    B = A.cumsum(0).cumsum(1)
    i = torch.arange(1, A.shape[0] + 1, dtype=A.dtype, device=A.device)
    j = torch.arange(1, A.shape[1] + 1, dtype=A.dtype, device=A.device)
    flat = int(torch.argmax(B - torch.outer(i, j) / n))
    return flat // A.shape[1] + 1, flat % A.shape[1] + 1


# ---------------------------------------------------------------- the SVR

class SVR:
    """The SVR of a model. Build it with `spectral_ext.svr(model, ...)`.

    `.layers`: spectral neurons per linear map (LayerList of SpectralLayer);
    `.edges`: (previous_name, next_name) pairs in topological order; per edge
    `e` (an index into `.edges` or a name pair): `.adjacency(e)` (rows: next
    map's spectral neurons, columns: previous map's), `.threshold(e)`,
    `.significant(e)`, `.internal_dimensions(e)`, `.color_intensity(e)`."""

    def __init__(self, model: nn.Module, graph: ModelGraph, layers: LayerList,
                 adjacencies: list[torch.Tensor], p: float, fold_batchnorm: bool, flattening: str):
        self.model = model
        self.graph = graph
        self.layers = layers
        self.connections: list[Connection] = list(graph.connections)
        self.edges = [(c.previous, c.next) for c in self.connections]
        self._adjacency = adjacencies
        self.p = p
        self.fold_batchnorm = fold_batchnorm
        self.flattening = flattening

    def __repr__(self) -> str:
        return (f"SVR({self.flattening}, {len(self.layers)} maps, {len(self.edges)} edges, p={self.p}, "
                f"fold_batchnorm={self.fold_batchnorm})")

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
        c = self.connection(e)
        k2 = c.kernel_area if self.flattening == "svr" else self.layers[c.previous].U.shape[0] // c.previous_channels
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

    # ------------------------------------------------------------ outputs

    def to_frame(self, kind: str = "edges") -> pd.DataFrame:
        """Tidy tables. kind="edges": one row per connected pair (threshold,
        significant edge count and fraction, internal dimensions);
        "neurons": one row per spectral neuron (singular value, intensity);
        "coefficients": one row per adjacency coefficient."""
        if kind == "edges":
            rows = []
            for k, (a, b) in enumerate(self.edges):
                c, A = self.connections[k], self.adjacency(k)
                sig = self.significant(k)
                d_out, d_in = self.internal_dimensions(k)
                rows.append({"previous": a, "next": b, "kind": c.kind, "kernel_area": c.kernel_area,
                             "n": c.null_dimension, "next_neurons": A.shape[0], "previous_neurons": A.shape[1],
                             "threshold": self.threshold(k), "significant": int(sig.sum()),
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
                A = self.adjacency(k).double().cpu()
                nxt, prev = torch.meshgrid(torch.arange(A.shape[0]), torch.arange(A.shape[1]), indexing="ij")
                frames.append(pd.DataFrame({"previous": a, "next": b, "next_index": nxt.reshape(-1).numpy(),
                                            "previous_index": prev.reshape(-1).numpy(),
                                            "coefficient": A.reshape(-1).numpy(),
                                            "significant": (A > self.threshold(k)).reshape(-1).numpy()}))
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

    def plot(self, ax=None, top: int | None = 64, max_edges: int = 20000):
        """The figure of seed 000 Fig. 2/5: maps on x, singular-value rank on
        y, significant edges in grey scale, neurons coloured by intensity."""
        from .plot import svr_graph

        return svr_graph(self, ax=ax, top=top, max_edges=max_edges)

    def plot_adjacency(self, e, ax=None):
        """Heat map of one adjacency matrix (seed 000 Fig. 3/7)."""
        from .plot import adjacency_heatmap

        return adjacency_heatmap(self, e, ax=ax)

    # ------------------------------------------------------------ compression

    def compress(self, ranks="internal") -> nn.Module:
        """A copy of the model with chosen maps replaced by their top-k
        spectral neurons, W_k = U_k diag(S_k) V_k^T (section 3.1): `ranks` is a
        dict {name: k}, one int for every map, or "internal" (each map keeps
        d_in of its outgoing edges, the largest over branches; the last map
        keeps everything)."""
        if self.flattening != "svr":
            raise ValueError("compress works on an SVR, not a co-SVR")
        if ranks == "internal":
            ranks = {}
            for k, (a, _) in enumerate(self.edges):
                ranks[a] = max(ranks.get(a, 0), self.internal_dimensions(k)[1])
        elif isinstance(ranks, int):
            ranks = {name: ranks for name in self.layers.names()}
        elif not isinstance(ranks, dict):
            raise TypeError(f"ranks must be 'internal', an int or a dict {{name: k}}, got {type(ranks).__name__}")
        model = copy.deepcopy(self.model)
        modules = dict(model.named_modules())
        for name, k in ranks.items():
            if name not in modules or name not in self.graph.maps:
                raise KeyError(f"ranks names {name!r}, which is not a linear map of the model")
            if not isinstance(k, int) or k < 1:
                raise ValueError(f"ranks[{name!r}] must be a positive int, got {k!r}")
            module = modules[name]
            if getattr(module, "groups", 1) > 1:
                raise ValueError(f"{name!r} is a grouped convolution: a low-rank weight is not grouped")
            W = module.weight.detach()
            flat = W.reshape(W.shape[0], -1).double()
            U, S, Vh = torch.linalg.svd(flat, full_matrices=False)
            k = min(k, S.numel())
            low = (U[:, :k] * S[:k]) @ Vh[:k]
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
        if not torch.isfinite(w).all():
            raise ValueError(f"the weight of {name!r} contains NaN or infinite values")


def _build_many(models, example_input, p, fold_batchnorm, dtype, flattening, graph=None) -> list[SVR]:
    """SVRs of models sharing one architecture: one trace, then one batched
    SVD per distinct matrix shape and one batched adjacency call per distinct
    edge shape across all models."""
    p = _checks.number("p", p, low=0, high=1, low_open=True, high_open=True)
    if not models:
        raise ValueError("models is empty: nothing to analyse")
    first = graph if graph is not None else discover(models[0], example_input)
    graphs = [first if i == 0 and graph is None else first.for_model(m) for i, m in enumerate(models)]
    for g in graphs:
        _check_weights(g)
    dtype = compute_dtype(dtype, [m.module.weight for g in graphs for m in g.maps.values()])
    flatten = (lambda m: m.matrix(fold_batchnorm, dtype)) if flattening == "svr" else (
        lambda m: m.co_matrix(fold_batchnorm, dtype))
    svds = batched_signed_svd({(i, n): flatten(m) for i, g in enumerate(graphs) for n, m in g.maps.items()})
    all_layers = [LayerList([SpectralLayer(n, g.maps[n].kind, *svds[(i, n)]) for n in g.maps])
                  for i, g in enumerate(graphs)]
    operands = {}
    for i, layers in enumerate(all_layers):
        for k, c in enumerate(first.connections):
            prev, nxt = layers[c.previous], layers[c.next]
            if flattening == "svr":
                # U_prev rows are output channels; V_next rows the next map's flattened input.
                operands[(i, k)] = (prev.U[c.channels], nxt.V[c.rows])
                continue
            # co-SVR (section 4.4): next's co-V rows are its input channels, prev's co-U
            # rows are (output channel, kernel position); the roles of U and V swap.
            if c.kind == "conv_linear" and c.kernel_area > 1:
                raise ValueError(f"the co-SVR is not defined across the conv -> flatten -> Linear edge "
                                 f"{c.previous!r} -> {c.next!r} (seed 000 section 4.4 treats convolutions)")
            k2_prev = prev.U.shape[0] // c.previous_channels
            inputs = c.rows[:, 0] // c.kernel_area if c.kind != "conv_linear" else c.rows[:, 0]
            operands[(i, k)] = (nxt.V[inputs], prev.U.reshape(c.previous_channels, k2_prev, -1)[c.channels])
    results = _stack_by_shape(operands, _ops.conv_adjacency)
    out = []
    for i, (model, g) in enumerate(zip(models, graphs)):
        adjacencies = [results[(i, k)] if flattening == "svr" else results[(i, k)].T
                       for k in range(len(first.connections))]
        out.append(SVR(model, g, all_layers[i], adjacencies, p, fold_batchnorm, flattening))
    return out


def _build(model, example_input, p, fold_batchnorm, dtype, flattening, graph=None) -> SVR:
    return _build_many([model], example_input, p, fold_batchnorm, dtype, flattening, graph)[0]


def svr_many(models, example_input=None, p: float = 0.15, fold_batchnorm: bool = False,
             dtype: torch.dtype | None = None, graph: ModelGraph | None = None) -> list[SVR]:
    """The SVRs of many models of one architecture (a model zoo) in one go:
    the dataflow is traced once on the first model, and every SVD and
    adjacency runs batched across models. Models whose maps differ raise
    ValueError naming the map."""
    models = list(models)
    return _build_many(models, example_input, p, fold_batchnorm, dtype, "svr", graph)


def svr(model: nn.Module, example_input=None, p: float = 0.15, fold_batchnorm: bool = False,
        dtype: torch.dtype | None = None, graph: ModelGraph | None = None) -> SVR:
    """The Singular Value Representation of `model` (seed 000).

    model: any nn.Module whose linear maps are Linear or Conv1d/2d/3d.
    example_input: a tensor (or tuple of inputs) the model runs on, used to
    trace its dataflow (made up for MLPs; a few image sizes are tried for
    CNNs). p: significance level; p = 0.15 keeps what a random network
    exceeds with probability 0.15 (sections 2.4, 4.3). fold_batchnorm: scale
    each conv by the BatchNorm that follows it (seed 000 B.3 ignores BN scales,
    the default). dtype: compute the SVDs in this dtype (torch.float64 for
    reference-quality numbers). graph: a ModelGraph from
    spectral_ext.layers.discover to skip tracing (zoos of one architecture).
    """
    return _build(model, example_input, p, fold_batchnorm, dtype, "svr", graph)


def co_svr(model: nn.Module, example_input=None, p: float = 0.15, fold_batchnorm: bool = False,
           dtype: torch.dtype | None = None, graph: ModelGraph | None = None) -> SVR:
    """The co-SVR (seed 000 section 4.4): each conv flattened as (out * K^2, in),
    i.e. the SVR seen by the gradient in back-propagation. Adjacency between
    consecutive maps: a[n, m] = sum_z (sum_k v~_{k,n} u~_{k,z,m})^2, with the
    chi2(K^2) / (c K^2) threshold of the previous map's kernel."""
    return _build(model, example_input, p, fold_batchnorm, dtype, "co-svr", graph)


def kernel_connections(model: nn.Module, example_input=None, fold_batchnorm: bool = False,
                       dtype: torch.dtype | None = None, graph: ModelGraph | None = None) -> dict:
    """|V~_{i+1}^T U-bar_i| for every edge (seed 000 section 5.2.1): how the SVR
    spectral neurons of a map reach the co-SVR spectral neurons of the next.
    Returns {(previous, next): (k~_next, k_previous) tensor}."""
    graph = graph if graph is not None else discover(model, example_input)
    _check_weights(graph)
    dtype = compute_dtype(dtype, [m.module.weight for m in graph.maps.values()])
    bar = batched_signed_svd({n: m.matrix(fold_batchnorm, dtype) for n, m in graph.maps.items()})
    tilde = batched_signed_svd({n: m.co_matrix(fold_batchnorm, dtype) for n, m in graph.maps.items()})
    out = {}
    for c in graph.connections:
        if c.kind == "conv_linear" and c.kernel_area > 1:
            raise ValueError(f"kernel connections are not defined across the conv -> flatten -> Linear edge "
                             f"{c.previous!r} -> {c.next!r}")
        inputs = c.rows[:, 0] // c.kernel_area if c.kind != "conv_linear" else c.rows[:, 0]
        V_tilde = tilde[c.next][2][inputs]  # (shared, k~)
        U_bar = bar[c.previous][0][c.channels]  # (shared, k)
        out[(c.previous, c.next)] = (V_tilde.T @ U_bar).abs()
    return out


def spectral_activations(model: nn.Module, svr: SVR, x, layers=None) -> dict:
    """Spectral activations Y = V^T psi(X) of each map's input (seed 000
    sections 2.2 and 4.1): for a Linear, its input projected on V (..., k);
    for a conv, the input convolved with the k spectral filters (B, k, H', W'),
    the "spectral images". Returns {name: tensor} for `layers` (default all)."""
    if svr.flattening != "svr":
        raise ValueError("spectral activations are defined for the SVR, not the co-SVR")
    names = svr.layers.names() if layers is None else list(layers)
    modules = dict(model.named_modules())
    captured: dict = {}
    handles = []
    for name in names:
        if name not in svr.layers or name not in modules:
            raise KeyError(f"{name!r} is not a linear map of this SVR")
        handles.append(modules[name].register_forward_hook(
            lambda m, inputs, output, name=name: captured.__setitem__(name, inputs[0].detach())))
    try:
        with torch.no_grad(), evaluating(model):
            model(*(x if isinstance(x, tuple) else (x,)))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name in names:
        inp, layer, module = captured[name], svr.layers[name], modules[name]
        V = layer.V.to(inp.dtype).to(inp.device)
        if layer.kind == "linear":
            out[name] = inp @ V
            continue
        kernel = tuple(module.kernel_size)
        if (layer.kind == "conv2d" and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
            out[name] = _ops.signal_projection(inp, V, torch.ones(V.shape[1], dtype=V.dtype, device=V.device),
                                               module.stride, module.padding, module.dilation, None, kernel)
        else:
            if module.padding_mode != "zeros":
                inp = F.pad(inp, module._reversed_padding_repeated_twice, mode=module.padding_mode)
                padding = 0
            else:
                padding = module.padding
            conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[layer.kind]
            filters = V.T.reshape(V.shape[1], module.in_channels, *kernel)
            out[name] = conv(inp, filters, None, module.stride, padding, module.dilation)
    return out


def sobel_similarity(spectral_images: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between |spectral image| and the Sobel edge map
    of the greyscaled input, average-pooled to the spectral images' size
    (seed 000 section 5.1 and B.4). spectral_images (B, k, H', W'), images
    (B, C, H, W) -> (k,), one value per spectral neuron."""
    if spectral_images.dim() != 4 or images.dim() != 4 or spectral_images.shape[0] != images.shape[0]:
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
