"""Receptive-field signals, class hypergraphs and the semantic hierarchy
(seed 001 sections 4.3, 5 and 6).

The signal of a receptive field v along the right singular vector v_i of a
layer's unfolded weight W1 = U S V^T is s_i <v, v_i> (section 4.3); the
signal vector sigma_L(X) averages it over the receptive fields of an image.
A singular vector is significant for an image above a per-layer threshold q
(a high quantile of all signals), and for a class when significant for at
least p of its images (section 5); classes are the hyperedges of a
hypergraph on the singular vectors, whose equivalence classes are ordered by
inclusion of their class sets (section 5.2).

``spectral_ext.signals`` is the function `signals` below; this module is
``spectral_ext.receptive_fields`` (a module and a function never share a
name)."""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import pandas as pd
import torch
from torch import nn

from . import _checks
from ._data import batches as _batches
from ._data import first_batch
from ._hooks import capturing, evaluating, set_eval
from ._linalg import signed_svd
from ._ops import signal_projection
from .layers import SpectralLayer, discover


def layer_bases(model: nn.Module, layers=None, example_input=None) -> dict[str, SpectralLayer]:
    """The SVD W1 = U S V^T of seed 001 section 4.3 of each chosen Linear or Conv2d map.

    W1 = weight.reshape(out, -1), in float64.

    Args:
        model: the network.
        layers: a qualified module name or a list of them (default None: all).
        example_input: an input to trace the model with (see layers.discover).

    Returns:
        {layer: SpectralLayer}, in the order asked.
    """
    graph = discover(model, example_input)
    names = list(graph.maps) if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    unknown = [n for n in names if n not in graph.maps]
    if unknown:
        raise ValueError(f"layers names no Linear or Conv map of the model: {unknown}; "
                         f"choose among {list(graph.maps)}")
    out = {}
    for name in names:
        m = graph.maps[name]
        if m.kind not in ("linear", "conv2d"):
            raise ValueError(f"signals are implemented for Linear and Conv2d layers, {name} is {m.kind}")
        U, S, V = signed_svd(m.matrix(dtype=torch.float64))
        out[name] = SpectralLayer(name, m.kind, U, S, V, module=m.module)
    return out


def _project(basis: SpectralLayer, inputs: torch.Tensor, reduce):
    """Signals of a captured layer input: (B, r) or (B, r, H', W')."""
    V = basis.V.to(inputs.dtype).to(inputs.device)
    s = basis.S.to(inputs.dtype).to(inputs.device)
    if basis.kind == "linear":
        flat = inputs.reshape(-1, inputs.shape[-1]) if inputs.dim() > 2 else inputs
        return (flat @ V) * s
    module = basis.module
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        if module.padding_mode != "zeros":
            inputs = nn.functional.pad(inputs, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        else:  # padding="same"/"valid": the conv's own resolved amounts
            padding = tuple(p // 2 for p in module._reversed_padding_repeated_twice[::2][::-1])
    else:
        padding = module.padding
    return signal_projection(inputs, V, s, module.stride, padding, module.dilation, reduce,
                             tuple(module.kernel_size))


def _stream(model, bases, data, reduce, batch_size, progress, consume, name="data"):
    from tqdm.auto import tqdm

    with capturing(model, list(bases), inputs=True) as (captured, _), torch.no_grad(), evaluating(model):
        for x, y in tqdm(_batches(data, batch_size, name=name), desc="signals", disable=not progress, leave=False):
            if not _checks.all_finite(x):
                raise ValueError(f"{name} contains NaN or infinite values")
            captured.clear()
            model(x)
            consume({name: _project(bases[name], captured[name], reduce) for name in bases}, y)


def signals(model: nn.Module, layer: str, data, reduce: str | None = "mean", batch_size: int = 256,
            progress: bool = True) -> torch.Tensor:
    """Signals s_i <v_i, receptive field> of the input of `layer` (seed 001 section 4.3, equation 16).

    One signal for every right singular vector v_i: per position (reduce=None: (N, r, H', W'), the heatmaps of Fig. 5)
    or averaged over the receptive fields (reduce="mean": the signal vector sigma_L(X), (N, r)). Linear layers give the
    plain projection (N, r). Conv signals come from the signal_projection operator, never from the unfolded
    receptive-field matrix.

    Args:
        model: the network.
        layer: a qualified module name.
        data: a tensor of inputs, an (x, y) pair, a DataLoader or an iterable of batches (streamed batch by batch;
            only the signals are kept).
        reduce: "mean" (default) or None, as above.
        batch_size: the batch size when data is given as tensors (default 256).
        progress: a bar over the batches (default True).

    Returns:
        A tensor (the DESIGN contract): (N, r) or, for reduce=None on a conv layer, (N, r, H', W').
    """
    if reduce not in (None, "mean"):
        raise ValueError(f"reduce must be None or 'mean', got {reduce!r}")
    bases = layer_bases(model, [layer], _example(data))
    out = []
    _stream(model, bases, data, reduce, batch_size, progress, lambda sig, y: out.append(sig[layer]))
    return torch.cat(out)


def _example(data, name="data"):
    """One input to trace the model with, from the data's first batch
    (validated: empty or dict data is refused here); None for a one-shot
    iterator, which must not be consumed: discover makes up its own input."""
    if isinstance(data, torch.Tensor) or (isinstance(data, (tuple, list)) and data
                                          and isinstance(data[0], torch.Tensor)):
        return first_batch(data, 1, name=name)[0]
    if not isinstance(data, Iterator):
        return first_batch(data, 1, name=name)[0][:1]  # refuses non-data; a list or DataLoader reads twice safely
    return None


@dataclass(frozen=True, eq=False)
class SignalVectors:
    """Signal vectors sigma_L(X) (seed 001 section 4.3) of every sample, per
    layer: vectors {layer: (N, r)}, labels (N,) or None; `.to_frame()` is one row per
    (layer, sample, index) with its signal (and label)."""

    vectors: dict
    labels: torch.Tensor | None

    def to_frame(self) -> pd.DataFrame:
        frames = []
        for layer, V in self.vectors.items():
            n, r = V.shape
            frame = pd.DataFrame({"layer": layer, "sample": np.repeat(np.arange(n), r),
                                  "index": np.tile(np.arange(r), n), "signal": V.double().reshape(-1).numpy()})
            if self.labels is not None:
                frame["label"] = np.repeat(self.labels.cpu().numpy(), r)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)


def signal_vectors(model: nn.Module, layers=None, data=None, batch_size: int = 256,
                   progress: bool = True) -> SignalVectors:
    """Signal vectors sigma_L(X) of every sample for several layers in one pass over the data.

    Seed 001 section 4.3, equation 16 averaged over receptive fields: the input of the hypergraphs of section 5.1.

    Args:
        model: the network.
        layers: a qualified module name or a list (default None: all Linear and Conv2d maps).
        data: any form spectral_ext._data.batches accepts (labels kept when it carries them).
        batch_size: the batch size when data is given as tensors (default 256).
        progress: a bar over the batches (default True).

    Returns:
        SignalVectors (vectors {layer: (N, r)}, labels (N,) or None).
    """
    if data is None:
        raise TypeError("signal_vectors() needs data: a tensor, an (x, y) pair, a DataLoader or batches")
    bases = layer_bases(model, layers, _example(data))
    out: dict[str, list] = {name: [] for name in bases}
    labels: list = []

    def consume(sig, y):
        for name, value in sig.items():
            out[name].append(value.detach().cpu())
        if y is not None:
            labels.append(y.cpu())

    _stream(model, bases, data, "mean", batch_size, progress, consume)
    vectors = {name: torch.cat(v) for name, v in out.items()}
    return SignalVectors(vectors, torch.cat(labels) if labels else None)


# ---------------------------------------------------------------------------------------------
# Hypergraphs and the semantic hierarchy (section 5)


@dataclass
class Hypergraph:
    """H^L of seed 001 section 5.1: nodes are singular vectors (indices into the
    layer's V), hyperedges are classes; incidence[c, k] says node nodes[k]
    belongs to hyperedge classes[c]. Empty hyperedges and nodes significant
    for no class are dropped."""
    layer: str
    q: float
    p: float
    threshold: float
    classes: list
    nodes: list
    incidence: np.ndarray = field(repr=False)

    def hyperedges(self) -> dict:
        return {c: [n for n, on in zip(self.nodes, row) if on] for c, row in zip(self.classes, self.incidence)}

    def equivalence_classes(self) -> dict[frozenset, list[int]]:
        """Equation 17: nodes with the same set of hyperedges."""
        groups: dict[frozenset, list[int]] = {}
        for k, node in enumerate(self.nodes):
            key = frozenset(c for c, on in zip(self.classes, self.incidence[:, k]) if on)
            groups.setdefault(key, []).append(node)
        return groups

    def semantic_hierarchy(self) -> nx.DiGraph:
        return semantic_hierarchy(self)

    def to_frame(self) -> pd.DataFrame:
        """Long incidence table: layer, class, node (one row per membership)."""
        rows = [{"layer": self.layer, "class": c, "node": n} for c, members in self.hyperedges().items()
                for n in members]
        return pd.DataFrame(rows, columns=["layer", "class", "node"])

    def plot(self, ax=None):
        from .plot import hypergraph as figure

        return figure(self, ax=ax)


def _fraction(p: float) -> float:
    p = _checks.number("p", p)
    if not 0 < p <= 100:
        raise ValueError(f"p must be a fraction in (0, 1] or a percentage in (1, 100], got {p!r}")
    return p / 100 if p > 1 else p


def hypergraph(vectors: torch.Tensor, labels: torch.Tensor, q: float = 0.85, p: float = 0.75,
               threshold: float | None = None, class_names=None, layer: str = "") -> Hypergraph:
    """The hypergraph of seed 001 section 5.1 from signal vectors (N, r) and labels.

    Args:
        vectors: the signal vectors (N, r) of the representative sample.
        labels: the class of each sample (N,).
        q: the threshold is the q-quantile of all signals in `vectors` (seed: 0.85 for conv2, 0.95 for fc1) unless
            an absolute `threshold` is given (default 0.85).
        p: a node belongs to class c's hyperedge when significant for at least p of the class's images (0.75 in the
            seed, the default; percentages accepted).
        threshold: an absolute signal threshold, used instead of the q-quantile (default None).
        class_names: names indexed by the labels, used for the hyperedges (default None: the labels).
        layer: the layer name recorded in the result (default "").

    Returns:
        A Hypergraph.
    """
    _checks.tensor("vectors", vectors, ndims=(2,), shape="(N, r)")
    if vectors.shape[0] == 0:
        raise ValueError("vectors holds no sample")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of shape ({vectors.shape[0]},), "
                        f"got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != (vectors.shape[0],):
        raise ValueError(f"labels must have shape ({vectors.shape[0]},) to match vectors, got {tuple(labels.shape)}")
    if _checks.data_free(vectors, labels):
        raise ValueError("vectors and labels must hold data (not meta tensors)")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(labels.min())}")
    q = _checks.number("q", q, low=0, high=1, low_open=True, high_open=True)
    if threshold is not None:
        threshold = _checks.number("threshold", threshold)
    p = _fraction(p)
    values = vectors.double().cpu().numpy()
    cut = float(np.quantile(values, q)) if threshold is None else float(threshold)
    significant = values > cut
    y = labels.cpu().numpy()
    classes = sorted(set(y.tolist()))
    if class_names is not None and (int(min(classes)) < 0 or int(max(classes)) >= len(class_names)):
        raise ValueError(f"labels must index class_names ({len(class_names)} names), got values in "
                         f"[{min(classes)}, {max(classes)}]")
    rates = np.stack([significant[y == c].mean(0) for c in classes])
    incidence = rates >= p
    keep_nodes = incidence.any(0)
    keep_classes = incidence.any(1)
    names = [class_names[c] if class_names is not None else c for c in classes]
    return Hypergraph(layer, q, p, cut, [n for n, k in zip(names, keep_classes) if k],
                      [int(i) for i in np.nonzero(keep_nodes)[0]], incidence[keep_classes][:, keep_nodes])


def hypergraph_family(vectors: torch.Tensor, labels: torch.Tensor, qs, ps, layer: str = "") -> dict:
    """Hypergraphs (seed 001 section 5.1) for every (q, p) in qs x ps from one set of signal vectors and labels.

    The pass over the data is shared, each member costs a quantile and a count.

    Args:
        vectors: the signal vectors (N, r).
        labels: the class of each sample (N,).
        qs: the quantiles q, as in hypergraph.
        ps: the class fractions p, as in hypergraph.
        layer: the layer name recorded in each result (default "").

    Returns:
        {(q, p): Hypergraph}.
    """
    return {(q, p): hypergraph(vectors, labels, q, p, layer=layer) for q in qs for p in ps}


def semantic_hierarchy(h: Hypergraph) -> nx.DiGraph:
    """Seed 001 section 5.2 as a DiGraph: one node per equivalence class of the hypergraph.

    An edge A -> B when A's class set strictly contains B's (A is more general, equation 18), reduced to its Hasse
    diagram (transitive reduction).

    Args:
        h: a Hypergraph.

    Returns:
        A networkx DiGraph; node attributes: classes (sorted tuple), members (singular vectors), size, label
        ("v<first> (<count>)" as in Fig. 6).
    """
    if not isinstance(h, Hypergraph):
        raise TypeError(f"h must be a Hypergraph (spectral_ext.hypergraph(...)), got {type(h).__name__}")
    groups = h.equivalence_classes()
    keys = sorted(groups, key=lambda s: (-len(s), sorted(map(str, s))))
    order = nx.DiGraph()
    for key in keys:
        members = groups[key]
        order.add_node(_label(members), classes=tuple(sorted(key, key=str)), members=members, size=len(members),
                       label=_label(members))
    for a in keys:
        for b in keys:
            if a != b and a > b:
                order.add_edge(_label(groups[a]), _label(groups[b]))
    hasse = nx.transitive_reduction(order)
    hasse.add_nodes_from(order.nodes(data=True))
    return hasse


def _label(members: list[int]) -> str:
    return f"v{members[0]} ({len(members)})"


# ---------------------------------------------------------------------------------------------
# Exemplary images (section 6) and feature visualisation (equations 19-20)


def exemplary_images(model: nn.Module, layer: str, data, targets, k: int = 8, batch_size: int = 256,
                     progress: bool = True) -> pd.DataFrame:
    """The dataset images whose signal vectors most strongly activate each target (seed 001 section 6).

    Streams the data keeping a running top-k per target.

    Args:
        model: the network.
        layer: a qualified module name.
        data: any form spectral_ext._data.batches accepts.
        targets: the targets; a target is a singular-vector index or a list of them (an equivalence class; its score
            is the sum of their signals).
        k: images kept per target (default 8).
        batch_size: the batch size when data is given as tensors (default 256).
        progress: a bar over the batches (default True).

    Returns:
        A DataFrame with columns target, rank, index (position in the data stream), score.
    """
    k = _checks.positive_int("k", k)
    if isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
        raise TypeError(f"targets must be a list of singular-vector indices or lists of them, got {targets!r}")
    targets = {(int(t) if isinstance(t, numbers.Integral) else tuple(_checks.integers("targets", t, low=0))):
               ([_checks.integer("targets", t, low=0)] if isinstance(t, numbers.Integral)
                else _checks.integers("targets", t, low=0)) for t in targets}
    if not targets:
        raise ValueError("targets is empty")
    bases = layer_bases(model, [layer], _example(data))
    best = {t: (torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long)) for t in targets}
    seen = [0]

    def consume(sig, y):
        vectors = sig[layer].double().cpu()
        index = torch.arange(seen[0], seen[0] + vectors.shape[0])
        seen[0] += vectors.shape[0]
        for t, members in targets.items():
            if max(members) >= vectors.shape[1]:
                raise ValueError(f"target {t} names a singular vector beyond the layer's {vectors.shape[1]}")
            scores = torch.cat([best[t][0], vectors[:, members].sum(1)])
            indices = torch.cat([best[t][1], index])
            top = scores.topk(min(k, len(scores)))
            best[t] = (top.values, indices[top.indices])

    _stream(model, bases, data, "mean", batch_size, progress, consume)
    rows = [{"target": t, "rank": r + 1, "index": int(i), "score": float(s)}
            for t, (scores, indices) in best.items() for r, (s, i) in enumerate(zip(scores, indices))]
    return pd.DataFrame(rows)


def _fourier_image(spectrum: torch.Tensor, shape) -> torch.Tensor:
    """Decorrelated parameterisation (Olah et al.): a spectrum scaled by
    1/frequency, inverse FFT, then a sigmoid to [0, 1]."""
    C, H, W = shape
    fy = torch.fft.fftfreq(H, dtype=spectrum.dtype)[:, None]
    fx = torch.fft.rfftfreq(W, dtype=spectrum.dtype)[None, :]
    scale = 1.0 / torch.sqrt(fx ** 2 + fy ** 2).clamp_min(1.0 / max(H, W))
    coefficients = torch.complex(spectrum[..., 0], spectrum[..., 1]) * scale
    image = torch.fft.irfft2(coefficients, s=(H, W), norm="ortho")
    return torch.sigmoid(image)


def _robust_transform(image: torch.Tensor, generator: torch.Generator, jitter: int, scale: float,
                      rotate: float) -> torch.Tensor:
    """Random jitter (roll), scaling and rotation (Olah et al.'s transformation
    robustness), drawn from `generator` so a seed fixes them."""
    if jitter:
        dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
        image = torch.roll(image, shifts=(dy, dx), dims=(-2, -1))
    if scale or rotate:
        s = 1.0 + (2 * float(torch.rand((), generator=generator)) - 1) * scale
        angle = math.radians((2 * float(torch.rand((), generator=generator)) - 1) * rotate)
        theta = torch.tensor([[s * math.cos(angle), -s * math.sin(angle), 0.0],
                              [s * math.sin(angle), s * math.cos(angle), 0.0]], dtype=image.dtype)
        grid = nn.functional.affine_grid(theta[None], list(image.shape), align_corners=False)
        image = nn.functional.grid_sample(image, grid, padding_mode="reflection", align_corners=False)
    return image


def feature_visualization(model: nn.Module, layer: str, nodes, shape, weights=None, steps: int = 256,
                          lr: float = 0.05, parameterization: str = "fourier", jitter: int = 1,
                          scale: float = 0.05, rotate: float = 5.0, generator=None,
                          progress: bool = True) -> torch.Tensor:
    """An input maximising sum_i w_i sum_j s_i v_i^T Psi(T_L)[j] (seed 001 equations 19-20).

    The maximum is over the singular vectors `nodes` of `layer`, with the transformation-robustness regularisers of
    Olah et al. (random jitter, scale and rotation each step) and a decorrelated Fourier ("fourier") or plain
    ("pixel") parameterisation squashed to [0, 1], optimised with Adam. The model runs in eval mode with its
    parameters frozen and is given back as it came.

    Args:
        model: the network.
        layer: a qualified module name.
        nodes: a singular-vector index or a list of them.
        shape: the image shape (C, H, W).
        weights: the w_i, one per node (default None: all 1).
        steps: optimisation steps (default 256; 0 gives the initial image).
        lr: the Adam learning rate (default 0.05).
        parameterization: "fourier" (default) or "pixel".
        jitter: the largest random shift, in pixels (default 1).
        scale: the largest random relative rescaling, in [0, 1) (default 0.05).
        rotate: the largest random rotation, in degrees (default 5.0).
        generator: None (torch's global RNG), an int seed or a torch.Generator, drawing the start and the transforms
            (generator=0 repeats a result).
        progress: a bar over the steps (default True).

    Returns:
        The image (C, H, W).
    """
    if parameterization not in ("fourier", "pixel"):
        raise ValueError(f"parameterization must be 'fourier' or 'pixel', got {parameterization!r}")
    nodes = _checks.integers("nodes", [nodes] if isinstance(nodes, numbers.Integral) else nodes, low=0)
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W), got {shape!r}")
    C, H, W = _checks.integers("shape", shape, low=1)
    shape = (C, H, W)
    steps = _checks.positive_int("steps", steps, allow_zero=True)  # 0: the initial image
    lr = _checks.number("lr", lr, low=0, low_open=True)
    jitter = _checks.integer("jitter", jitter, low=0)
    scale = _checks.number("scale", scale, low=0, high=1, high_open=True)
    rotate = _checks.number("rotate", rotate)
    g = _checks.generator(generator)
    bases = layer_bases(model, [layer], torch.zeros(1, C, H, W))
    basis = bases[layer]
    if max(nodes) >= basis.V.shape[1]:
        raise ValueError(f"nodes must index the layer's {basis.V.shape[1]} singular vectors, got {nodes}")
    w = torch.ones(len(nodes)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (len(nodes),):
        raise ValueError(f"weights must have one entry per node ({len(nodes)}), got shape {tuple(w.shape)}")
    if not _checks.all_finite(w):
        raise ValueError("weights contains NaN or infinite values")
    if parameterization == "fourier":
        param = (0.01 * torch.randn(C, H, W // 2 + 1, 2, generator=g)).requires_grad_()
        render = lambda: _fourier_image(param, shape)  # noqa: E731
    else:
        param = (0.01 * torch.randn(C, H, W, generator=g)).requires_grad_()
        render = lambda: torch.sigmoid(param)  # noqa: E731
    optimizer = torch.optim.Adam([param], lr=lr)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    restore = set_eval(model)
    from tqdm.auto import tqdm

    try:
        with capturing(model, [layer], inputs=True) as (captured, _):
            for _ in tqdm(range(steps), desc="feature visualisation", disable=not progress, leave=False):
                optimizer.zero_grad()
                image = _robust_transform(render()[None], g, jitter, scale, rotate)
                model(image)
                sig = _project(basis, captured[layer], None)
                per_node = sig[:, nodes].reshape(1, len(nodes), -1).sum(-1)[0]  # sum over positions j
                (-(w.to(per_node.dtype) * per_node).sum()).backward()
                optimizer.step()
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
        restore()
    return render().detach()

