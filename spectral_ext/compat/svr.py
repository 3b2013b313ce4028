"""The SVR authors' call shape (github danmlr/svr, the code of seed 000; not on
PyPI), computed by spectral_ext.svr: ``SVR(weights, method, max_dim_svd,
verbose)`` with their attributes and methods.

Their conventions are kept where they define the numbers: `weights` is a list
of tensors in forward order (1-D ones dropped, 4-D convolutions, 2-D fully
connected, a conv -> Linear flattening read channel-major), a map keeps all
its spectral neurons when min(shape) <= max_dim_svd and its max_dim_svd
leading ones otherwise, `internal_dims` is 0-based, `node_intensity` is 1
on the last map. Differences, on purpose: the leading triplets are exact
(theirs come from ARPACK's svds, to its tolerance), singular vectors carry
the project's sign convention (theirs LAPACK's, so U, V and
adjacency_filters agree up to the sign of each spectral neuron; adjacencies,
intensities, the path metric and entropies do not depend on it), 0 log 0 = 0
in `entropy` and an all-zero intensity stays zero (theirs give NaN there),
and `plot` draws a matplotlib figure (theirs a plotly one).
"""
from __future__ import annotations

import copy

import torch
from scipy.stats import norm
from torch import nn

from ..spectral_neurons import co_svr as _co_svr, svr as _svr
from ..layers import chain_graph


def _module(w: torch.Tensor) -> nn.Module:
    """A bias-free Linear or Conv2d holding `w` itself (built on the meta device, no copy)."""
    if w.dim() == 2:
        m = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    elif w.dim() == 4:
        if w.shape[2] != w.shape[3]:
            raise ValueError(f"weights: a 4-D weight needs a square kernel (the authors' convention), got "
                             f"{tuple(w.shape)}")
        m = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], bias=False, device="meta")
    else:
        raise ValueError(f"weights: expected 2-D (fully connected) or 4-D (convolution) tensors, got shape "
                         f"{tuple(w.shape)}")
    m.weight = nn.Parameter(w.detach(), requires_grad=False)
    return m


class SVR:
    """SVR(weights, method="svr" | "cosvr", max_dim_svd=128, verbose=True).

    Attributes as the authors': S, U, V (lists on the CPU; U (o, m) and V
    (i, K, K, m) for a conv in the SVR, U (o, K, K, m) and V (i, m) in the
    co-SVR, V (i, z, 1, m) for a Linear after a conv), adjacency (list of
    (n_next, m_prev) tensors), arch, convolutional, method, max_dim_svd,
    verbose; `svr` is the spectral_ext.SVR behind them."""

    def __init__(self, weights, method: str = "svr", max_dim_svd: int = 128, verbose: bool = True):
        if method not in ("svr", "cosvr"):
            raise ValueError(f"method must be 'svr' or 'cosvr', got {method!r}")
        if isinstance(max_dim_svd, bool) or not isinstance(max_dim_svd, int) or max_dim_svd < 1:
            raise ValueError(f"max_dim_svd must be a positive int, got {max_dim_svd!r}")
        weights = list(weights)
        if not all(isinstance(w, torch.Tensor) for w in weights):
            raise TypeError("weights must be a list of tensors (e.g. list(model.parameters()))")
        weights = [w for w in weights if w.dim() > 1]
        if not weights:
            raise ValueError("weights holds no 2-D or 4-D tensor")
        self.arch = [weights[0].shape[1]] + [w.shape[0] for w in weights]
        self.method, self.max_dim_svd, self.verbose = method, max_dim_svd, verbose
        self.convolutional = [w.dim() == 4 for w in weights]
        model = nn.Sequential(*[_module(w) for w in weights])
        build = _svr if method == "svr" else _co_svr
        # The authors' default sigma_threshold = 3 of plot(), as a significance level.
        self.svr = build(model, p=float(norm.sf(3)), graph=chain_graph(model), top=max_dim_svd, progress=verbose)
        self.S, self.U, self.V = [], [], []
        for l, (w, layer) in enumerate(zip(weights, self.svr.layers)):
            U, V = layer.U.cpu(), layer.V.cpu()
            m = layer.rank
            if w.dim() == 4:
                o, i, k, _ = w.shape
                if method == "svr":
                    V = V.reshape(i, k, k, m)
                else:
                    U = U.reshape(o, k, k, m)
            elif l > 0 and self.convolutional[l - 1]:
                V = V.reshape(self.arch[l], -1, 1, m)  # (i, z, 1, m), channel-major inputs
            self.S.append(layer.S.cpu())
            self.U.append(U)
            self.V.append(V)
        self.adjacency = [self.svr.adjacency(e).cpu() for e in range(len(self.svr.edges))]

    def __repr__(self) -> str:
        return f"compat.svr.SVR(method={self.method!r}, arch={self.arch}, max_dim_svd={self.max_dim_svd})"

    def internal_dims(self, layer: int) -> tuple[int, int]:
        """0-based (row, column) argmax of n B - i j over adjacency[layer]
        (B its 2-D cumulative sum, n = arch[layer + 1]; seed 000 section 3.2)."""
        d_out, d_in = self.svr.internal_dimensions(layer)
        return d_out - 1, d_in - 1

    def node_intensity(self, layer: int) -> torch.Tensor:
        """relu(max_i cumsum_i(n a - 1)) per spectral neuron of map `layer`,
        divided by its maximum; ones for the last map (section 3.2)."""
        if layer == len(self.adjacency):
            return torch.ones(self.S[layer].shape)
        return self.svr.color_intensity(layer, normalize=True).cpu().to(self.S[layer].dtype)

    def pathmetric(self, sing_scale: bool = True, sing_threshold: float = 0) -> float:
        """The weighted sum of all input-to-output paths (spectral_ext.SVR.path_metric)."""
        return self.svr.path_metric(sing_scale, sing_threshold)

    def adjacency_filters(self, layer: int) -> torch.Tensor:
        """The effective filters between maps layer and layer + 1: (n, K, K, m)
        conv -> conv, (n, z, 1, m) conv -> Linear, (n, m) fully connected
        (section 4.2); adjacency[layer] is their square summed over the middle."""
        if self.method == "cosvr":
            return torch.tensordot(self.V[layer + 1].transpose(0, -1), self.U[layer], 1)
        filters = self.svr.adjacency_filters(layer).cpu()
        c = self.svr.connection(layer)
        if c.kind == "fc":
            return filters[:, 0]
        if c.kind == "conv_linear":
            return filters.unsqueeze(2)
        return filters

    def entropy(self) -> torch.Tensor:
        """-sum |a| log |a| of each adjacency, unnormalised (0 log 0 = 0)."""
        return torch.tensor(self.svr.entropy().to_numpy())

    def plot(self, sigma_threshold: float = 3, max_edges: int = 100, top: int | None = None, title=None):
        """The SVR figure (spectral_ext.plot.svr_graph), edges above the
        threshold of significance p = 1 - Phi(sigma_threshold), at most
        max_edges per pair of maps (the strongest). Returns the figure."""
        from ..plot import svr_graph

        view = copy.copy(self.svr)
        view.p = float(norm.sf(sigma_threshold))
        return svr_graph(view, top=top, max_edges=max_edges * max(1, len(self.adjacency)), title=title)
