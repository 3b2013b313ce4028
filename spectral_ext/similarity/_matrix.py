"""The layer-by-layer similarity matrix of two models (seed 004 section 5,
Fig. 2, 5, 9), every pair computed in one pass over the data; runs
transformers models on keyword inputs ({"input_ids": ...}) and reads
layers' tuples and Hugging Face outputs as their hidden states."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from .. import _checks
from .._hooks import activation_stream, check_layers, first_tensor
from ._hsic import MinibatchCKA, _check_kernel
from ._layout import _channels_of, _exponent, _layer_sample_axis, _samples_first, _scaled, layer_feature_axis
from ._procrustes import CrossMoments, _channel_sums, _check_group

def _layer_axes(model, layers, feature_axis, which):
    if isinstance(feature_axis, tuple):
        feature_axis = feature_axis[0 if which == "model_a" else 1]
    return {n: (feature_axis if feature_axis is not None else layer_feature_axis(model, n)) for n in layers}


@dataclass(frozen=True, eq=False)  # tensors have no single truth value
class SimilarityMatrix:
    """Result of similarity_matrix: one measure of every layer of `model`
    with every layer of `other`.

    measure: the measure's label (a spec string: "cka", "cka:kernel=max",
    "procrustes:group=grelu"); layers_a: model's layers (the rows);
    layers_b: other's (the columns); values: the (len(layers_a),
    len(layers_b)) float64 matrix, NaN where a pair cannot be compared."""

    measure: str
    layers_a: tuple[str, ...]
    layers_b: tuple[str, ...]
    values: torch.Tensor = field(repr=False)

    @property
    def matrix(self) -> pd.DataFrame:
        """The values as a DataFrame, model's layers as rows, other's as columns."""
        return pd.DataFrame(self.values.numpy(), index=pd.Index(list(self.layers_a), name="layer_a"),
                            columns=pd.Index(list(self.layers_b), name="layer_b"))

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows, one per pair in the order of the layers: layer_a
        (model's layer), layer_b (other's), measure, value (a pair table,
        README "Conventions")."""
        a, b = self.layers_a, self.layers_b
        return pd.DataFrame({"layer_a": [x for x in a for _ in b], "layer_b": [y for _ in a for y in b],
                             "measure": [self.measure] * (len(a) * len(b)),
                             "value": self.values.reshape(-1).tolist()})

    def plot(self, ax=None, title: str | None = None, annotate: bool | None = None):
        """Seed 004 Fig. 2/5: the matrix as a heatmap (plot.similarity_heatmap)."""
        from ..plot import similarity_heatmap

        return similarity_heatmap(self, ax=ax, title=title, annotate=annotate)


def similarity_matrix(model: nn.Module, other: nn.Module, layers=None, data=None, measure: str = "cka",
                      kernel: str = "linear", group: str = "orthogonal", unbiased: bool = True,
                      device=None, progress: bool = True, centered: bool = False,
                      feature_axis: int | tuple | None = None) -> SimilarityMatrix:
    """Similarity of every layer of `model` with every layer of `other` (seed 004 section 5, Fig. 2, 5, 9).

    The models run in eval mode (and are given back as they came), each activation is captured once per
    batch by forward hooks (one forward when other is model), reduced once (a U-centred Gram or centred
    features) and every pair is accumulated from those in the same pass.

    measure "cka" (minibatch CKA with `kernel`, unbiased by default: its estimate may dip slightly below
    0 for unrelated layers) or "procrustes" (exact over the whole data, with `group` and `centered`; NaN
    for pairs whose position counts, or channel counts for G_ReLU, differ), both streamed over the
    batches; or any other measure of similarity.MEASURES by name, spec string ("svcca:variance=0.95") or
    Measure: each layer's activations over all the data kept flattened (N, D) in float64, reduced once,
    and the pairs from the measure's batched matrix.

    A layer's output is read as its hidden states: a tensor, the first element of a tuple (transformers
    layers return (hidden states, attention weights)) or a Hugging Face output's last_hidden_state.
    Samples are its first axis (the second for a batch_first=False module); an output with k x B rows
    for a batch of B samples (Swin's window attention, (B windows, tokens, C)) is read as B samples whose
    windows are positions. Tokens and spatial positions are positions alike (appendix D.7). Errors name
    the layer and its model (`model` or `other`).

    Args:
        model: the first network.
        other: the second network (may be `model` itself).
        layers: module names present in both models, or a pair (layers_a, layers_b) (required).
        data: an iterable of input batches (or (input, label) tuples), a tensor or a DataLoader; or
            keyword inputs for a transformers model, run as model(**inputs): a dict of tensors batched
            along dim 0 ({"input_ids": ..., "attention_mask": ...}, {"pixel_values": ...}), or an iterable
            of such dicts (a DataLoader over a Hugging Face dataset); a "labels" entry is not passed to
            the models (spectral_ext._data).
        measure: "cka", "procrustes", or another measure as above (default "cka").
        kernel: the CKA kernel (default "linear").
        group: the Procrustes group, "orthogonal" or "grelu" (default "orthogonal").
        unbiased: the unbiased CKA estimator (default True).
        device: the device each batch is moved to (default None: left where it is).
        progress: a progress bar over the batches (default True).
        centered: Procrustes subtracts each channel's mean first (default False).
        feature_axis: by default read from each layer (a Linear, LayerNorm or attention: the last axis,
            so (B, T, C) tokens and (B, H, W, C) hidden states give C; a conv: axis 1; a Permute module
            moves it); an int, or a pair for the two models, overrides.

    Returns:
        A SimilarityMatrix (its measure's label, the layers, the values; .plot() draws it); .to_frame()
        has columns layer_a (model's layer), layer_b (other's), measure, value.
    """
    if data is None:
        raise TypeError("similarity_matrix() needs data: an iterable of batches, a tensor or a DataLoader")
    model_a, model_b = model, other
    from .measure import engine_label, engine_options, parse_spec

    generic = None  # a Measure other than the streamed CKA and Procrustes
    label = None  # the label of a Measure or spec given
    bandwidth, gamma = 0.5, None
    if not (isinstance(measure, str) and measure in ("cka", "procrustes")):
        generic = parse_spec(measure)
        label = generic.label
        engine = engine_options(generic)
        if engine is not None:  # streamed below, with the measure's options
            measure, generic = engine.pop("measure"), None
            kernel, unbiased = engine.get("kernel", kernel), engine.get("unbiased", unbiased)
            bandwidth, gamma = engine.get("bandwidth", bandwidth), engine.get("gamma", gamma)
            group, centered = engine.get("group", group), engine.get("centered", centered)
    if generic is not None:
        pass
    elif measure == "cka":
        _check_kernel(kernel)
    else:
        _check_group(group)
    if layers is None or not isinstance(layers, (str, list, tuple)):
        raise TypeError(f"layers must be a module name or a list of them, got {type(layers).__name__}")
    if isinstance(layers, tuple) and len(layers) == 2 and not isinstance(layers[0], str):
        layers_a, layers_b = list(layers[0]), list(layers[1])
    else:
        layers_a = layers_b = [layers] if isinstance(layers, str) else list(layers)
    layers_a, layers_b = check_layers(model_a, layers_a), check_layers(model_b, layers_b, "other")
    axes_a = _layer_axes(model_a, layers_a, feature_axis, "model_a")
    axes_b = _layer_axes(model_b, layers_b, feature_axis, "model_b")
    shared = model_a is model_b
    same = shared and layers_a == layers_b and axes_a == axes_b
    accumulator = MinibatchCKA(kernel, unbiased, bandwidth, gamma) if measure == "cka" and generic is None else None
    if generic is not None:  # each layer's flattened activations over all the data, then reduced once
        kept_a = {n: [] for n in layers_a}
        kept_b = kept_a if same else {n: [] for n in layers_b}
    if measure == "procrustes":  # float64 running sums: each layer's once, each pair's cross products
        sums_a = {n: _channel_sums() for n in layers_a}
        sums_b = sums_a if same else {n: _channel_sums() for n in layers_b}
        moments = {(a, b): CrossMoments(sums_a[a], sums_b[b]) for a in layers_a for b in layers_b}
        scales_a = {}
        scales_b = scales_a if same else {}
    seen = 0
    sample_axes_a = {n: _layer_sample_axis(model_a, n) for n in layers_a}
    sample_axes_b = {n: _layer_sample_axis(model_b, n) for n in layers_b}
    for x, n, cap_a, cap_b in activation_stream(model_a, model_b, layers_a, layers_b, data, device=device,
                                                desc="similarity matrix", progress=progress):
        if generic is not None:
            for kept, cap, names, axes, name in ((kept_a, cap_a, layers_a, sample_axes_a, "model"),
                                                 (None if same else kept_b, cap_b, layers_b, sample_axes_b,
                                                  "other")):
                for m in names if kept is not None else ():
                    R = _samples_first(name, m, first_tensor(cap[m]), n, axes[m])[0]
                    kept[m].append(R.reshape(n, -1).to("cpu", torch.float64))
            seen += n
            continue
        reps_a = [_channels_of("model", m, cap_a[m], axes_a[m], True, n, sample_axes_a[m]) for m in layers_a]
        reps_b = None if same else [_channels_of("other", m, cap_b[m], axes_b[m], True, n, sample_axes_b[m])
                                    for m in layers_b]
        if measure == "cka":
            if n < 4:
                continue  # the unbiased estimator needs 4 samples; a tiny last batch adds nothing
            accumulator._add(reps_a, reps_b)  # checked above, naming the layer
        else:
            reps_a = _at_common_scale(reps_a, layers_a, sums_a, scales_a, moments, (0, 1) if same else (0,))
            reps_b = reps_a if same else _at_common_scale(reps_b, layers_b, sums_b, scales_b, moments, (1,))
            for m, R in zip(layers_a, reps_a):
                sums_a[m].update(R)
            if not same:
                for m, R in zip(layers_b, reps_b):
                    sums_b[m].update(R)
            for i, a in enumerate(layers_a):
                for j, b in enumerate(layers_b):
                    X, Y = reps_a[i], reps_b[j]
                    if X.shape[2] == Y.shape[2] and (group == "orthogonal" or X.shape[1] == Y.shape[1]):
                        moments[(a, b)].update(X, Y)
        seen += n
    if seen == 0:
        raise ValueError("data produced no usable batch")
    if generic is not None:
        return SimilarityMatrix(label, *_generic_matrix(generic, kept_a, kept_b, same))
    if label is None:
        label = engine_label(measure, kernel, unbiased, bandwidth, gamma, group, centered)
    if measure == "cka":
        values = accumulator.value([f"model layer {n!r}" for n in layers_a],
                                   [f"other layer {n!r}" for n in layers_b]).to("cpu", torch.float64)
    else:  # NaN where the pair cannot be compared (channel or position counts differ)
        values = torch.tensor([[moments[(a, b)].procrustes(group, centered)[0] if moments[(a, b)].count
                                else float("nan") for b in layers_b] for a in layers_a], dtype=torch.float64)
    return SimilarityMatrix(label, tuple(layers_a), tuple(layers_b), values)


def _generic_matrix(m, kept_a, kept_b, same) -> tuple:
    """similarity_matrix's layers and values for a Measure: every layer's
    activations (N, D) reduced once, the model x other block of one batched
    matrix. Returns (layers_a, layers_b, values)."""
    from .measure import reduced as reduce_one

    def reduced(kept, name):
        return {layer: reduce_one(m, f"{name}'s layer {layer!r}", torch.cat(parts)) for layer, parts in kept.items()}

    red_a = reduced(kept_a, "model")
    red_b = red_a if same else reduced(kept_b, "other")
    names_a, names_b = list(red_a), list(red_b)
    values = m.matrix([red_a[n] for n in names_a] + ([] if same else [red_b[n] for n in names_b]))
    offset = 0 if same else len(names_a)
    block = values[:len(names_a), offset:offset + len(names_b)].to(torch.float64)
    return tuple(names_a), tuple(names_b), block.contiguous()


def _at_common_scale(reps, layers, sums, scales, moments, sides) -> list:
    """One batch's representations of `layers`, each divided by its layer's
    power of two (scales: {layer: the largest _exponent seen}; the Procrustes
    measures are scale invariant, their float64 sums of squares are not).
    Where a batch raises a layer's exponent by d, its running sums are
    divided by 2^d (squares by 2^2d) and so is every cross product with it
    on one of `sides` (0: the pair's first layer, 1: its second)."""
    out = []
    for n, R in zip(layers, reps):
        e, old = _exponent(R), scales.get(n)
        if old is not None and e > old:
            d = e - old
            if sums[n].sum is not None:
                sums[n].sum.copy_(_scaled(sums[n].sum, d))
                sums[n].second.copy_(_scaled(sums[n].second, 2 * d))
            for pair, cross in moments.items():
                for side in sides:
                    if pair[side] == n and cross.ab is not None:
                        cross.ab.copy_(_scaled(cross.ab, d))
        scales[n] = e if old is None else max(e, old)
        out.append(_scaled(R, scales[n]))
    return out


# ---------------------------------------------------------------------------------------------
