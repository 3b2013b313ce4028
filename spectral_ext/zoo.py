"""Model zoos: hundreds to thousands of checkpoints analysed in batches, with
results written incrementally so an interrupted run resumes, and sharded
over processes under torchrun.

Per-model metrics (one row per model x layer, or model x edge for the SVR)
run batched over models of one architecture: the SVDs of a layer are one
call on the stacked weights of every model. Pairwise metrics (CKA,
Procrustes) run on a probe dataset with each model's activations captured
once. Results go to <out>/chunks/<id>/<table>.<csv|parquet>, one folder per
finished chunk, made visible by an atomic rename: a killed run leaves no
partial rows, and a resumed one skips every model or pair already in a
finished chunk. Rank 0 merges the chunks into <out>/<table>.<fmt> and writes
<out>/report.md with figures."""
from __future__ import annotations

import collections
import collections.abc
import contextlib
import gc
import hashlib
import importlib
import json
import math
import os
import pathlib
import pickle
import random
import tempfile
import time
from collections.abc import Callable

import pandas as pd
import torch
from torch import nn

from . import _checks
from ._hooks import capturing, check_layers, evaluating
from .layers import discover
from . import spectra
from .zoo_generator import make_digits_zoo, manifest_defaults  # noqa: F401  (spectral_ext.zoo.make_digits_zoo)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")
TABLES = ("models", "layers", "edges", "pairs")
METRICS = ("rank", "alpha", "svr")
PAIR_MEASURES = ("cka", "grelu_cka", "procrustes", "grelu_procrustes", "stitching")


class ZooError(ValueError):
    """Bad zoo input: a missing path, an unknown architecture, no members."""


# ---------------------------------------------------------------------------------------------
# Members


def resolve_arch(arch) -> Callable[[], nn.Module] | None:
    """An architecture factory from "package.module:function", a torchvision
    model name, or a callable; None when checkpoints hold whole modules."""
    if arch is None or callable(arch):
        return arch
    if not isinstance(arch, str) or not arch:
        raise ZooError(f"arch must be 'package.module:function', a torchvision model name or a callable, got {arch!r}")
    if ":" in arch:
        module_name, _, function = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as error:
            raise ZooError(f"unknown architecture {arch!r}: {error}") from error
        if not callable(factory):
            raise ZooError(f"architecture {arch!r} is not callable")
        return factory
    try:
        import torchvision
    except ImportError as error:
        raise ZooError(f"unknown architecture {arch!r} (torchvision is not installed)") from error
    if arch not in torchvision.models.list_models():
        raise ZooError(f"unknown architecture {arch!r}: not 'package.module:function' and not a torchvision "
                       "model name")
    return lambda: torchvision.models.get_model(arch, weights=None)


def list_members(source) -> list[tuple[str, object]]:
    """(name, path or module) for a folder of checkpoints (searched
    recursively, hidden entries skipped), a list of paths, or a list/dict of
    nn.Modules; sorted by name for a deterministic order.

    A checkpoint is named by its path relative to the folder without the
    suffix ("cnn_00", "seed_1/epoch_3"); where two files would share a name
    (a.pt and a.safetensors) both are kept, each named with its suffix
    ("a.pt", "a.safetensors"). Names are strings, never missing values: a
    member may be called "NA" or "None"."""
    if isinstance(source, dict):
        items = [(str(k), v) for k, v in source.items()]
    elif isinstance(source, (str, os.PathLike)):
        if str(source) == "":
            raise ZooError("source must name a folder or file of checkpoints, got ''")
        root = pathlib.Path(source)
        if not root.exists():
            raise ZooError(f"no such checkpoint folder or file: {root}")
        if root.is_file():
            items = [(root.stem, root)]
        else:
            paths = [p for p in root.rglob("*") if p.suffix in CHECKPOINT_SUFFIXES and p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(root).parts)]
            items = _relative_names(root, paths)
    else:
        items = []
        for k, item in enumerate(source):
            if isinstance(item, nn.Module):
                items.append((f"model_{k:05d}", item))
            else:
                path = pathlib.Path(item)
                if not path.exists():
                    raise ZooError(f"no such checkpoint: {path}")
                items.append((str(path.with_suffix("")), path))
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})[:5]
        raise ZooError(f"two members share a name: {twice}")
    if not items:
        raise ZooError(f"no checkpoints ({', '.join(CHECKPOINT_SUFFIXES)}) or models in {source!r}")
    return sorted(items, key=lambda item: item[0])


def _relative_names(root: pathlib.Path, paths) -> list[tuple[str, pathlib.Path]]:
    relative = [p.relative_to(root) for p in paths]
    stems = [r.with_suffix("").as_posix() for r in relative]
    clash = {s for s in stems if stems.count(s) > 1} if len(set(stems)) != len(stems) else set()
    return [(r.as_posix() if s in clash else s, p) for r, s, p in zip(relative, stems, paths)]


_MMAP_BYTES = 4 << 20  # below this a file is read whole (faster for tiny checkpoints), above it memory-mapped


def read_checkpoint(source, allow_pickle: bool = False):
    """The state_dict (or, with allow_pickle, the module) a checkpoint
    holds: safetensors files memory-mapped (read whole when small), torch
    files with torch.load(mmap=True). Raises ValueError with the reason."""
    path = pathlib.Path(source)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load, load_file

            state = load_file(str(path)) if path.stat().st_size > _MMAP_BYTES else load(path.read_bytes())
        else:
            big = path.stat().st_size > _MMAP_BYTES
            try:
                state = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=big)
            except RuntimeError as error:
                if not big or "mmap" not in str(error):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)  # legacy format
    except Exception as error:  # corrupt or truncated files raise many kinds of errors
        first_line = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        if isinstance(error, pickle.UnpicklingError) and not allow_pickle:
            first_line = "not a valid state_dict file (a whole pickled module needs allow_pickle for trusted files)"
        raise ValueError(f"unreadable checkpoint ({type(error).__name__}: {first_line})") from error
    if isinstance(state, nn.Module):
        return state
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"the checkpoint holds a {type(state).__name__}, not a state_dict of tensors")
    return state


def check_finite(state: dict[str, torch.Tensor]):
    """ValueError naming the first floating tensor (weights and buffers such
    as BatchNorm's running_var) that holds a NaN or an infinity."""
    floats = [(k, v) for k, v in state.items() if v.is_floating_point() or v.is_complex()]
    if floats and not _checks.all_finite(torch.cat([v.detach().reshape(-1) for _, v in floats])):
        bad = next(k for k, v in floats if not _checks.all_finite(v.detach()))
        raise ValueError(f"NaN or infinite values in {bad}")


def load_member(source, factory, allow_pickle: bool = False) -> nn.Module:
    """A model from a path (state_dict in .pt/.pth/.bin, or .safetensors) or a
    module, in eval mode. Raises ValueError with the reason for anything
    unusable (unreadable, not matching the architecture, a NaN or infinity
    in any floating tensor, buffers included)."""
    if isinstance(source, nn.Module):
        model = source
    else:
        state = read_checkpoint(source, allow_pickle)
        if isinstance(state, nn.Module):
            model = state
        else:
            if factory is None:
                raise ValueError("the checkpoint is a state_dict: pass arch to build the model")
            model = factory()
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as error:
                reason = " ".join(str(error).split())[:300]
                raise ValueError(f"checkpoint does not match the architecture ({reason})") from error
    check_finite(model.state_dict())
    return model.eval()


_CONTAINERS = (dict, collections.OrderedDict, set, list)


def _instantiate(template: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> nn.Module:
    """A copy of `template` holding `state`'s tensors, without running the
    constructor (its random initialisation costs more than the analysis of a
    small model): the module tree, its containers (hooks included) copied,
    other attributes shared. Hand-written because deepcopy and meta-device
    construction were 3-10x slower here."""
    module = object.__new__(type(template))
    attrs = module.__dict__
    attrs.update(template.__dict__)
    for key, value in attrs.items():
        if type(value) in _CONTAINERS:
            attrs[key] = value.copy()
    attrs["_parameters"] = {k: None if p is None else nn.Parameter(state[prefix + k], p.requires_grad)
                            for k, p in template._parameters.items()}
    attrs["_buffers"] = {k: None if b is None else state.get(prefix + k, b) for k, b in template._buffers.items()}
    attrs["_modules"] = {k: None if c is None else _instantiate(c, state, f"{prefix}{k}.")
                         for k, c in template._modules.items()}
    return module


class _Architecture:
    """One architecture of a run: a template model, its parameter and buffer
    shapes, and its one dataflow trace, shared by every member."""

    def __init__(self, template: nn.Module, example_input):
        self.template = template
        self.shapes = {k: (tuple(v.shape), v.dtype) for k, v in template.state_dict().items()}
        self.example_input = example_input
        self._graph, self._error = None, None

    @property
    def graph(self):
        if self._graph is None and self._error is None:  # traced once: the only forward runs of this architecture
            try:
                self._graph = discover(self.template, self.example_input)
            except ValueError as error:
                self._error = ValueError(f"the architecture could not be traced ({error})")
        if self._error is not None:
            raise self._error  # every member of it says why, without tracing again
        return self._graph

    def check(self, state: dict[str, torch.Tensor]):
        if state.keys() != self.shapes.keys():
            missing = sorted(self.shapes.keys() - state.keys())[:5]
            unexpected = sorted(state.keys() - self.shapes.keys())[:5]
            raise ValueError(f"checkpoint does not match the architecture (missing keys {missing}, unexpected "
                             f"keys {unexpected})")
        for k, v in state.items():
            if tuple(v.shape) != self.shapes[k][0]:
                raise ValueError(f"checkpoint does not match the architecture ({k} has shape {tuple(v.shape)}, "
                                 f"the architecture {self.shapes[k][0]})")

    def bind(self, state: dict[str, torch.Tensor]):
        """(graph, module factory) of a checked member given as a state_dict:
        the maps' modules hold its weights; the whole module is built only
        when asked for (the SVR and the pair measures run it)."""
        graph = self.graph
        maps = {}
        for name, m in graph.maps.items():
            bn = _instantiate(m.batchnorm, state, f"{m.batchnorm_name}.") if m.batchnorm is not None else None
            maps[name] = _replace(m, module=_instantiate(m.module, state, f"{name}."), batchnorm=bn)
        return _replace(graph, maps=maps), lambda: _instantiate(self.template, state)


def _replace(record, **changes):
    """dataclasses.replace without re-running __init__ (5x faster; these records have no __post_init__)."""
    copy = object.__new__(type(record))
    copy.__dict__.update(record.__dict__, **changes)
    return copy


class _Members:
    """The members of a run: read in parallel (a thread pool; file reads and
    tensor copies release the GIL), checked, and bound to their
    architecture's trace."""

    def __init__(self, members, factory, allow_pickle: bool, example_input, workers: int | None = None):
        self.sources = dict(members)
        self.factory, self.allow_pickle, self.example_input = factory, allow_pickle, example_input
        self.workers = workers or min(8, (os.cpu_count() or 1) * 2)
        self.architectures: dict[tuple, _Architecture] = {}
        self._pool = None

    def _architecture(self, key, make) -> _Architecture:
        if key not in self.architectures:
            self.architectures[key] = _Architecture(make(), self.example_input)
        return self.architectures[key]

    def _read(self, name):
        source = self.sources[name]
        try:
            return source if isinstance(source, nn.Module) else read_checkpoint(source, self.allow_pickle)
        except ValueError as error:
            return error

    def read(self, names) -> "_Gathered":
        """Start reading `names`; call .result() for [(name, state, module or ValueError)]."""
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="zoo-read")
        names = list(names)
        step = max(1, min(32, len(names) // (2 * self.workers)))  # a few files per task: fewer futures to manage
        batches = [names[i:i + step] for i in range(0, len(names), step)]
        futures = [self._pool.submit(lambda batch: [self._read(n) for n in batch], b) for b in batches]
        return _Gathered(names, futures)

    def bind(self, name, loaded, checked: bool = False):
        """(graph, module factory) of a read member; ValueError for a bad one
        (checked: its tensors are known to be finite)."""
        if isinstance(loaded, Exception):
            raise loaded
        if isinstance(loaded, nn.Module):
            state = loaded.state_dict()
            check_finite(state)
            key = (type(loaded).__module__, type(loaded).__qualname__) + tuple((k, tuple(v.shape)) for k, v in state.items())
            arch = self._architecture(key, lambda: loaded)
            graph = arch.graph if arch.template is loaded else arch.graph.for_model(loaded)
            return graph, lambda: loaded
        if self.factory is None:
            raise ValueError("the checkpoint is a state_dict: pass arch to build the model")
        arch = self._architecture(("factory",), lambda: self.factory().eval())
        arch.check(loaded)
        if not checked:
            check_finite(loaded)
        return arch.bind(loaded)

    def module(self, name) -> nn.Module:
        graph, make = self.bind(name, self._read(name))
        return make()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class _Gathered:
    def __init__(self, names, futures):
        self.names, self.futures = names, futures

    def result(self):
        return list(zip(self.names, (item for f in self.futures for item in f.result())))


# ---------------------------------------------------------------------------------------------
# Per-model metrics, batched over models of one architecture


def _signature(graph) -> tuple:
    return tuple((name, tuple(m.module.weight.shape)) for name, m in graph.maps.items())


def model_metrics(models: dict[str, nn.Module], metrics=("rank", "alpha"), example_input=None,
                  dtype=torch.float64, convention: str = "seed001", min_tail: int = 10,
                  graphs=None) -> dict[str, pd.DataFrame]:
    """Per-model metrics for {name: model}, batched per architecture.

    "rank": per layer numerical_rank (seed 003 equation 4, float32 tolerance),
    stable_rank, spectral_norm, lambda_max; "alpha": the power-law alpha of the
    ESD per layer (seed 001; a note says why a fit is missing) and alpha_hat
    per model (spectra.alpha_hat's rule: seed 001's sum, or WeightWatcher's
    mean alpha_weighted with convention="weightwatcher"); "svr": per edge the
    internal dimensions and significant-edge count of the SVR (seed 000), via
    svr_many. Every layer's spectrum is computed once for all of these, one
    batched call per layer over the models of a group, and the power-law
    fits of a layer run together over the group (spectra.spectrum_metrics).
    graphs: each member's ModelGraph, when the caller traced
    them (a zoo run traces each architecture once; models is then only
    looked up for the SVR). Returns {"models", "layers", "edges"} DataFrames."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ZooError(f"unknown metrics {unknown}; choose among {METRICS}")
    spectra._check_convention(convention)
    if graphs is None:  # one dataflow trace per architecture (same class and parameter shapes)
        members = _Members(models.items(), None, False, example_input)
        graphs = {name: members.bind(name, model)[0] for name, model in models.items()}
    groups: dict[tuple, list[str]] = {}
    for name, graph in graphs.items():
        groups.setdefault(_signature(graph), []).append(name)
    layer_rows, model_rows, edge_rows = [], [], []
    fit = "alpha" in metrics
    for members in groups.values():
        first = graphs[members[0]]
        per_model = {n: [] for n in members}
        for layer, linear_map in first.maps.items():
            if getattr(linear_map.module, "groups", 1) > 1:  # grouped: the map expands the blocks
                maps = [graphs[n].maps[layer] if n in graphs else first.for_model(models[n]).maps[layer]
                        for n in members]
                stack = torch.stack([m.weight(dtype=dtype) for m in maps])
            else:  # members of one architecture share module names and weight shapes (the key above)
                stack = torch.stack([graphs[n].maps[layer].module.weight.detach() for n in members]).to(dtype)
            analysed = ("rank" in metrics or fit) and (convention == "seed001" or linear_map.kind in ("linear", "conv2d"))
            frame = spectra.spectrum_metrics(spectra.weight_singular_values(stack, convention), min_tail,
                                             convention, fit=fit) if analysed else None
            columns = ["numerical_rank", "stable_rank", "spectral_norm", "lambda_max"] + \
                (["alpha", "xmin", "ks", "n_tail", "note"] if fit else [])
            values = frame[columns].to_dict("records") if frame is not None else None
            for i, n in enumerate(members):
                row = {"model": n, "layer": layer, "kind": linear_map.kind, "rows": stack.shape[1],
                       "columns": math.prod(stack.shape[2:])}
                if values is not None:
                    row.update(values[i])
                    row["numerical_rank"] = int(row["numerical_rank"])
                    if fit:
                        row["n_tail"] = int(row["n_tail"])
                elif fit:  # a Conv1d/Conv3d under WeightWatcher's convention
                    row.update(alpha=float("nan"), note=f"a {linear_map.kind} is not analysed by WeightWatcher's "
                                                        "convention")
                per_model[n].append(row)
        architecture = _arch_id(first)
        for n in members:
            layer_rows.extend(per_model[n])
            summary = {"model": n, "architecture": architecture, "n_layers": len(first.maps), "error": ""}
            if fit:
                usable = [r for r in per_model[n] if not math.isnan(r["alpha"])]
                terms = spectra._alpha_hat_terms([r["alpha"] for r in usable], [r["lambda_max"] for r in usable],
                                                 convention)
                summary["alpha_hat"] = float("nan") if not usable else float(
                    terms.mean() if convention == "weightwatcher" else terms.sum())
                summary["alpha_layers"] = len(usable)  # how many layers alpha_hat used (the notes say why not)
            model_rows.append(summary)
        if "svr" in metrics:
            from .svr import svr_many

            results = svr_many([models[n] for n in members], example_input, graph=first)
            for n, result in zip(members, results):
                for k, (a, b) in enumerate(result.edges):
                    d_out, d_in = result.internal_dimensions(k)
                    edge_rows.append({"model": n, "previous": a, "next": b, "d_out": d_out, "d_in": d_in,
                                      "n_significant": int(result.significant(k).sum()),
                                      "threshold": float(result.threshold(k))})
    return {"models": pd.DataFrame(model_rows), "layers": pd.DataFrame(layer_rows), "edges": pd.DataFrame(edge_rows)}


def _arch_id(graph) -> str:
    return hashlib.sha1(repr(_signature(graph)).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# Pairwise metrics on a probe dataset


def _activations(model, probe, layers):
    layers = check_layers(model, layers)
    with capturing(model, layers) as (captured, _), torch.no_grad(), evaluating(model):
        model(probe)
        return {n: captured[n].detach().double() for n in layers}


def probe_parts(probe):
    """(inputs, labels or None) of a probe given as a tensor or an (x, y) pair."""
    if isinstance(probe, torch.Tensor):
        return probe, None
    if isinstance(probe, (tuple, list)) and len(probe) == 2 and all(isinstance(t, torch.Tensor) for t in probe):
        return probe[0], probe[1]
    raise ZooError("probe must be an input tensor or an (inputs, labels) pair of tensors")


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
        self.size += sum(t.numel() * t.element_size() for t in value.values())
        while self.size > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.size -= sum(t.numel() * t.element_size() for t in old.values())
        return value


def pair_metrics(models: dict[str, nn.Module], pairs, probe, layers, measures=("cka",),
                 stitch_options: dict | None = None, cache: ActivationCache | None = None) -> pd.DataFrame:
    """For each (a, b) in pairs and each layer, the chosen measures on the
    probe: "cka" (linear), "grelu_cka" (max kernel), "procrustes"
    (orthogonal), "grelu_procrustes", and "stitching": the stitching penalty
    (seed 004 equation 4.3) of a layer trained on the first half of a
    labelled probe ((x, y)) and measured on the second half (stitch_options
    go to stitching.stitch; default affine, 5 epochs, lr 0.01). Each model's
    activations are captured once (once per run with a shared cache; models
    then need only be present for what the cache lacks). Returns rows
    model_a, model_b, layer, measure, value."""
    from .similarity import pairwise_similarity

    unknown = [m for m in measures if m not in PAIR_MEASURES]
    if unknown:
        raise ZooError(f"unknown pair measures {unknown}; choose among {PAIR_MEASURES}")
    x, y = probe_parts(probe)
    if "stitching" in measures and y is None:
        raise ZooError("the stitching measure needs a labelled probe: (inputs, labels)")
    needed = sorted({n for pair in pairs for n in pair})
    cache = cache if cache is not None else ActivationCache()
    key = tuple(layers)
    acts = {n: cache.get((n, key), lambda n=n: _activations(models[n], x, layers)) for n in needed}
    # each model's Gram / normalised features once per layer, the pairs batched (similarity.pairwise_similarity)
    options_of = {"cka": {"kernel": "linear"}, "grelu_cka": {"kernel": "max"},
                  "procrustes": {"measure": "procrustes", "group": "orthogonal"},
                  "grelu_procrustes": {"measure": "procrustes", "group": "grelu"}}
    batched = {}
    for layer in (acts[needed[0]] if needed else {}):
        for measure in measures:
            if measure in options_of:
                frame = pairwise_similarity({n: acts[n][layer] for n in needed}, pairs, **options_of[measure])
                batched.update({(a, b, layer, measure): v for a, b, v in frame.itertuples(index=False)})
    options = {"kind": "affine", "epochs": 5, "lr": 0.01, **(stitch_options or {})}
    half = x.shape[0] // 2
    rows = []
    for a, b in pairs:
        for layer in acts[a]:
            for measure in measures:
                if measure == "stitching":
                    from .stitching import stitch

                    value = stitch(models[a], models[b], layer, train_data=(x[:half], y[:half]),
                                   test_data=(x[half:], y[half:]),
                                   progress=False, **options).penalty
                else:
                    value = batched[(a, b, layer, measure)]
                rows.append({"model_a": a, "model_b": b, "layer": layer, "measure": measure, "value": float(value)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Incremental, resumable, sharded runs


def _distributed():
    """(rank, world size), initialising torch.distributed (gloo) under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _agree(world, rank, step: Callable[[], object]):
    """Run `step` on rank 0 only and give its result (or its ZooError) to every rank."""
    result, error = None, None
    if rank == 0:
        try:
            result = step()
        except ZooError as caught:
            error = str(caught)
    if world > 1:
        import torch.distributed as dist

        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise ZooError(error)
    return result


def _write(frame: pd.DataFrame, path: pathlib.Path, fmt: str):
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)


STRING_COLUMNS = ("model", "model_a", "model_b", "layer", "previous", "next", "architecture", "error", "measure",
                  "kind", "path")


def _read(path: pathlib.Path, fmt: str) -> pd.DataFrame:
    """A table as written: names stay strings ("NA", "None", "nan" and "0"
    are names, not missing values or numbers); only empty fields are missing."""
    if fmt == "parquet":
        frame = pd.read_parquet(path)
    else:
        try:
            frame = pd.read_csv(path, dtype={c: str for c in STRING_COLUMNS}, keep_default_na=False, na_values=[""])
        except pd.errors.EmptyDataError:
            return pd.DataFrame()
    for column in STRING_COLUMNS:
        if column in frame:
            frame[column] = frame[column].fillna("").astype(str)
    return frame


def _commit_chunk(out: pathlib.Path, chunk_id: str, tables: dict[str, pd.DataFrame], fmt: str):
    """Write every table of a chunk into a temporary folder, then rename it
    into place: a chunk is either wholly present or absent. Chunk ids are
    unique, so a commit never replaces an earlier chunk."""
    root = out / "chunks"
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{chunk_id}.", suffix=".tmp", dir=root))
    for name, frame in tables.items():
        _write(frame, tmp / f"{name}.{fmt}", fmt)
    final = root / f"{chunk_id}-{time.time_ns():x}-{os.getpid()}"
    os.rename(tmp, final)


def _chunk_folders(out: pathlib.Path) -> list[pathlib.Path]:
    root = out / "chunks"
    # in commit order (the id ends in its time); names starting with "." are interrupted chunks, redone
    return sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: p.name.rsplit("-", 2)[1:]) \
        if root.exists() else []


def _finished(out: pathlib.Path, fmt: str) -> tuple[set[str], set[tuple[str, str]]]:
    models, pairs = set(), set()
    for chunk in _chunk_folders(out):
        path = chunk / f"models.{fmt}"
        if path.exists():
            frame = _read(path, fmt)
            if "model" in frame:
                models.update(frame["model"])
        path = chunk / f"pairs_done.{fmt}"
        if path.exists():
            frame = _read(path, fmt)
            if len(frame):
                pairs.update(zip(frame["model_a"], frame["model_b"]))
    return models, pairs


def _merge(out: pathlib.Path, fmt: str, tables=TABLES, write: bool = True) -> dict[str, pd.DataFrame]:
    """The chunks' tables joined; a model (or pair) found in two chunks keeps
    the rows of the first (a safety net: resumed runs skip finished members)."""
    chunks = _chunk_folders(out)
    merged = {}
    for table in tables:
        key = ["model"] if table in ("models", "layers", "edges") else ["model_a", "model_b"]
        parts, seen = [], set()
        for chunk in chunks:
            path = chunk / f"{table}.{fmt}"
            if not path.exists():
                continue
            part = _read(path, fmt)
            if not len(part):
                continue
            ids = list(zip(*(part[k] for k in key)))
            fresh = [i not in seen for i in ids]
            seen.update(ids)
            parts.append(part[fresh] if not all(fresh) else part)
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        keys = [k for k in ("model", "model_a", "model_b") if k in frame]
        if keys:  # stable: layers and edges keep their forward order within a model
            frame = frame.sort_values(keys, kind="stable").reset_index(drop=True)
        if write:
            _write(frame, out / f"{table}.{fmt}", fmt)
        merged[table] = frame
    return merged


def _sample_pairs(names: list[str], max_pairs: int | None, seed: int) -> list[tuple[str, str]]:
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = sorted(random.Random(seed).sample(pairs, max_pairs))
    return pairs


# Options that decide the numbers of each phase: stored in <out>/options.json with the chunks.
def _run_options(arch, metrics, example_input, fmt, pairs, probe, layers, max_pairs, seed, stitch_options) -> dict:
    def fingerprint(value):
        if value is None:
            return None
        tensors = [value] if isinstance(value, torch.Tensor) else list(value) if isinstance(value, (tuple, list)) \
            else []
        digest = hashlib.sha1()
        for t in tensors:
            if isinstance(t, torch.Tensor):
                digest.update(repr((tuple(t.shape), str(t.dtype))).encode())
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    arch_name = arch if isinstance(arch, str) or arch is None else \
        f"{getattr(arch, '__module__', '?')}:{getattr(arch, '__qualname__', type(arch).__name__)}"
    return {"models": {"arch": arch_name, "metrics": list(metrics), "example_input": fingerprint(example_input),
                       "format": fmt},
            "pairs": {"measures": list(pairs), "probe": fingerprint(probe) if pairs else None,
                      "layers": list(layers) if layers is not None else None,
                      "max_pairs": max_pairs, "seed": seed if pairs else None,
                      "stitch_options": repr(sorted((stitch_options or {}).items())) if "stitching" in pairs else None}}


def _reconcile_options(out: pathlib.Path, options: dict):
    """Refuse to resume a run with options that change its numbers; a run
    that had no pair measures may be resumed with some (the pairs are computed)."""
    path = out / "options.json"
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ZooError(f"{path} is unreadable ({error}): use a new results folder") from error
        for phase in ("models", "pairs"):
            if stored.get(phase) == options[phase] or (phase == "pairs" and not stored.get("pairs", {}).get("measures")):
                continue
            differ = [f"{k}: {stored.get(phase, {}).get(k)!r} there, {v!r} now" for k, v in options[phase].items()
                      if stored.get(phase, {}).get(k) != v]
            raise ZooError(f"{out} holds a run with other {phase} options ({'; '.join(differ)}): resume with the "
                           "same options, or use a new results folder")
    elif _chunk_folders(out):
        raise ZooError(f"{out} holds result chunks but no options.json: use a new results folder")
    tmp = out / ".options.json.tmp"
    tmp.write_text(json.dumps(options, indent=1))
    os.replace(tmp, path)


class _Lock:
    """<out>/.lock, holding the writer's pid and host: a second writer is
    refused; the lock of a dead process on this host is taken over."""

    def __init__(self, out: pathlib.Path):
        self.path = out / ".lock"
        self.held = False

    def acquire(self):
        import socket

        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                    self.path.unlink(missing_ok=True)  # stale: its writer is gone
                    continue
                if not holder:  # being written by its holder right now
                    time.sleep(0.05)
                    continue
                raise ZooError(f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on "
                               f"{holder.get('host')} since {holder.get('since')}); wait for it to finish, or remove "
                               f"{self.path} if that run is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise ZooError(f"could not take the lock {self.path}")

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def check_out(out) -> pathlib.Path:
    """The results folder, created; ZooError if it is empty, a file, or not
    writable."""
    if not isinstance(out, (str, os.PathLike)) or str(out).strip() == "":
        raise ZooError(f"out must name a results folder, got {out!r}")
    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise ZooError(f"out {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test."):
            pass
    except OSError as error:
        raise ZooError(f"out {path} is not a writable folder ({error.strerror or error})") from None
    return path


def _check_int(name: str, value, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ZooError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return value


MIN_PROBE = 4  # CKA of fewer points is degenerate (2 centred points always score 1); stitching halves the probe


def check_metadata(metadata) -> pathlib.Path | None:
    """The metadata table's path, checked readable with a model column (CSV or Parquet)."""
    if metadata is None:
        return None
    path = pathlib.Path(metadata)
    if not path.is_file():
        raise ZooError(f"no such metadata file: {path}")
    try:
        columns = pd.read_parquet(path).columns if path.suffix == ".parquet" else \
            pd.read_csv(path, nrows=5, dtype=str, keep_default_na=False).columns
    except Exception as error:  # a corrupt table raises many kinds of errors
        raise ZooError(f"unreadable metadata file {path} ({type(error).__name__}: {str(error)[:120]})") from None
    if "model" not in columns:
        raise ZooError(f"the metadata file {path} needs a 'model' column naming the members, it has {list(columns)}")
    return path


def analyze(source, arch=None, out=None, metrics=("rank", "alpha"), pairs=(), probe=None, layers=None,
            max_pairs: int | None = None, seed: int = 0, fmt: str = "csv", allow_pickle: bool = False,
            chunk_size: int | None = None, example_input=None, metadata=None, stitch_options: dict | None = None,
            progress: bool = True, report: bool = True, workers: int | None = None) -> dict[str, pd.DataFrame]:
    """Analyse a zoo: every member's per-model metrics (batched per
    architecture) and, with `pairs` measures and a `probe` (an input tensor,
    or (inputs, labels) for the stitching penalty), the pairwise measures on
    all pairs or max_pairs sampled with `seed`.

    source: a folder (members named by relative path, see list_members) or a
    list of checkpoints, or models. arch: the factory for state_dict
    checkpoints. out: the results folder (resumable; None keeps everything in
    memory). A checkpoint that cannot be read, does not match the
    architecture or holds a NaN or infinity in any floating tensor (BatchNorm
    buffers too) becomes a row of the models table with its error, as does a
    member whose analysis fails, and the run goes on.

    Every argument is checked before any work. Each architecture is traced
    once per run; checkpoints are read in `workers` threads (memory-mapped
    when large), one chunk ahead of the analysis. chunk_size: members (default
    256, fewer for checkpoints over 2 MiB: two chunks within 1 GiB) or pairs
    (default 16) per committed chunk. The options that decide
    the numbers are stored in <out>/options.json: resuming with others is
    refused (adding pair measures to a run without any computes them). A
    lock file <out>/.lock (pid and host) refuses a second writer. Under
    torchrun every rank takes members[rank::world] and pairs[rank::world];
    rank 0 merges and writes report.md (report=False skips it; with
    metadata, a table with a model column, the metrics are plotted against
    accuracy). Returns the merged tables."""
    if fmt not in ("csv", "parquet"):
        raise ZooError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    source, arch, metadata = manifest_defaults(source, arch, metadata)  # a folder with zoo.json
    metrics, pairs = tuple(metrics or ()), tuple(pairs or ())
    unknown = [m for m in metrics if m not in METRICS] + [m for m in pairs if m not in PAIR_MEASURES]
    if unknown:
        raise ZooError(f"unknown metrics {unknown}; per model {METRICS}, per pair {PAIR_MEASURES}")
    if not metrics and not pairs:
        raise ZooError(f"nothing to compute: give metrics (among {METRICS}) or pairs (among {PAIR_MEASURES})")
    _check_int("chunk_size", chunk_size, 1, allow_none=True)
    _check_int("max_pairs", max_pairs, 1, allow_none=True)
    _check_int("seed", seed, -2**63)
    _check_int("workers", workers, 1, allow_none=True)
    if pairs and probe is None:
        raise ZooError("pair measures need a probe input tensor")
    if pairs:
        x, y = probe_parts(probe)
        if x.dim() == 0 or x.shape[0] < MIN_PROBE:
            raise ZooError(f"the probe needs at least {MIN_PROBE} inputs, it has {x.shape[0] if x.dim() else 0}")
        if not _checks.all_finite(x):
            raise ZooError("the probe holds NaN or infinite values")
        if "stitching" in pairs and y is None:
            raise ZooError("the stitching measure needs a labelled probe: (inputs, labels)")
    elif layers is not None or max_pairs is not None:
        raise ZooError("layers and max_pairs apply to pair measures: give pairs too")
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers or not all(isinstance(n, str) and n for n in layers):
            raise ZooError(f"layers must be a non-empty list of module names, got {layers!r}")
    if example_input is not None and not isinstance(example_input, (torch.Tensor, tuple)):
        raise ZooError(f"example_input must be a tensor or a tuple of inputs, got {type(example_input).__name__}")
    factory = resolve_arch(arch)
    members = list_members(source)
    metadata = check_metadata(metadata)
    run = _Members(members, factory, allow_pickle, example_input, workers)
    if layers is not None:  # checked on the architecture now, not after the per-model phase
        try:
            model = factory() if factory is not None else run.module(members[0][0])
        except ValueError:
            model = None  # an unusable first member: an error row later, not a reason to stop
        if model is not None:
            try:
                check_layers(model, layers)
            except ValueError as error:
                raise ZooError(str(error)) from None
    rank, world = _distributed()
    out_path = _agree(world, rank, lambda: check_out(out)) if out is not None else None
    lock = _Lock(out_path) if out_path is not None and rank == 0 else None
    try:
        if out_path is not None:
            def prepare():
                lock.acquire()
                _reconcile_options(out_path, _run_options(arch, metrics, example_input, fmt, pairs, probe, layers,
                                                          max_pairs, seed, stitch_options))
            _agree(world, rank, prepare)
        return _run(run, members, out_path, rank, world, metrics, pairs, probe, layers, max_pairs, seed, fmt,
                    chunk_size, stitch_options, progress, report, metadata)
    finally:
        run.close()
        if lock is not None:
            lock.release()


def _run(run, members, out_path, rank, world, metrics, pairs, probe, layers, max_pairs, seed, fmt, chunk_size,
         stitch_options, progress, report, metadata):
    from tqdm.auto import tqdm

    memory: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLES}
    done_models, done_pairs = _finished(out_path, fmt) if out_path else (set(), set())
    mine = [m for m in members[rank::world] if m[0] not in done_models]
    size = chunk_size or _default_chunk_size(members)
    chunks = [mine[i:i + size] for i in range(0, len(mine), size)]
    # without metrics the chunks still give the models table: each member's load check
    with tqdm(total=len(mine), desc=f"models (rank {rank})", unit="model", disable=not progress,
              leave=False, mininterval=0, miniters=1) as bar:  # updated per chunk or pair: every update shows
        ahead = run.read([n for n, _ in chunks[0]]) if chunks else None
        for k, chunk in enumerate(chunks):  # the next chunk is read while this one is analysed
            current, ahead = ahead, (run.read([n for n, _ in chunks[k + 1]]) if k + 1 < len(chunks) else None)
            tables = _process_chunk(chunk, run, metrics, current)
            _store(out_path, memory, f"models-{rank}", tables, fmt)
            bar.update(len(chunk))
    if pairs:
        _barrier(world)  # every rank's model rows exist: members with errors are left out of the pairs
        models_so_far = (_merge(out_path, fmt, ("models",), write=False)["models"] if out_path is not None else
                         pd.concat(memory["models"], ignore_index=True) if memory["models"] else pd.DataFrame())
        failed = set(models_so_far.loc[models_so_far["error"].fillna("").astype(str) != "", "model"]) \
            if "error" in models_so_far else set()
        loaded_ok = [n for n, _ in members if n not in failed]
        all_pairs = _sample_pairs(loaded_ok, max_pairs, seed)
        todo = [p for p in all_pairs[rank::world] if p not in done_pairs]
        cache = ActivationCache()
        if layers is None and loaded_ok:  # default: the outputs of every linear map of the first member
            graph, _ = run.bind(loaded_ok[0], run._read(loaded_ok[0]))
            layers = list(graph.maps)
        size = chunk_size or 16
        with tqdm(total=len(todo), desc=f"pairs (rank {rank})", unit="pair", disable=not progress,
                  leave=False, mininterval=0, miniters=1) as bar:  # updated per chunk or pair: every update shows
            for start in range(0, len(todo), size):
                batch = todo[start:start + size]
                frame = _process_pairs(batch, run, probe, layers, pairs, stitch_options, cache, bar)
                done = pd.DataFrame(batch, columns=["model_a", "model_b"])
                _store(out_path, memory, f"pairs-{rank}", {"pairs": frame, "pairs_done": done}, fmt)
    _barrier(world)
    if out_path is None:
        return {t: (pd.concat(memory[t], ignore_index=True) if memory[t] else pd.DataFrame()) for t in TABLES}
    if rank == 0:
        merged = _merge(out_path, fmt)
        if report:
            write_report(out_path, merged, metadata)
    _barrier(world)
    return {t: _read(out_path / f"{t}.{fmt}", fmt) for t in TABLES}


def _default_chunk_size(members) -> int:
    """256 members, fewer for large checkpoints: two chunks (the one analysed
    and the one read ahead) stay within about 1 GiB."""
    first = members[0][1]
    if isinstance(first, nn.Module):
        return 256
    return max(1, min(256, (512 << 20) // max(1, pathlib.Path(first).stat().st_size)))


def _store(out_path, memory, chunk_id, tables, fmt):
    if out_path is None:
        for name, frame in tables.items():
            if name in memory:
                memory[name].append(frame)
    else:
        _commit_chunk(out_path, chunk_id, tables, fmt)


def _process_chunk(chunk, run: _Members, metrics, reading=None) -> dict[str, pd.DataFrame]:
    """The chunk's tables; a member that cannot be read, checked or analysed
    is a models row with its error."""
    loaded = (reading or run.read([n for n, _ in chunk])).result()
    states = [item for _, item in loaded if isinstance(item, dict)]
    try:  # one check for the whole chunk; one per member only when it fails
        check_finite({f"{k}:{key}": t for k, state in enumerate(states) for key, t in state.items()})
        finite = True
    except ValueError:
        finite = False
    graphs, makers, errors = {}, {}, []
    with _collector_paused():
        for name, item in loaded:
            try:
                graphs[name], makers[name] = run.bind(name, item, checked=finite)
            except ValueError as error:
                errors.append({"model": name, "error": str(error)})
    empty = {"models": pd.DataFrame(), "layers": pd.DataFrame(), "edges": pd.DataFrame()}
    if not metrics:
        tables = dict(empty, models=pd.DataFrame([{"model": n, "error": ""} for n in graphs]))
    elif graphs:
        try:
            tables = model_metrics(_Lazy(makers), metrics, run.example_input, graphs=graphs)
        except (ValueError, RuntimeError):  # one member spoils the batch: analyse one by one
            tables, parts = dict(empty), []
            for name in graphs:
                try:
                    parts.append(model_metrics(_Lazy({name: makers[name]}), metrics, run.example_input,
                                               graphs={name: graphs[name]}))
                except (ValueError, RuntimeError) as error:
                    errors.append({"model": name, "error": f"analysis failed ({type(error).__name__}: "
                                                           f"{' '.join(str(error).split())[:200]})"})
            tables = {t: pd.concat([p[t] for p in parts], ignore_index=True) if parts else pd.DataFrame()
                      for t in empty}
    else:
        tables = empty
    if errors:
        tables["models"] = pd.concat([tables["models"], pd.DataFrame(errors)], ignore_index=True)
    paths = {n: str(s) for n, s in chunk if not isinstance(s, nn.Module)}
    if paths and len(tables["models"]):
        tables["models"]["path"] = tables["models"]["model"].map(paths).fillna("")
    return tables


@contextlib.contextmanager
def _collector_paused():
    """Binding makes many small acyclic objects: the cycle collector, which
    rescans every live tensor each time, took 3/4 of that time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Lazy(collections.abc.Mapping):
    """{name: model} building each model when it is looked up (only the SVR needs whole modules)."""

    def __init__(self, makers):
        self.makers = makers

    def __getitem__(self, name):
        return self.makers[name]()

    def __iter__(self):
        return iter(self.makers)

    def __len__(self):
        return len(self.makers)


def _process_pairs(batch, run: _Members, probe, layers, measures, stitch_options, cache, bar=None) -> pd.DataFrame:
    columns = ["model_a", "model_b", "layer", "measure", "value"]
    models, failed = {}, {}
    for name in sorted({n for pair in batch for n in pair}):
        if "stitching" not in measures and (name, tuple(layers)) in cache.entries:
            continue  # its activations are cached: no need to load it again
        try:
            models[name] = run.module(name)
        except ValueError as error:
            failed[name] = str(error)  # also an error row of the models table
    frames = []
    for pair in batch:
        if pair[0] in failed or pair[1] in failed:
            frames.append(pd.DataFrame([{"model_a": pair[0], "model_b": pair[1], "layer": "", "measure": "",
                                         "value": float("nan"), "error": failed.get(pair[0]) or failed[pair[1]]}]))
        else:
            try:
                frames.append(pair_metrics(models, [pair], probe, layers, measures, stitch_options, cache))
            except (ValueError, RuntimeError) as error:  # an undefined measure: a row saying so, the run goes on
                frames.append(pd.DataFrame([{"model_a": pair[0], "model_b": pair[1], "layer": "", "measure": "",
                                             "value": float("nan"),
                                             "error": " ".join(str(error).split())[:200]}]))
        if bar is not None:
            bar.update(1)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


# ---------------------------------------------------------------------------------------------
# The report


def write_report(out: pathlib.Path, tables: dict[str, pd.DataFrame], metadata=None) -> pathlib.Path:
    """report.md with figures (spectral_ext.zoo_report.report): members and
    errors, per-layer distributions, and with metadata (model and
    test_accuracy or accuracy) each metric against accuracy and the accuracy
    prediction from weights."""
    from .zoo_report import report

    return report(out, tables, metadata)
