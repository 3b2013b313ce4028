"""Latent dimensions (seed 002): activation and weight covariances, their
spectra against initialisation and the Marchenko-Pastur law, clipping to
the top-k principal components, orthogonal alignment of two networks, and
generated ("rainbow") networks sampled from trained weight covariances.

Representations are the inputs of named modules (the tensors their weights
act on, as in the seed's hooks). Conv features are (B, C, H, W): channels
are the feature axis, positions extra samples; token features (B, T, d)
likewise take T as samples."""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import _checks, _moments
from ._data import accuracy as _accuracy
from ._data import batches as _batches
from ._data import check_labels, first_batch, recompute_batchnorm, sample_count
from ._hooks import activation_stream, check_layers, check_model, evaluating, models_in_eval_mode, replacing
from .layers import discover


def space_to_batch(x: torch.Tensor, feature_axis: int | None = None) -> torch.Tensor:
    """Flattens the spatial or token axes of a representation into samples (seed 002's space_to_batch).

    (B, C, *spatial) -> (B * prod(spatial), C); (B, d) unchanged; (B, T, d) for Linear inputs -> (B T, d).

    Args:
        x: the representation, (B, d), (B, T, d) or (B, C, *spatial).
        feature_axis: where the features are (default None: 1, the last axis for 3-D inputs); -1 for the
            (B, H, W, C) inputs of a Linear (torchvision Swin's MLP).

    Returns:
        A 2-D tensor (samples, features); x itself when it is already 2-D.
    """
    if x.dim() == 2:
        return x
    if feature_axis is None:
        feature_axis = -1 if x.dim() == 3 else 1
    return x.movedim(feature_axis, -1).reshape(-1, x.shape[feature_axis])


@dataclass
class Covariance:
    """Sums accumulated in float64 over a stream: count, the means and the
    second moments of representation a, of b (b is a itself for one model)
    and between them. Uncentred E[a b^T] as seed 002 by default; centred on
    request."""
    count: int
    sum_a: torch.Tensor
    sum_b: torch.Tensor
    aa: torch.Tensor
    bb: torch.Tensor
    ab: torch.Tensor

    def cross(self, center: bool = False) -> torch.Tensor:
        """E[a b^T] (C_a, C_b), or the centred cross-covariance."""
        m = self.ab / self.count
        return m - torch.outer(self.sum_a, self.sum_b) / self.count ** 2 if center else m

    def cov_a(self, center: bool = False) -> torch.Tensor:
        m = self.aa / self.count
        return m - torch.outer(self.sum_a, self.sum_a) / self.count ** 2 if center else m

    def cov_b(self, center: bool = False) -> torch.Tensor:
        m = self.bb / self.count
        return m - torch.outer(self.sum_b, self.sum_b) / self.count ** 2 if center else m


@dataclass
class Covariances(Mapping):
    """activation_covariance's result (seed 002
    compute_activation_covariances): one Covariance per layer, read as
    result[layer] (a mapping, as the dict it used to be), and a summary
    table."""
    layers: dict[str, Covariance]

    def __getitem__(self, layer: str) -> Covariance:
        return self.layers[layer]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: layer, n_samples, n_features (model's), n_other_features (other's, the same
        representation for one model), trace and other_trace (tr E[a a^T], tr E[b b^T])."""
        return pd.DataFrame([{"layer": name, "n_samples": c.count, "n_features": c.aa.shape[0],
                              "n_other_features": c.bb.shape[0], "trace": float(torch.trace(c.cov_a())),
                              "other_trace": float(torch.trace(c.cov_b()))} for name, c in self.layers.items()])


class _Accumulator:
    """Products in `dtype` (default the activations' own, as the DESIGN asks:
    every computation in the input dtype), summed in float64 by the shared
    _moments accumulator. For one model the three second moments are one
    matrix. Batches wider than tall are buffered up to BUFFER elements and
    multiplied together: one larger GEMM and one float64 accumulation
    instead of many (the d x d accumulation, not the GEMM, dominated at
    4096 features)."""

    BUFFER = 1 << 24

    def __init__(self, dtype=None):
        self.dtype = dtype
        self.moments = None  # a Moments for one model, a CrossMoments for two
        self.same = True
        self.buffers = None  # (rows for a, rows for b): one copy of each batch, then one GEMM per fill
        self.filled = 0

    def update(self, a: torch.Tensor, b: torch.Tensor, axis_a: int | None = None, axis_b: int | None = None) -> None:
        same = a is b
        a = space_to_batch(a, axis_a)
        a = a.to(self.dtype) if self.dtype is not None else a
        b = a if same else space_to_batch(b, axis_b).to(a.dtype)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"the two representations hold {a.shape[0]} and {b.shape[0]} samples: "
                             "the models must see the same inputs and share the spatial layout")
        if self.moments is None and self.buffers is None:
            self.same = same
            self.moments = _moments.Moments(full=True) if same else _moments.CrossMoments(full=True)
        if a.shape[1] <= a.shape[0] and self.buffers is None:
            # batches taller than wide: accumulating each product costs less than copying the batch
            self._add(a, b)
            return
        if self.buffers is None:
            rows = max(1, self.BUFFER // (a.shape[1] + (0 if same else b.shape[1])))
            self.buffers = (a.new_empty(rows, a.shape[1]), None if same else b.new_empty(rows, b.shape[1]))
        start = 0
        while start < a.shape[0]:  # copies: a later in-place operation of the model cannot alter them
            take = min(a.shape[0] - start, self.buffers[0].shape[0] - self.filled)
            self.buffers[0][self.filled:self.filled + take] = a[start:start + take]
            if not self.same:
                self.buffers[1][self.filled:self.filled + take] = b[start:start + take]
            self.filled += take
            start += take
            if self.filled == self.buffers[0].shape[0]:
                self._flush()

    def _flush(self) -> None:
        if not self.filled:
            return
        a = self.buffers[0][:self.filled]
        self._add(a, a if self.same else self.buffers[1][:self.filled])
        self.filled = 0

    def _add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.same:
            self.moments.add_rows(a)
        else:
            self.moments.add_rows(a, b)

    def result(self) -> Covariance:
        if self.moments is not None:
            self._flush()
        if self.moments is None or not self.moments.count:
            raise ValueError("the data produced no batch")
        m, kept = self.moments, {}

        def normal(t):  # sums made under inference mode (the activation stream) become ordinary tensors, once
            if id(t) not in kept:
                kept[id(t)] = t.clone() if t.is_inference() else t
            return kept[id(t)]

        if self.same:
            return Covariance(m.count, *map(normal, (m.sum, m.sum, m.second, m.second, m.second)))
        return Covariance(m.count, *map(normal, (m.a.sum, m.b.sum, m.a.second, m.b.second, m.ab)))


def _input_axis(module: nn.Module) -> int | None:
    """The feature axis of a layer's input: the last for a Linear (and
    transformers' Conv1D, a LayerNorm), 1 for a conv or BatchNorm; for a
    container, that of its first such module (a transformers block starts
    with a LayerNorm or a Linear); None (space_to_batch's default) when
    nothing says."""
    from .similarity._layout import _module_axis

    for m in module.modules():
        axis = _module_axis(m)
        if axis is not None and not isinstance(m, (nn.Embedding, nn.modules.pooling._AdaptiveAvgPoolNd,
                                                   nn.modules.pooling._AdaptiveMaxPoolNd,
                                                   nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                                                   nn.Upsample)):
            return axis
    return None


def _check_samples(name: str, layer: str, a: torch.Tensor, x) -> None:
    """A captured input holds the batch's samples on its first axis (or k
    rows per sample: Swin's windows, which space_to_batch makes samples
    anyway)."""
    n = sample_count(x)
    if a.dim() == 0 or a.shape[0] == 0 or a.shape[0] % n:
        raise ValueError(f"{name}'s layer {layer!r} receives {tuple(a.shape)} for a batch of {n} samples: its "
                         "first axis does not hold the samples (a position embedding, the same for every "
                         "sample); choose another layer")


def activation_covariance(model: nn.Module, other: nn.Module | None = None, layers=None, data=None,
                          other_layers=None, batch_size: int = 256, dtype=None,
                          progress: bool = True) -> Covariances:
    """Streaming (cross-)covariances of the inputs of `layers` (seed 002 compute_activation_covariances).

    The covariances are accumulated in float64 in one pass over `data`. A layer's input is its first positional
    argument or its hidden_states keyword; its features are the last axis for a Linear (tokens (B, T, d) and
    (B, H, W, C) inputs give d and C, the other axes samples), axis 1 for a conv. With `other`, the
    cross-covariance between model's and other's representations on the same inputs. Each batch's products run
    in the activations' dtype and are summed in float64. One model: (model, None, layers, data).

    Args:
        model: the network (a torch.nn.Module).
        other: a second network for cross-covariances, or None (default) for one model.
        layers: a module name or a list of them, whose inputs are the representations.
        data: a tensor, an (x, y) pair, a DataLoader or an iterable of batches; or keyword inputs for a
            transformers model, a dict of tensors batched along dim 0 such as {"input_ids": ...,
            "attention_mask": ...}, or an iterable of such dicts, run as model(**inputs), a "labels" entry
            left out.
        other_layers: other's layers paired with `layers` (default None: the same names).
        batch_size: rows per batch for tensor data (a loader keeps its own batches; default 256).
        dtype: the dtype the products run in (default None: the activations' own; torch.float64 to run them
            in float64).
        progress: show a progress bar (default True).

    Returns:
        Covariances, a mapping {layer: Covariance} (call .cross(), .cov_a(), .cov_b(); center=True for centred
        covariances) with .to_frame().
    """
    check_model("model", model)
    if other is not None and not isinstance(other, nn.Module):
        raise TypeError(f"other must be a torch.nn.Module or None (the order is (model, other, layers, data)), "
                        f"got {type(other).__name__}")
    if data is None:
        raise TypeError("activation_covariance() needs data: a tensor, an (x, y) pair or a DataLoader")
    if layers is None or not isinstance(layers, (str, list, tuple)):
        raise TypeError(f"layers must be a module name or a list of them, got {type(layers).__name__}")
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise ValueError("layers is empty")
    other_layers = layers if other_layers is None else ([other_layers] if isinstance(other_layers, str)
                                                        else list(other_layers))
    if len(other_layers) != len(layers):
        raise ValueError("other_layers must pair one layer of `other` with each of `layers`")
    _checks.positive_int("batch_size", batch_size)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    accumulators = {n: _Accumulator(dtype) for n in layers}
    layers = check_layers(model, layers)
    other_layers = check_layers(other, other_layers, "other") if other is not None else layers
    axes_a = {n: _input_axis(model.get_submodule(n)) for n in layers}
    axes_b = {n: _input_axis(other.get_submodule(n)) for n in other_layers} if other is not None else axes_a
    for x, _, cap_a, cap_b in activation_stream(model, other, layers, other_layers, data, inputs=True,
                                                batch_size=batch_size, desc="activation covariance",
                                                progress=progress):
        for a_name, b_name in zip(layers, other_layers):
            _check_samples("model", a_name, cap_a[a_name], x)
            if other is not None:
                _check_samples("other", b_name, cap_b[b_name], x)
            accumulators[a_name].update(cap_a[a_name], cap_b[b_name], axes_a[a_name], axes_b[b_name])
    results = {}
    for a_name, b_name in zip(layers, other_layers):
        result = accumulators[a_name].result()
        # finite inputs can still overflow inside a model: name the layer rather than return NaN
        if not all(map(_checks.all_finite, (result.aa, result.bb, result.ab))):
            where = a_name if other is None else f"{a_name} (model) / {b_name} (other)"
            raise ValueError(f"the activations at layer {where} hold NaN or infinite values on finite data: "
                             "the model overflows there")
        results[a_name] = result
    return Covariances(results)


# ---------------------------------------------------------------------------------------------
# Spectra and the Marchenko-Pastur law


def activation_spectrum(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (decreasing) and eigenvectors (rows) of a covariance (seed 002, the activation-spectrum cells).

    Args:
        cov: a symmetric (d, d) covariance; computed in float64.

    Returns:
        (eigenvalues (d,), eigenvectors (d, d) as rows), both in decreasing order of eigenvalue.
    """
    values, vectors = torch.linalg.eigh(cov.double())
    return values.flip(0), vectors.flip(1).T


def weight_spectrum(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of the weight covariance W^T W / n.

    W = weight.reshape(n, -1); computed from the SVD (seed 002's route when n << d).

    Args:
        weight: a layer's weight, (n, ...) with n output units; detached and computed in float64.

    Returns:
        (eigenvalues s^2 / n (decreasing), eigenvectors (rows, input space)), min(n, d) of each.
    """
    W = weight.detach().reshape(weight.shape[0], -1).double()
    _, s, vh = torch.linalg.svd(W, full_matrices=False)
    return s.square() / W.shape[0], vh


def marchenko_pastur_edges(n: int, d: int, variance: float) -> tuple[float, float]:
    """Support [lambda_-, lambda_+] of the Marchenko-Pastur law that seed 002 compares trained spectra with.

    The law of the eigenvalues of W^T W / n for an n x d matrix of i.i.d. entries of the given variance:
    variance (1 -+ sqrt(d / n))^2 (lambda_- = 0 when d > n, plus the zero eigenvalues).

    Args:
        n: rows of the matrix (a positive int).
        d: columns of the matrix (a positive int).
        variance: the entries' variance (positive).

    Returns:
        (lambda_-, lambda_+) as floats.
    """
    n, d = _checks.integer("n", n, low=1), _checks.integer("d", d, low=1)
    variance = _checks.number("variance", variance, low=0, low_open=True)
    ratio = d / n
    return variance * max(0.0, 1 - math.sqrt(ratio)) ** 2, variance * (1 + math.sqrt(ratio)) ** 2


def marchenko_pastur_density(x, n: int, d: int, variance: float) -> np.ndarray:
    """Density of the non-zero part of the Marchenko-Pastur law for W^T W / n (seed 002's reference spectrum).

    It integrates to min(1, n / d).

    Args:
        x: the points to evaluate at (array-like).
        n: rows of the matrix.
        d: columns of the matrix.
        variance: the entries' variance.

    Returns:
        A float64 numpy array of x's shape, zero outside the support.
    """
    x = np.asarray(x, dtype=np.float64)
    lo, hi = marchenko_pastur_edges(n, d, variance)
    ratio = d / n
    inside = (x > lo) & (x < hi)
    density = np.zeros_like(x)
    density[inside] = np.sqrt((hi - x[inside]) * (x[inside] - lo)) / (2 * math.pi * variance * ratio * x[inside])
    return density


@models_in_eval_mode
def weight_spectra(model: nn.Module, other: nn.Module | None = None, example_input=None,
                   variance="init", progress: bool = True) -> pd.DataFrame:
    """Seed 002's weight-covariance analysis with the Marchenko-Pastur law, for every linear map.

    Its weight-spectrum cells: eigenvalues against initialisation, and per layer the Marchenko-Pastur upper
    edge for its aspect ratio and the count of eigenvalues above it (the "learned" components).

    Args:
        model: the trained network.
        other: the same model at initialisation, or None (default).
        example_input: an input for discovering the linear maps (layers.discover).
        variance: "init" (default: the entry variance of other's layer, or PyTorch's default 1 / (3 fan_in)
            without one), "empirical" (of the layer itself) or a number.
        progress: show a progress bar (default True).

    Returns:
        A DataFrame, one row per (layer, rank) with columns layer, rank, eigenvalue (s^2 / n), init_eigenvalue
        (same layer of `other`, NaN without one), mp_upper_edge, n_learned, n, d (plot.weight_spectra draws one
        layer).
    """
    if other is not None:
        check_model("other", other)
    if not (isinstance(variance, str) and variance in ("init", "empirical")):
        if isinstance(variance, str):
            raise ValueError(f"variance must be 'init', 'empirical' or a positive number, got {variance!r}")
        variance = _checks.number("variance", variance, low=0, low_open=True)
    from tqdm.auto import tqdm

    graph = discover(model, example_input)
    init_graph = discover(other, example_input) if other is not None else None
    rows = []
    for name, m in tqdm(graph.maps.items(), desc="weight spectra", disable=not progress, leave=False):
        W = m.matrix(dtype=torch.float64)
        n, d = W.shape
        eig, _ = weight_spectrum(W)
        init_eig = None
        if init_graph is not None:
            if name not in init_graph.maps or init_graph.maps[name].matrix().shape != W.shape:
                raise ValueError(f"other has no layer {name!r} of shape {tuple(W.shape)}")
            W0 = init_graph.maps[name].matrix(dtype=torch.float64)
            init_eig, _ = weight_spectrum(W0)
        if variance == "init":
            var = float(W0.square().mean()) if init_graph is not None else 1.0 / (3 * d)
        elif variance == "empirical":
            var = float(W.square().mean())
        else:
            var = float(variance)
        _, edge = marchenko_pastur_edges(n, d, var)
        learned = int((eig > edge).sum())
        for k, value in enumerate(eig.tolist()):
            rows.append({"layer": name, "rank": k + 1, "eigenvalue": value,
                         "init_eigenvalue": float(init_eig[k]) if init_eig is not None else float("nan"),
                         "mp_upper_edge": edge, "n_learned": learned, "n": n, "d": d})
    return pd.DataFrame(rows)


def stability(E1: torch.Tensor, E2: torch.Tensor, alignment: torch.Tensor | None = None) -> torch.Tensor:
    """|E1 A E2^T|: cosines between eigenvectors (rows) of two networks, as in seed 002's stability plots.

    Args:
        E1: eigenvectors of the first network as rows, (k1, C_a).
        E2: eigenvectors of the second network as rows, (k2, C_b).
        alignment: the alignment A (C_a, C_b), or None (default: the identity).

    Returns:
        A float64 tensor (k1, k2) of absolute cosines.
    """
    _checks.tensor("E1", E1, ndims=(2,), shape="(k1, C_a)", data=True)
    _checks.tensor("E2", E2, ndims=(2,), shape="(k2, C_b)", data=True)
    width = E1.shape[1] if alignment is None else (_checks.tensor("alignment", alignment, ndims=(2,),
                                                                   shape="(C_a, C_b)").shape)
    if alignment is not None and width[0] != E1.shape[1]:
        raise ValueError(f"alignment must have shape ({E1.shape[1]}, C_b) to act on E1's rows, "
                         f"got {tuple(alignment.shape)}")
    if (E1.shape[1] if alignment is None else width[1]) != E2.shape[1]:
        raise ValueError(f"E2's rows have {E2.shape[1]} entries, E1's (after the alignment) "
                         f"{E1.shape[1] if alignment is None else width[1]}")
    E1, E2 = E1.double(), E2.double()
    middle = E1 if alignment is None else E1 @ alignment.double()
    return (middle @ E2.T).abs()


# ---------------------------------------------------------------------------------------------
# Alignment


def align(cross_cov: torch.Tensor, cov_a: torch.Tensor | None = None,
          cov_b: torch.Tensor | None = None) -> tuple[torch.Tensor, float | None]:
    """The orthogonal alignment of seed 002.

    With E[a b^T] = U Sigma V^T, A = U V^T minimises E|A^T a - b|^2 (equivalently a ~ A b), and
    r^2 = tr Sigma / (sqrt(E|a|^2) sqrt(E|b|^2)) is the explained fraction.

    Args:
        cross_cov: the cross-covariance E[a b^T], (C_a, C_b).
        cov_a: E[a a^T], (C_a, C_a), or None (default); needed for r2, with cov_b.
        cov_b: E[b b^T], (C_b, C_b), or None (default); needed for r2, with cov_a.

    Returns:
        (A (C_a, C_b), r2 or None).
    """
    _checks.tensor("cross_cov", cross_cov, ndims=(2,), shape="(C_a, C_b)", data=True)
    if (cov_a is None) != (cov_b is None):
        raise ValueError("cov_a and cov_b go together: pass both for r2, or neither")
    U, S, Vh = torch.linalg.svd(cross_cov.double(), full_matrices=False)
    A = U @ Vh
    if cov_a is None:
        return A, None
    return A, alignment_r2(A, cross_cov, cov_a, cov_b)


def alignment_r2(A: torch.Tensor, cross_cov: torch.Tensor, cov_a: torch.Tensor, cov_b: torch.Tensor) -> float:
    """r^2 of an alignment A on (possibly held-out) covariances (seed 002, the explained fraction).

    tr(A^T E[a b^T]) / sqrt(tr E[a a^T] tr E[b b^T]) (the seed's note: on a test set); equals tr Sigma / ... on
    the data A was fitted on, lies in [-1, 1] and in [0, 1] there.

    Args:
        A: the alignment, (C_a, C_b).
        cross_cov: E[a b^T], (C_a, C_b).
        cov_a: E[a a^T], (C_a, C_a).
        cov_b: E[b b^T], (C_b, C_b).

    Returns:
        r^2 as a float.
    """
    _checks.tensor("cross_cov", cross_cov, ndims=(2,), shape="(C_a, C_b)", data=True)
    C_a, C_b = cross_cov.shape
    for name, value, shape in (("A", A, (C_a, C_b)), ("cov_a", cov_a, (C_a, C_a)), ("cov_b", cov_b, (C_b, C_b))):
        _checks.tensor(name, value, ndims=(2,), shape=str(shape), data=True)
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match cross_cov {(C_a, C_b)}, "
                             f"got {tuple(value.shape)}")
    for name, value in (("cov_a", cov_a), ("cov_b", cov_b)):
        if float(torch.diagonal(value).min()) < 0:
            raise ValueError(f"{name} must be a covariance E[x x^T]: its diagonal has a negative entry")
    denominator = math.sqrt(float(torch.trace(cov_a.double())) * float(torch.trace(cov_b.double())))
    if denominator == 0:
        raise ValueError("a representation is identically zero: r^2 is undefined")
    return float(torch.trace(A.double().T @ cross_cov.double())) / denominator


# ---------------------------------------------------------------------------------------------
# Clipping


@dataclass(frozen=True)
class Clipping:
    """Result of clip (seed 002 clipping): the accuracy after projecting the
    representation at `layer` onto its top-k principal components.

    layer: the clipped layer; basis: "activation", "weight" or "given" (a
    tensor of rows); ks: the k evaluated, in order; accuracies: one per k."""

    layer: str
    basis: str
    ks: tuple[int, ...]
    accuracies: tuple[float, ...]

    def to_frame(self) -> pd.DataFrame:
        """One row per k: columns k, accuracy."""
        return pd.DataFrame({"k": list(self.ks), "accuracy": list(self.accuracies)})

    def plot(self, ax=None, label: str | None = None):
        """Accuracy against k (plot.clipping)."""
        from .plot import clipping

        return clipping(self, ax=ax, label=label)


def clip(model: nn.Module, layer: str, data, ks, basis="activation", covariance: torch.Tensor | None = None,
         batch_size: int = 256, max_copies: int = 32, progress: bool = True) -> Clipping:
    """Accuracy after projecting the representation at `layer` onto its top-k
    principal components, for every k in ks (seed 002 clipping).

    basis="activation": the input of `layer` is projected on the top-k
    eigenvectors of its (uncentred) activation covariance over channels
    (`covariance`, or computed from `data` in a first pass). basis="weight":
    the layer's weight becomes W P_k with P_k the projector on its top-k
    weight-covariance eigenvectors (input space; receptive fields for a
    conv), exactly as the seed. A (d, d) tensor is taken as a ready basis
    (rows = eigenvectors in order) for the activation clipping.

    The forward pass up to the layer is shared by all k: each batch goes
    through the prefix once and the layer's hook hands the rest of the
    network up to max_copies stacked copies (one per k). Models whose later
    layers also read earlier tensors (residual connections across the
    layer) are evaluated one k at a time instead, with a warning.

    Args:
        model: the classifier.
        layer: the qualified name of the clipped module.
        data: (x, y) tensors, a DataLoader or an iterable of labelled batches, for the accuracy (and the
            covariance when not given).
        ks: the numbers of principal components to keep (non-negative ints).
        basis: "activation" (default), "weight" or a (d, d) tensor of rows.
        covariance: the layer input's (d, d) activation covariance, or None (default: computed from data).
        batch_size: rows per batch for tensor data (a loader keeps its own batches; default 256).
        max_copies: the most copies of the rest of the network run together (default 32).
        progress: show a progress bar (default True).

    Returns:
        A Clipping (layer, basis, ks, accuracies; .plot() draws it);
        .to_frame() has columns k, accuracy."""
    check_model("model", model)
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules or layer == "":
        raise ValueError(f"layer {layer!r} names no submodule of the model")
    module = modules[layer]
    ks = _checks.integers("ks", ks, low=0)
    batch_size = _checks.positive_int("batch_size", batch_size)
    max_copies = _checks.positive_int("max_copies", max_copies)
    if covariance is not None:
        _checks.tensor("covariance", covariance, ndims=(2,), shape="(d, d)")
        if covariance.shape[0] != covariance.shape[1]:
            raise ValueError(f"covariance must be square (d, d), got {tuple(covariance.shape)}")
    if isinstance(basis, torch.Tensor):
        _checks.tensor("basis", basis, ndims=(2,), shape="(d, d) rows of eigenvectors")
        rows, kind = basis.double(), "activation"
    elif basis == "activation":
        if covariance is None:
            covariance = activation_covariance(model, None, [layer], data, batch_size=batch_size,
                                               progress=progress)[layer].cov_a()
        rows, kind = activation_spectrum(covariance)[1], "activation"
    elif basis == "weight":
        if not hasattr(module, "weight") or getattr(module, "groups", 1) != 1:
            raise ValueError(f"basis='weight' needs a Linear or ungrouped Conv layer, got {layer!r}")
        rows, kind = weight_spectrum(module.weight)[1], "weight"
    else:
        raise ValueError(f"basis must be 'activation', 'weight' or a tensor of rows, got {basis!r}")
    if any(not 0 <= k <= rows.shape[0] for k in ks):
        raise ValueError(f"ks must lie in [0, {rows.shape[0]}], got {ks}")
    projectors = torch.stack([rows[:k].T @ rows[:k] for k in ks])  # (K, d, d)
    with evaluating(model):
        try:
            accuracies = _clip_shared(model, layer, kind, projectors, data, batch_size, max_copies, progress)
        except RuntimeError as error:  # a later layer reads a tensor from before the clipped one
            warnings.warn(f"clip: the layers after {layer!r} could not run on stacked copies ({error}); "
                          "evaluating one k at a time", RuntimeWarning, stacklevel=2)
            accuracies = [_clip_shared(model, layer, kind, projectors[i:i + 1], data, batch_size, 1, progress)[0]
                          for i in range(len(ks))]
    return Clipping(layer, "given" if isinstance(basis, torch.Tensor) else basis, tuple(ks), tuple(accuracies))


def _clip_shared(model, layer, kind, projectors, data, batch_size, max_copies, progress=False):
    from tqdm.auto import tqdm

    correct = torch.zeros(len(projectors), dtype=torch.long)
    total = 0
    for start in range(0, len(projectors), max_copies):
        P = projectors[start:start + max_copies]
        K = len(P)
        if kind == "activation":
            def hook(m, args, P=P, K=K):
                x = args[0]
                Pc = P.to(x.dtype).to(x.device)
                # features: axis 1 of conv inputs, the last axis of Linear inputs (tokens included)
                channel_first = x.dim() > 2 and not isinstance(m, nn.Linear)
                moved = x.movedim(1, -1) if channel_first else x
                if moved.shape[-1] != Pc.shape[-1]:
                    raise ValueError(f"the basis or covariance is {Pc.shape[-1]} x {Pc.shape[-1]} but the "
                                     f"input of the layer has {moved.shape[-1]} features")
                projected = torch.einsum("...c,kdc->k...d", moved, Pc)
                projected = projected.movedim(-1, 2) if channel_first else projected
                return (projected.reshape(K * x.shape[0], *x.shape[1:]),) + tuple(args[1:])
            hooked = replacing(model, layer, hook, inputs=True)  # the stacked, projected copies
        else:
            def hook(m, args, output, P=P, K=K):
                x = args[0]
                W = m.weight.reshape(m.weight.shape[0], -1)
                clipped = torch.einsum("od,kde->koe", W.double(), P).to(W.dtype).reshape(K * W.shape[0],
                                                                                          *m.weight.shape[1:])
                if isinstance(m, nn.Linear):
                    out = torch.einsum("...i,koi->k...o", x, clipped.reshape(K, W.shape[0], -1))
                else:
                    conv = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}[x.dim() - 2]
                    out = conv(x, clipped, None, m.stride, m.padding, m.dilation, m.groups)
                    out = out.reshape(x.shape[0], K, W.shape[0], *out.shape[2:]).movedim(1, 0)
                if m.bias is not None:
                    out = out + m.bias.reshape((1, 1, -1) + (1,) * (out.dim() - 3))
                return out.reshape(K * x.shape[0], *out.shape[2:])
            hooked = replacing(model, layer, hook)  # the copies' clipped weights
        with hooked, torch.no_grad():
            for x, y in tqdm(_batches(data, batch_size, labels=True), desc=f"clip k={len(P)} at a time",
                             disable=not progress, leave=False):
                logits = model(x)
                if logits.shape[0] != K * x.shape[0]:
                    raise RuntimeError("the model's output does not carry the stacked copies")
                check_labels(y, logits.shape[-1], "data")
                predictions = logits.reshape(K, x.shape[0], -1).argmax(-1)
                correct[start:start + K] += (predictions == y[None]).sum(1).cpu()
                if start == 0:
                    total += len(y)
    return (correct.double() / total).tolist()


# ---------------------------------------------------------------------------------------------
# Generated ("rainbow") networks


def _chain(graph):
    """The linear maps in forward order, each reading only the previous one."""
    names = list(graph.maps)
    inputs: dict[str, list] = {}
    for c in graph.connections:
        inputs.setdefault(c.next, []).append(c)
    for previous, name in zip(names, names[1:]):
        sources = inputs.get(name, [])
        if len(sources) != 1 or sources[0].previous != previous:
            raise ValueError(f"rainbow networks need a chain of linear maps; {name!r} reads "
                             f"{[c.previous for c in sources]} instead of just {previous!r} (residual or "
                             "branching architectures are not supported)")
    return names


def _realign_columns(weight: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """W (out, reference inputs) -> W' (out, generated inputs) with the
    alignment A (C_ref, C_gen) of the layer's input: W'[:, g] = sum_r W[:, r]
    A[r, g] (the seed's contract(W, A^T, axis=1)). For a Linear, A covers
    its input features (flattened conv features included, as in the seed);
    for a conv, its input channels, at every kernel tap."""
    if weight.dim() == 2:
        return (weight.double() @ A.double()).to(weight.dtype)
    blocks = weight.double().reshape(weight.shape[0], weight.shape[1], -1)
    return torch.einsum("ork,rg->ogk", blocks, A.double()).reshape(weight.shape).to(weight.dtype)


@dataclass
class Rainbow:
    """A generated network of seed 002 (generate_network) and how it compares:
    `model` the generated copy, `r2` the explained fraction of each aligned
    layer's alignment on the training data, and the accuracies on
    test_data (None without it)."""
    model: nn.Module
    r2: dict[str, float]
    reference_accuracy: float | None = None
    generated_accuracy: float | None = None

    def to_frame(self) -> pd.DataFrame:
        """One row per aligned layer: layer, r2."""
        return pd.DataFrame({"layer": list(self.r2), "r2": [float(v) for v in self.r2.values()]})

    def plot(self, ax=None):
        """The r2 of each aligned layer, with the accuracies in the title (plot.rainbow)."""
        from . import plot

        return plot.rainbow(self, ax=ax)


@models_in_eval_mode
def rainbow(model: nn.Module, data, test_data=None, example_input=None, generator=None,
            batch_size: int = 256, progress: bool = True) -> Rainbow:
    """A generated network (seed 002 generate_network).

    Layer by layer, each hidden map's neurons are drawn from N(0, W^T W / n), the trained weight covariance
    (with the bias as an extra input column when present), realigned to the generated inputs with the
    cross-covariance alignment of the previous layer, BatchNorm statistics recomputed; the trained classifier
    (the last map) is kept and realigned. The maps must form a chain (no residual or branching architectures).

    Args:
        model: the trained reference.
        data: (x, y) tensors or a loader, used for the alignments.
        test_data: for the accuracies, or None (default).
        example_input: an input for discovering the linear maps (default None: data's first batch).
        generator: the draws' randomness (None: torch's global generator, an int seeds one).
        batch_size: rows per batch for tensor data (a loader keeps its own batches; default 256).
        progress: show a progress bar (default True).

    Returns:
        A Rainbow (model, r2 per aligned layer, reference_accuracy, generated_accuracy; .to_frame(), .plot()).
    """
    reference = model
    check_model("model", reference)
    g = _checks.generator(generator)
    batch_size = _checks.positive_int("batch_size", batch_size)
    x0, y0 = first_batch(data, name="data")  # a clear error for empty or dict data
    if y0 is not None:
        check_labels(y0, name="data")
    graph = discover(reference, example_input if example_input is not None else x0)
    names = _chain(graph)
    generated = copy.deepcopy(reference).eval()
    generated_graph = graph.for_model(generated)
    alignment = None
    r2 = {}
    from tqdm.auto import tqdm

    for j, name in enumerate(tqdm(names, desc="rainbow", disable=not progress, leave=False)):
        module = generated_graph.maps[name].module
        if getattr(module, "groups", 1) != 1:
            raise ValueError(f"{name} is a grouped convolution: not supported by rainbow")
        reference_module = graph.maps[name].module
        weight = reference_module.weight.detach().double()
        W = weight.reshape(weight.shape[0], -1)
        bias = reference_module.bias.detach().double() if reference_module.bias is not None else None
        if j < len(names) - 1:
            joint = torch.cat([W, bias[:, None]], 1) if bias is not None else W
            _, s, vh = torch.linalg.svd(joint, full_matrices=False)
            white = torch.randn(joint.shape[0], s.shape[0], generator=g, dtype=torch.float64)
            sampled = white @ ((s / math.sqrt(joint.shape[0]))[:, None] * vh)  # rows ~ N(0, W^T W / n)
            new_weight = sampled[:, :W.shape[1]].reshape(weight.shape)
            new_bias = sampled[:, -1] if bias is not None else None
        else:
            new_weight, new_bias = weight, bias
        if alignment is not None:
            new_weight = _realign_columns(new_weight, alignment)
        with torch.no_grad():
            module.weight.copy_(new_weight.to(module.weight.dtype))
            if new_bias is not None:
                module.bias.copy_(new_bias.to(module.bias.dtype))
        recompute_batchnorm(generated, generated, data, batch_size, name="data")
        if j < len(names) - 1:
            following = names[j + 1]
            cov = activation_covariance(reference, generated, [following], data, batch_size=batch_size,
                                        progress=False)[following]
            alignment, r2[following] = align(cov.cross(), cov.cov_a(), cov.cov_b())
    result = Rainbow(generated, r2)
    if test_data is not None:
        result.reference_accuracy = _accuracy(reference, test_data, batch_size, name="test_data")
        result.generated_accuracy = _accuracy(generated, test_data, batch_size, name="test_data")
    return result
