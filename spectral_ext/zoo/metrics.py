"""Zoo metrics: per-model spectral metrics batched over the models of one
architecture, and pairwise measures on a probe dataset."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import spectra
from .._data import copy_inputs, sample_count
from .._hooks import capturing, check_layers, evaluating, models_in_eval_mode
from ._base import METRICS, WEIGHT_METRICS, ZooError, ZooTables, pair_measures
from .members import _collector_paused, _Members, all_finite_states, module_tensors

# ---------------------------------------------------------------------------------------------
# Per-model metrics, batched over models of one architecture


def _signature(graph) -> tuple:
    return tuple((name, tuple(m.module.weight.shape)) for name, m in graph.maps.items())


@models_in_eval_mode
def model_metrics(models: dict[str, nn.Module], metrics=("rank", "alpha"), example_input=None,
                  dtype=torch.float64, convention: spectra.PowerLawConvention | str = "seed001", min_tail: int = 10,
                  graphs=None) -> ZooTables:
    """Per-model metrics for {name: model}, batched per architecture.

    "rank": per layer numerical_rank (seed 003 equation 4, float32 tolerance), stable_rank, spectral_norm,
    lambda_max; "alpha": the power-law alpha of the ESD per layer (seed 001; a note says why a fit is
    missing) and alpha_hat per model (spectra.alpha_hat's rule: seed 001's sum, or WeightWatcher's mean
    alpha_weighted with convention="weightwatcher"); "svr": per edge the internal dimensions and
    significant-edge count of the SVR (seed 000), via svr_many. Every layer's spectrum is computed once
    for all of these, one batched call per layer over the models of a group, and the power-law fits of a
    layer run together over the group (spectra.map_metrics, the computation spectra.layer_spectra makes
    for one model).

    Args:
        models: {name: nn.Module}.
        metrics: among "rank", "alpha", "svr" (default ("rank", "alpha")).
        example_input: an input for tracing each architecture's dataflow, as layers.discover takes
            (default None: made up there).
        dtype: the dtype the weights are stacked in for the spectra (default torch.float64).
        convention: a spectra.PowerLawConvention or its name (default "seed001").
        min_tail: the fewest eigenvalues a power-law tail may have (default 10).
        graphs: each member's ModelGraph, when the caller traced them (a zoo run traces each architecture
            once; models is then only looked up for the SVR) (default None: traced here).

    Returns:
        ZooTables (models, layers, edges; no pairs).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ZooError(f"unknown metrics {unknown}; choose among {METRICS}")
    convention = spectra.power_law_convention(convention)
    if graphs is None:  # one dataflow trace per architecture (same class and parameter shapes)
        members = _Members(models.items(), None, False, example_input)
        # one finiteness check for them all; one per member (naming it) only when it fails
        states = {name: module_tensors(model) for name, model in models.items()}
        finite = all_finite_states(states.values())
        with _collector_paused():
            graphs = {name: members.bind(name, model, finite, states[name])[0] for name, model in models.items()}
    groups: dict[tuple, list[str]] = {}
    keys = {}  # graphs of one trace (ModelGraph.for_model, a zoo run's bind) share their connections and key
    for name, graph in graphs.items():
        key = keys.get(id(graph.connections))
        if key is None:
            key = keys[id(graph.connections)] = _group_key(graph)
        groups.setdefault(key, []).append(name)
    layer_parts, model_parts, edge_rows = [], [], []
    fit = "alpha" in metrics
    columns = ["numerical_rank", "stable_rank", "spectral_norm", "lambda_max"] + \
        (["alpha", "xmin", "ks", "n_tail", "note"] if fit else [])
    for members in groups.values():
        first = graphs[members[0]]
        layers, count = list(first.maps), len(members)
        # every layer of every member in one call, batched per weight shape (spectra.map_metrics); its rows
        # are layer-major, the tables' model-major; a group's members share every layer's kind and shape
        values = spectra.map_metrics([graphs[n].maps[layer] for layer in layers for n in members],
                                     [f"{layer} of {n}" for layer in layers for n in members], convention,
                                     min_tail, fit, dtype) if "rank" in metrics or fit else pd.DataFrame()
        model_major = np.arange(len(layers) * count).reshape(len(layers), count).T.ravel()
        shapes = [_map_shape(first.maps[layer]) for layer in layers]
        part = pd.DataFrame({"model": np.repeat(members, len(layers)), "layer": layers * count,
                             "kind": [first.maps[layer].kind for layer in layers] * count,
                             "rows": [shape[0] for shape in shapes] * count,
                             "columns": [math.prod(shape[1:]) for shape in shapes] * count})
        for column in columns:
            if column in values:
                part[column] = values[column].to_numpy()[model_major]
        layer_parts.append(part)
        summary = pd.DataFrame({"model": members, "architecture": _arch_id(first), "n_layers": len(layers),
                                "error": ""})
        if fit:
            alphas = values["alpha"].to_numpy(dtype=np.float64).reshape(len(layers), count).T
            lambda_max = values["lambda_max"].to_numpy(dtype=np.float64).reshape(len(layers), count).T \
                if "lambda_max" in values else np.full_like(alphas, np.nan)
            summary["alpha_hat"] = spectra.alpha_hats(alphas, lambda_max, convention)
            summary["n_alpha_layers"] = (~np.isnan(alphas)).sum(1)  # how many layers alpha_hat used (notes say why)
        model_parts.append(summary)
        if "svr" in metrics:
            from ..spectral_neurons import svr_many

            # the members' graphs as bound and checked above: svr_many binds and checks none again
            results = svr_many([models[n] for n in members], example_input, graphs=[graphs[n] for n in members])
            for n, result in zip(members, results):
                for k, (a, b) in enumerate(result.edges):
                    d_out, d_in = result.internal_dimensions(k)
                    edge_rows.append({"model": n, "previous": a, "next": b, "d_out": d_out, "d_in": d_in,
                                      "n_significant": int(result.significant(k).sum()),
                                      "threshold": float(result.threshold(k))})
    return ZooTables(models=_concat(model_parts), layers=_concat(layer_parts), edges=pd.DataFrame(edge_rows))


RANK_COLUMNS = ("numerical_rank", "stable_rank", "spectral_norm", "lambda_max")
ALPHA_COLUMNS = ("alpha", "xmin", "ks", "n_tail")


def weight_model_metrics(members, metrics=("rank", "alpha"), convention: spectra.PowerLawConvention | str = "seed001",
                         min_tail: int = 10, memory: int | None = None, progress: bool = False,
                         embeddings: bool = False) -> ZooTables:
    """Per-model metrics of {name: source} from the weights alone: no architecture, no forward.

    The zoo's route without arch. Every weight of two or more dimensions is a row; the members' weights go
    through one spectra.weight_metrics call, which batches the weights of one shape across members into
    Gram eigvalsh calls of at most `memory` bytes of float64, reading one tensor at a time: the peak is
    about that budget and a few copies of the largest weight, never a whole model. Raises ValueError
    naming the file and tensor for a NaN or infinite weight or an unreadable one.

    Args:
        members: {name: source}, source anything weights.read_weights takes (a checkpoint file, a Hugging
            Face model or PEFT LoRA folder, a state_dict, a module) or its list of WeightTensor entries.
        metrics: among WEIGHT_METRICS; others need the models' dataflow (ZooError, argument "arch")
            (default ("rank", "alpha")).
        convention: a spectra.PowerLawConvention or its name, for alpha_hat (default "seed001").
        min_tail: the fewest eigenvalues a power-law tail may have (default 10).
        memory: bytes of float64 per batched eigvalsh call (default None: spectra.WEIGHT_MEMORY).
        progress: a bar over the bytes read (default False).
        embeddings: count the embeddings in alpha_hat (default False: left out).

    Returns:
        ZooTables with model_metrics' columns where they apply: layers (model, layer, kind, rows, columns,
        source (file:tensor), numerical_rank, stable_rank, spectral_norm, lambda_max, with "alpha" alpha,
        xmin, ks, n_tail; and a note: a quantised or integer tensor, a tied head, a fit with too few
        eigenvalues), the numbers of spectra.layer_spectra of each member; models (model, architecture: a
        hash of the layers' names, kinds and shapes, n_layers, error, with "alpha" alpha_hat by
        spectra.alpha_hat's rule, embeddings left out unless embeddings=True, and n_alpha_layers, the
        layers it used).
    """
    from .. import weights

    dataflow = [m for m in metrics if m not in WEIGHT_METRICS]
    if dataflow:
        raise ZooError(f"the metrics {dataflow} run the models: pass arch to build them (from the weights alone: "
                       f"{list(WEIGHT_METRICS)})", argument="arch")
    convention = spectra.power_law_convention(convention)
    entries_of = {}
    for name, source in members.items():
        entries = list(source) if isinstance(source, (list, tuple)) else weights.read_weights(source, name=str(name))
        entries_of[str(name)] = [e for e in entries if e.kind != "vector"]
    flat = [e for entries in entries_of.values() for e in entries]
    fit = "alpha" in metrics
    memory = memory if memory is not None else spectra.WEIGHT_MEMORY  # read now: a run may lower the budget
    values = spectra.weight_metrics(flat, convention, min_tail, fit=fit, memory=memory, progress=progress) \
        if flat else pd.DataFrame(columns=["note"])
    counts = [len(entries) for entries in entries_of.values()]
    layers = pd.DataFrame({"model": np.repeat(list(entries_of), counts).astype(object),
                           "layer": [e.layer for e in flat], "kind": [e.kind for e in flat],
                           "rows": [int(e.shape[0]) for e in flat], "columns": [int(e.shape[1]) for e in flat],
                           "source": [e.source for e in flat]})
    for column in RANK_COLUMNS + (ALPHA_COLUMNS if fit else ()):
        layers[column] = values[column].to_numpy() if column in values else np.nan
    layers["note"] = values["note"].to_numpy() if len(values) else ""
    summary = pd.DataFrame({"model": list(entries_of), "architecture": [_weights_id(e) for e in entries_of.values()],
                            "n_layers": counts, "error": ""})
    if fit:
        hats, used, start = [], [], 0
        for count in counts:
            part = layers.iloc[start:start + count]
            start += count
            part = part if embeddings else part[part["kind"] != "embedding"]
            alpha = part["alpha"].to_numpy(dtype=np.float64)
            hats.append(spectra.alpha_hat_of(alpha, part["lambda_max"].to_numpy(dtype=np.float64), convention))
            used.append(int((~np.isnan(alpha)).sum()))
        summary["alpha_hat"], summary["n_alpha_layers"] = hats, used
    return ZooTables(models=summary, layers=layers, edges=pd.DataFrame())


def _weights_id(entries) -> str:
    return hashlib.sha1(repr([(e.layer, e.kind, tuple(e.shape), e.groups) for e in entries]).encode()).hexdigest()[:10]


def _concat(frames) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _map_shape(linear_map) -> torch.Size:
    module = linear_map.module
    return linear_map.weight().shape if getattr(module, "groups", 1) > 1 else module.weight.shape


def _group_key(graph) -> tuple:
    """Members analysed together: the same maps with the same kinds and weight shapes (and so the same table rows)."""
    return tuple((name, m.kind, getattr(m.module, "groups", 1), tuple(m.module.weight.shape))
                 for name, m in graph.maps.items())


def _arch_id(graph) -> str:
    return hashlib.sha1(repr(_signature(graph)).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# Pairwise metrics on a probe dataset


def _activations(model, probe, layers):
    """The layers' outputs on the probe (a dict: keyword inputs). Hidden
    states (N, tokens, features), and those whose features the model puts
    elsewhere than axis 1 (Swin's (B, H, W, C)), are laid out as
    similarity_matrix reads them, (N, C, positions, 1): the measures take
    axis 1 of a 4-D tensor as its channels, where a 3-D one is ambiguous."""
    from ..similarity._layout import _channels_of, _layer_sample_axis, layer_feature_axis

    layers = check_layers(model, layers)
    with capturing(model, layers) as (captured, _), torch.no_grad(), evaluating(model):
        inputs = copy_inputs(probe)
        model(**inputs) if isinstance(inputs, dict) else model(inputs)
        out = {}
        for n in layers:
            R, axis = captured[n].detach().double(), layer_feature_axis(model, n)
            if R.dim() == 3 or (R.dim() > 3 and axis is not None and axis % R.dim() != 1):
                R = _channels_of("model", n, R, axis, False, sample_count(inputs),
                                 _layer_sample_axis(model, n)).unsqueeze(-1)
            out[n] = R
        return out


def _is_keywords(value) -> bool:
    """A dict of keyword inputs ({"input_ids": ..., "attention_mask": ...}) with one batch axis."""
    tensors = [v for v in value.values() if isinstance(v, torch.Tensor)] if isinstance(value, dict) else []
    return bool(tensors) and all(t.dim() and t.shape[0] == tensors[0].shape[0] for t in tensors)


def probe_parts(probe) -> tuple:
    """Split a probe into its inputs and labels.

    Anything else raises ZooError.

    Args:
        probe: a tensor, a dict of keyword inputs (a "labels" entry taken out as the labels, never passed
            to the model), or an (x, y) pair of either and a label tensor.

    Returns:
        (inputs, labels or None).
    """
    if isinstance(probe, torch.Tensor):
        return probe, None
    if _is_keywords(probe):
        return {k: v for k, v in probe.items() if k != "labels"}, probe.get("labels")
    if isinstance(probe, (tuple, list)) and len(probe) == 2 and isinstance(probe[1], torch.Tensor) and (
            isinstance(probe[0], torch.Tensor) or _is_keywords(probe[0])):
        return probe[0], probe[1]
    raise ZooError("probe must be an input tensor, a dict of keyword input tensors with one batch axis "
                   "({'input_ids': ...}), or an (inputs, labels) pair of them")


def _labelled(x, y, rows: slice):
    """The probe's rows as stitch's labelled data: (inputs, labels), or keyword inputs with their
    labels under "labels"."""
    if isinstance(x, dict):
        return {**{k: v[rows] for k, v in x.items()}, "labels": y[rows]}
    return x[rows], y[rows]


class ActivationCache:
    """Probe activations per model, kept across pair chunks so each model is
    run on the probe once per process, up to max_bytes (least recently
    used entries go first)."""

    def __init__(self, max_bytes: int = 2 << 30):
        from collections import OrderedDict

        self.max_bytes, self.entries, self.size = max_bytes, OrderedDict(), 0

    def get(self, name: str, compute) -> dict:
        if name in self.entries:
            self.entries.move_to_end(name)
            return self.entries[name]
        value = compute()
        self.entries[name] = value
        self.size += _nbytes(value)
        while self.size > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.size -= _nbytes(old)
        return value


def _nbytes(value) -> int:
    """The bytes of the tensors in a cached value: activations {layer: tensor}, a Gram, or a measure's
    reduction (a tensor, or an object, tuple or dict holding tensors)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(map(_nbytes, value.values()))
    if isinstance(value, (tuple, list)):
        return sum(map(_nbytes, value))
    if hasattr(value, "__dict__"):
        return _nbytes(vars(value))
    if hasattr(value, "__slots__"):
        return sum(_nbytes(getattr(value, k, None)) for k in value.__slots__)
    return 0


def pair_metrics(models: dict[str, nn.Module], pairs=None, probe=None, layers=None, measures=("cka",),
                 stitch_options: dict | None = None, cache: ActivationCache | None = None,
                 progress: bool = True, max_memory: int | None = None) -> pd.DataFrame:
    """For each pair of models and each layer, the chosen measures on the probe.

    Any similarity measure by its spec (similarity.MEASURES: "cka", "cka:kernel=max" (G_ReLU-CKA, seed
    004 section 5), "procrustes", "procrustes:group=grelu", "svcca", "rsa", "mutual_knn:k=5", ...; the
    `measure` column holds its canonical label) and "stitching": the stitching penalty (seed 004 equation
    4.3) of a layer trained on the first half of a labelled probe ((x, y)) and measured on the second
    half. Each model runs on the probe once (once per run with a shared cache; models then need only be
    present for what the cache lacks); per layer and measure each model's centred Gram (kept in the cache
    too) or normalised features is computed once and all pairs come from batched products
    (similarity.pairwise_similarity), within max_memory bytes in blocks of models when they do not all
    fit; the cache keeps the Grams only when all of them fit (otherwise each block's are recomputed).

    Args:
        models: {name: nn.Module}.
        pairs: (a, b) names (default None: all K(K-1)/2 unordered pairs of models, the zoo's K x K).
        probe: an input tensor, a dict of keyword inputs, or (inputs, labels) (see probe_parts); required.
        layers: a non-empty list of module names.
        measures: measure specs and "stitching" (default ("cka",)).
        stitch_options: options for stitching.stitch (default None: affine, 5 epochs, lr 0.01).
        cache: an ActivationCache shared across calls (default None).
        progress: a tqdm bar over the forwards and the batched (layer, measure) steps (default True).
        max_memory: bytes for the batched products (default None: half the free memory).

    Returns:
        A DataFrame with rows model_a, model_b, layer, measure, value.
    """
    from tqdm.auto import tqdm

    from ..similarity._pairwise import pairwise_similarity

    if not isinstance(models, dict):
        raise ZooError(f"models must be a dict {{name: model}}, got {type(models).__name__}")
    if probe is None:
        raise ZooError("pair_metrics needs a probe: an input tensor or (inputs, labels)")
    if layers is None or isinstance(layers, str) or not len(layers):
        raise ZooError("layers must be a non-empty list of module names")
    measures = pair_measures(measures)
    names = list(models)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]] if pairs is None else \
        [tuple(p) for p in pairs]
    x, y = probe_parts(probe)
    if "stitching" in measures and y is None:
        raise ZooError("the stitching measure needs a labelled probe: (inputs, labels)")
    needed = sorted({n for pair in pairs for n in pair})
    cache = cache if cache is not None else ActivationCache()
    key = tuple(layers)
    batched_measures = [m for m in measures if m != "stitching"]
    steps = len(needed) + len(layers) * len(batched_measures) + len(pairs) * ("stitching" in measures)
    with tqdm(total=steps, desc="pair metrics", disable=not progress, leave=False, mininterval=0,
              miniters=1) as bar:
        acts = {}
        for n in needed:  # each model's probe activations once
            acts[n] = cache.get((n, key), lambda n=n: _activations(models[n], x, layers))
            bar.update(1)
        batched = {}
        for layer in (acts[needed[0]] if needed else {}):
            for measure in batched_measures:
                result = pairwise_similarity({n: acts[n][layer] for n in needed}, pairs, progress=False,
                                             share=lambda n, options, compute, layer=layer:
                                             cache.get((n, key, layer) + options, compute),
                                             max_memory=max_memory, measure=measure)
                batched.update({(a, b, layer, measure): v for (a, b), v in zip(result.pairs, result.values)})
                bar.update(1)
        options = {"kind": "affine", "epochs": 5, "lr": 0.01, **(stitch_options or {})}
        options.setdefault("generator", 0)  # a zoo run's penalties repeat
        half = sample_count(x) // 2
        rows = []
        for a, b in pairs:
            for layer in acts[a]:
                for measure in measures:
                    if measure == "stitching":
                        from ..stitching import stitch

                        value = stitch(models[a], models[b], layer, data=_labelled(x, y, slice(None, half)),
                                       test_data=_labelled(x, y, slice(half, None)),
                                       progress=False, **options).penalty
                    else:
                        value = batched[(a, b, layer, measure)]
                    rows.append({"model_a": a, "model_b": b, "layer": layer, "measure": measure,
                                 "value": float(value)})
            if "stitching" in measures:
                bar.update(1)
    return pd.DataFrame(rows, columns=["model_a", "model_b", "layer", "measure", "value"])
