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

import hashlib
import importlib
import math
import os
import pathlib
import random
import shutil
from collections.abc import Callable

import pandas as pd
import torch
from torch import nn

from . import _checks
from ._hooks import capturing, check_layers
from ._linalg import gram_singular_values
from .layers import discover
from .rank import _rank_of_singular_values
from .spectra import fit_power_law
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
    """(name, path or module) for a directory of checkpoints, a list of paths,
    or a list/dict of nn.Modules; sorted by name for a deterministic order."""
    if isinstance(source, dict):
        items = [(str(k), v) for k, v in source.items()]
    elif isinstance(source, (str, os.PathLike)):
        root = pathlib.Path(source)
        if not root.exists():
            raise ZooError(f"no such checkpoint folder or file: {root}")
        paths = [root] if root.is_file() else [p for p in root.iterdir() if p.suffix in CHECKPOINT_SUFFIXES]
        items = [(p.stem, p) for p in paths]
    else:
        items = []
        for k, item in enumerate(source):
            if isinstance(item, nn.Module):
                items.append((f"model_{k:05d}", item))
            else:
                path = pathlib.Path(item)
                if not path.exists():
                    raise ZooError(f"no such checkpoint: {path}")
                items.append((path.stem, path))
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ZooError("two members share a name (file stems must be unique)")
    if not items:
        raise ZooError(f"no checkpoints ({', '.join(CHECKPOINT_SUFFIXES)}) or models in {source!r}")
    return sorted(items, key=lambda item: item[0])


def load_member(source, factory, allow_pickle: bool = False) -> nn.Module:
    """A model from a path (state_dict in .pt/.pth/.bin, or .safetensors) or a
    module. Raises ValueError with the reason for anything unusable."""
    if isinstance(source, nn.Module):
        model = source
    else:
        path = pathlib.Path(source)
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except Exception as error:  # corrupt or truncated files raise many kinds of errors
            first_line = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
            if isinstance(error, __import__("pickle").UnpicklingError) and not allow_pickle:
                first_line = "not a valid state_dict file (a whole pickled module needs allow_pickle for trusted files)"
            raise ValueError(f"unreadable checkpoint ({type(error).__name__}: {first_line})") from error
        if isinstance(state, nn.Module):
            model = state
        else:
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise ValueError(f"the checkpoint holds a {type(state).__name__}, not a state_dict")
            if factory is None:
                raise ValueError("the checkpoint is a state_dict: pass arch to build the model")
            model = factory()
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as error:
                reason = " ".join(str(error).split())[:300]
                raise ValueError(f"checkpoint does not match the architecture ({reason})") from error
    for name, p in model.named_parameters():
        if not _checks.all_finite(p.detach()):
            raise ValueError(f"NaN or infinite weights in {name}")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Per-model metrics, batched over models of one architecture


def _signature(graph) -> tuple:
    return tuple((name, tuple(m.module.weight.shape)) for name, m in graph.maps.items())


def model_metrics(models: dict[str, nn.Module], metrics=("rank", "alpha"), example_input=None,
                  dtype=torch.float64) -> dict[str, pd.DataFrame]:
    """Per-model metrics for {name: model}, batched per architecture.

    "rank": per layer numerical_rank (seed 003 equation 4, float32 tolerance),
    stable_rank, spectral_norm, lambda_max; "alpha": the power-law alpha of the
    ESD of W W^T per layer (seed 001) and alpha_hat per model; "svr": per edge
    the internal dimensions and significant-edge count of the SVR (seed 000),
    via svr_many. Returns {"models", "layers", "edges"} DataFrames."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ZooError(f"unknown metrics {unknown}; choose among {METRICS}")
    # One dataflow trace per architecture (same class and parameter shapes), reused by every member.
    by_shape: dict[tuple, list[str]] = {}
    for name, model in models.items():
        key = (type(model).__qualname__,) + tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
        by_shape.setdefault(key, []).append(name)
    groups: dict[tuple, list[str]] = {}
    graphs = {}
    for names in by_shape.values():
        graph = discover(models[names[0]], example_input)
        for name in names:
            graphs[name] = graph if name == names[0] else graph.for_model(models[name])
        groups.setdefault(_signature(graph), []).extend(names)
    layer_rows, model_rows, edge_rows = [], [], []
    for members in groups.values():
        first = graphs[members[0]]
        per_model = {n: [] for n in members}
        for layer, linear_map in first.maps.items():
            stack = torch.stack([graphs[n].maps[layer].matrix(dtype=dtype) for n in members])
            sigma = gram_singular_values(stack)  # one batched call for every model of the group
            ranks = _rank_of_singular_values(sigma, None)
            frob = sigma.square().sum(-1)
            top = sigma[:, 0]
            for i, n in enumerate(members):
                row = {"model": n, "layer": layer, "kind": linear_map.kind, "rows": stack.shape[1],
                       "columns": stack.shape[2]}
                if "rank" in metrics or "alpha" in metrics:
                    row.update(numerical_rank=int(ranks[i]), stable_rank=float(frob[i] / top[i] ** 2) if top[i] > 0
                               else 0.0, spectral_norm=float(top[i]), lambda_max=float(top[i] ** 2))
                if "alpha" in metrics:
                    fit = fit_power_law(sigma[i].square())
                    row.update(alpha=fit["alpha"], xmin=fit["xmin"], ks=fit["ks"], n_tail=fit["n_tail"])
                per_model[n].append(row)
        for n in members:
            layer_rows.extend(per_model[n])
            summary = {"model": n, "architecture": _arch_id(first), "n_layers": len(first.maps), "error": ""}
            if "alpha" in metrics:
                usable = [r for r in per_model[n] if not math.isnan(r["alpha"])]
                summary["alpha_hat"] = float(sum(r["alpha"] * math.log(r["lambda_max"]) for r in usable)) \
                    if usable else float("nan")
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
    with capturing(model, layers) as (captured, _), torch.no_grad():
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
    from .similarity import cka, procrustes

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
    functions = {"cka": lambda x, y: cka(x, y, "linear"), "grelu_cka": lambda x, y: cka(x, y, "max"),
                 "procrustes": lambda x, y: procrustes(x, y, "orthogonal"),
                 "grelu_procrustes": lambda x, y: procrustes(x, y, "grelu")}
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
                    value = functions[measure](acts[a][layer], acts[b][layer])
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


def _write(frame: pd.DataFrame, path: pathlib.Path, fmt: str):
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)


def _read(path: pathlib.Path, fmt: str) -> pd.DataFrame:
    if fmt == "parquet":
        return pd.read_parquet(path)
    names = {c: str for c in ("model", "model_a", "model_b", "layer", "previous", "next", "architecture", "error",
                              "measure", "kind")}
    try:
        return pd.read_csv(path, dtype=names)  # layer names like "0" stay strings
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _commit_chunk(out: pathlib.Path, chunk_id: str, tables: dict[str, pd.DataFrame], fmt: str):
    """Write every table of a chunk into a temporary folder, then rename it
    into place: a chunk is either wholly present or absent."""
    final = out / "chunks" / chunk_id
    tmp = out / "chunks" / f".{chunk_id}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, frame in tables.items():
        _write(frame, tmp / f"{name}.{fmt}", fmt)
    if final.exists():  # a chunk recomputed after a crash between rename and bookkeeping
        shutil.rmtree(final)
    os.replace(tmp, final)


def _finished(out: pathlib.Path, fmt: str) -> tuple[set[str], set[tuple[str, str]]]:
    models, pairs = set(), set()
    root = out / "chunks"
    if not root.exists():
        return models, pairs
    for chunk in root.iterdir():
        if chunk.name.startswith("."):
            continue  # an interrupted chunk: ignored and redone
        path = chunk / f"models.{fmt}"
        if path.exists():
            frame = _read(path, fmt)
            if "model" in frame:
                models.update(frame["model"].astype(str))
        path = chunk / f"pairs_done.{fmt}"
        if path.exists():
            frame = _read(path, fmt)
            if len(frame):
                pairs.update(zip(frame["model_a"].astype(str), frame["model_b"].astype(str)))
    return models, pairs


def _merge(out: pathlib.Path, fmt: str) -> dict[str, pd.DataFrame]:
    merged = {}
    chunks = sorted(p for p in (out / "chunks").iterdir() if not p.name.startswith(".")) \
        if (out / "chunks").exists() else []
    for table in TABLES:
        parts = [_read(c / f"{table}.{fmt}", fmt) for c in chunks if (c / f"{table}.{fmt}").exists()]
        parts = [p for p in parts if len(p)]
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        keys = [k for k in ("model", "model_a", "model_b") if k in frame]
        if keys:  # stable: layers and edges keep their forward order within a model
            frame = frame.sort_values(keys, kind="stable").reset_index(drop=True)
        _write(frame, out / f"{table}.{fmt}", fmt)
        merged[table] = frame
    return merged


def _merge_models(out: pathlib.Path, fmt: str) -> pd.DataFrame:
    chunks = [p for p in (out / "chunks").iterdir() if not p.name.startswith(".")] if (out / "chunks").exists() else []
    parts = [_read(c / f"models.{fmt}", fmt) for c in chunks if (c / f"models.{fmt}").exists()]
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _sample_pairs(names: list[str], max_pairs: int | None, seed: int) -> list[tuple[str, str]]:
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = sorted(random.Random(seed).sample(pairs, max_pairs))
    return pairs


def analyze(source, arch=None, out=None, metrics=("rank", "alpha"), pairs=(), probe=None, layers=None,
            max_pairs: int | None = None, seed: int = 0, fmt: str = "csv", allow_pickle: bool = False,
            chunk_size: int = 16, example_input=None, metadata=None, stitch_options: dict | None = None,
            progress: bool = True) -> dict[str, pd.DataFrame]:
    """Analyse a zoo: every member's per-model metrics (batched per
    architecture) and, with `pairs` measures and a `probe` (an input tensor,
    or (inputs, labels) for the stitching penalty), the pairwise measures on
    all pairs or max_pairs sampled with `seed`.

    source: a folder or list of checkpoints, or models. arch: the factory for
    state_dict checkpoints. out: the results folder (resumable; None keeps
    everything in memory). A checkpoint that cannot be read, does not match
    the architecture or holds NaN weights becomes a row of the models table
    with its error, and the run goes on. Under torchrun every rank takes
    members[rank::world] and pairs[rank::world]; rank 0 merges and writes
    report.md (with metadata, a CSV of model,accuracy, the metrics are
    plotted against accuracy). Returns the merged tables."""
    if fmt not in ("csv", "parquet"):
        raise ZooError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    source, arch, metadata = manifest_defaults(source, arch, metadata)  # a folder with zoo.json
    pairs = tuple(pairs or ())
    unknown = [m for m in metrics if m not in METRICS] + [m for m in pairs if m not in PAIR_MEASURES]
    if unknown:
        raise ZooError(f"unknown metrics {unknown}; per model {METRICS}, per pair {PAIR_MEASURES}")
    if pairs and probe is None:
        raise ZooError("pair measures need a probe input tensor")
    if pairs:
        probe_parts(probe)
    factory = resolve_arch(arch)
    members = list_members(source)
    rank, world = _distributed()
    out_path = pathlib.Path(out) if out is not None else None
    memory: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLES}
    done_models, done_pairs = _finished(out_path, fmt) if out_path else (set(), set())
    from tqdm.auto import tqdm

    mine = [m for m in members[rank::world] if m[0] not in done_models]
    chunks = [mine[i:i + chunk_size] for i in range(0, len(mine), chunk_size)]
    for chunk in tqdm(chunks, desc=f"models (rank {rank})", disable=not progress, leave=False):
        tables = _process_chunk(chunk, factory, allow_pickle, metrics, example_input)
        _store(out_path, memory, f"models-{rank}-{chunk[0][0]}", tables, fmt)
    if pairs:
        _barrier(world)  # every rank's model rows exist: members with errors are left out of the pairs
        models_so_far = (_merge_models(out_path, fmt) if out_path is not None else
                         pd.concat(memory["models"], ignore_index=True) if memory["models"] else pd.DataFrame())
        failed = set(models_so_far.loc[models_so_far["error"].fillna("").astype(str) != "", "model"].astype(str)) \
            if "error" in models_so_far else set()
        loaded_ok = [n for n, _ in members if n not in failed]
        all_pairs = _sample_pairs(loaded_ok, max_pairs, seed)
        todo = [p for p in all_pairs[rank::world] if p not in done_pairs]
        cache = ActivationCache()
        if layers is None and loaded_ok:  # default: the outputs of every linear map of the first member
            first = load_member(dict(members)[loaded_ok[0]], factory, allow_pickle)
            layers = list(discover(first, probe_parts(probe)[0][:1]).maps)
        for start in tqdm(range(0, len(todo), chunk_size), desc=f"pairs (rank {rank})", disable=not progress,
                          leave=False):
            batch = todo[start:start + chunk_size]
            frame = _process_pairs(batch, dict(members), factory, allow_pickle, probe, layers, pairs, stitch_options,
                                   cache)
            done = pd.DataFrame(batch, columns=["model_a", "model_b"])
            _store(out_path, memory, f"pairs-{rank}-{batch[0][0]}-{batch[0][1]}",
                   {"pairs": frame, "pairs_done": done}, fmt)
    _barrier(world)
    if out_path is None:
        return {t: (pd.concat(memory[t], ignore_index=True) if memory[t] else pd.DataFrame()) for t in TABLES}
    if rank == 0:
        merged = _merge(out_path, fmt)
        write_report(out_path, merged, metadata)
    _barrier(world)
    return {t: _read(out_path / f"{t}.{fmt}", fmt) for t in TABLES}


def _store(out_path, memory, chunk_id, tables, fmt):
    if out_path is None:
        for name, frame in tables.items():
            if name in memory:
                memory[name].append(frame)
    else:
        _commit_chunk(out_path, chunk_id, tables, fmt)


def _process_chunk(chunk, factory, allow_pickle, metrics, example_input) -> dict[str, pd.DataFrame]:
    models, errors = {}, []
    for name, source in chunk:
        try:
            models[name] = load_member(source, factory, allow_pickle)
        except ValueError as error:
            errors.append({"model": name, "error": str(error)})
    tables = model_metrics(models, metrics, example_input) if models else \
        {"models": pd.DataFrame(), "layers": pd.DataFrame(), "edges": pd.DataFrame()}
    if errors:
        tables["models"] = pd.concat([tables["models"], pd.DataFrame(errors)], ignore_index=True)
    return tables


def _process_pairs(batch, sources, factory, allow_pickle, probe, layers, measures, stitch_options,
                   cache) -> pd.DataFrame:
    models, failed = {}, set()
    for name in sorted({n for pair in batch for n in pair}):
        if "stitching" not in measures and (name, tuple(layers)) in cache.entries:
            continue  # its activations are cached: no need to load it again
        try:
            models[name] = load_member(sources[name], factory, allow_pickle)
        except ValueError:
            failed.add(name)  # already an error row of the models table
    usable = [p for p in batch if p[0] not in failed and p[1] not in failed]
    if not usable:
        return pd.DataFrame(columns=["model_a", "model_b", "layer", "measure", "value"])
    return pair_metrics(models, usable, probe, layers, measures, stitch_options, cache)


# ---------------------------------------------------------------------------------------------
# The report


def write_report(out: pathlib.Path, tables: dict[str, pd.DataFrame], metadata=None) -> pathlib.Path:
    """report.md with figures (spectral_ext.zoo_report.report): members and
    errors, per-layer distributions, and with metadata (model and
    test_accuracy or accuracy) each metric against accuracy and the accuracy
    prediction from weights."""
    from .zoo_report import report

    return report(out, tables, metadata)
