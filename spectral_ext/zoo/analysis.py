"""Zoo runs: analyze() checks every argument, then reads the members one
chunk ahead of the analysis, computes each chunk's tables, commits them, and
runs the pair phase; rank 0 merges and writes the report."""
from __future__ import annotations

import pathlib
import random

import pandas as pd
import torch
from torch import nn

from .. import _checks
from .._hooks import check_layers, evaluating
from ._base import (METRICS, MIN_PROBE, PAIR_MEASURES, TABLES, WEIGHT_METRICS, ZooError, ZooTables, _check_int,
                    pair_measures)
from .distributed import _agree, _barrier, _distributed
from .manifest import manifest_defaults
from .members import (_collector_paused, _Lazy, _Members, _reason, _WeightMembers, all_finite_states, list_members,
                      relative_to_member, resolve_arch)
from .metrics import ActivationCache, model_metrics, pair_metrics, probe_parts, weight_model_metrics
from .storage import (_commit_chunk, _finished, _Lock, _merge, _read, _reconcile_options, _run_options, _stored_options,
                      _verify_chunks, check_metadata, check_out)

def analyze(source, arch=None, out=None, metrics=("rank", "alpha"), pairs=(), probe=None, layers=None,
            max_pairs: int | None = None, generator=None, fmt: str = "csv", allow_pickle: bool = False,
            chunk_size: int | None = None, example_input=None, metadata=None, stitch_options: dict | None = None,
            progress: bool = True, report: bool = True, workers: int | None = None,
            trust_manifest: bool = False) -> ZooTables:
    """Analyse a zoo: every member's per-model metrics and, with pair measures and a probe, the pairwise ones.

    The per-model metrics are batched per architecture (seed 003 ranks, seed 001 alpha and alpha-hat,
    seed 000 SVR edges); with `pairs` measures and a `probe` (seed 004) the pairwise measures run on all
    pairs or max_pairs sampled with `generator`. Without arch (and none in zoo.json), checkpoints are read
    as their weights alone (weights.read_weights, one tensor at a time; float32, float16 and bfloat16) and
    only the weight metrics WEIGHT_METRICS (rank, alpha) are computed (metrics.weight_model_metrics: every
    tensor of two or more dimensions is a layers row, embeddings and LoRA updates included, quantised
    tensors a row with a note; the numbers of spectra.layer_spectra of each member); svr and pair
    measures run the models and are then a ZooError (argument "arch"), unless allow_pickle (whole pickled
    modules run as they are). A folder's zoo.json may name the factory: a torchvision name or one of this
    package's is used as it is, another 'module:function' is imported and run only with
    trust_manifest=True (a folder from elsewhere must not run code), else ZooError. A checkpoint that
    cannot be read, does not match the architecture (keys, shapes, integer weights) or holds a NaN or
    infinity in any floating tensor (BatchNorm buffers too) becomes a row of the models table with its
    error naming the file, as does a member whose analysis fails, and the run goes on.

    Every argument is checked before any work. Each architecture is traced once per run; checkpoints are
    read in `workers` threads (memory-mapped when large), one chunk ahead of the analysis. The options
    that decide the numbers are stored in <out>/options.json: resuming with others is refused (adding pair
    measures to a run without any computes them). Each chunk records its tables' row counts and
    checksums; on resuming, a chunk that fails them is set aside and redone, with a warning. A lock on
    <out>/.lock (its file names the pid and host) refuses a second writer. The probe is run through the
    architecture once before any work: inputs it cannot take are a ZooError. Under torchrun every rank
    takes members[rank::world] and pairs[rank::world]; rank 0 merges and writes report.md.

    Args:
        source: a folder (members named by relative path, see list_members: a checkpoint file, or a
            Hugging Face model folder or PEFT LoRA adapter folder as one member) or a list of
            checkpoints, or models.
        arch: the factory for state_dict checkpoints, as resolve_arch takes (called once here: one that
            raises or gives no nn.Module is a ZooError) (default None).
        out: the results folder (resumable; default None keeps everything in memory).
        metrics: per-model metrics among "rank", "alpha", "svr" (default ("rank", "alpha")).
        pairs: pair measures, as pair_metrics takes (default (): none).
        probe: an input tensor, or (inputs, labels) for the stitching penalty (see probe_parts); needed
            with pairs.
        layers: module names the pair measures compare (default None: the outputs of every linear map of
            the first member); only with pairs.
        max_pairs: the number of pairs sampled (default None: all pairs); only with pairs.
        generator: the pair sample's randomness: None (torch's global RNG, or the recorded seed when
            resuming a run), an int seed, or a torch.Generator.
        fmt: the tables' format, "csv" or "parquet" (default "csv").
        allow_pickle: torch files may hold whole pickled modules (trusted files only) (default False).
        chunk_size: members (default 256, fewer for checkpoints over 2 MiB: two chunks within 1 GiB) or
            pairs (default 16) per committed chunk.
        example_input: a tensor or a tuple of inputs for tracing each architecture (default None).
        metadata: a table with a model column (CSV or Parquet); the report then plots the metrics against
            accuracy (default None).
        stitch_options: options for stitching.stitch, as pair_metrics takes (default None).
        progress: progress bars (default True).
        report: write report.md (default True; False skips it).
        workers: the threads that read checkpoints (default None: min(8, 2 x the CPU count)).
        trust_manifest: import and run a 'module:function' factory named by zoo.json (default False).

    Returns:
        The merged tables (ZooTables).
    """
    if fmt not in ("csv", "parquet"):
        raise ZooError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    if not isinstance(trust_manifest, bool):
        raise ZooError(f"trust_manifest must be True or False, got {trust_manifest!r}", argument="trust_manifest")
    source, arch, metadata = manifest_defaults(source, arch, metadata, trust_manifest)  # a folder with zoo.json
    metrics, pairs = tuple(metrics or ()), pair_measures(pairs or ())
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ZooError(f"unknown metrics {unknown}; per model {METRICS}, per pair {PAIR_MEASURES}")
    if not metrics and not pairs:
        raise ZooError(f"nothing to compute: give metrics (among {METRICS}) or pairs (among {PAIR_MEASURES})")
    _check_int("chunk_size", chunk_size, 1, allow_none=True)
    _check_int("max_pairs", max_pairs, 1, allow_none=True)
    try:
        _checks.generator(generator)  # checked only: an int is kept, it is recorded as the run's seed
    except TypeError as error:
        raise ZooError(str(error)) from None
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
    weights_only = factory is None and not any(isinstance(item, nn.Module) for _, item in members)
    dataflow = [m for m in metrics if m not in WEIGHT_METRICS]
    if weights_only and (dataflow or pairs):
        if not allow_pickle:  # state_dicts and model folders: nothing can run without the architecture
            needs = [*dataflow, *(["the pair measures"] if pairs else [])]
            verb = "needs" if needs == dataflow and len(needs) == 1 else "need"
            raise ZooError(f"{' and '.join(needs)} {verb} the models' dataflow, which state_dicts and model folders "
                           f"do not give: pass arch (without it only {' and '.join(WEIGHT_METRICS)} are computed, "
                           "from the weights)", argument="arch")
        weights_only = False  # trusted files may hold whole pickled modules, which run as they are
    metadata = check_metadata(metadata)
    run = _WeightMembers(members, allow_pickle, workers, progress) if weights_only else \
        _Members(members, factory, allow_pickle, example_input, workers, arch)
    model = run.template().template if factory is not None else None  # a factory that fails is a ZooError now
    if layers is not None or pairs:  # checked on the architecture now, not after the per-model phase
        if model is None:
            try:
                model = run.module(members[0][0])
            except ValueError:
                model = None  # an unusable first member: an error row later, not a reason to stop
        if model is not None and layers is not None:
            try:
                check_layers(model, layers)
            except ValueError as error:
                raise ZooError(str(error)) from None
        if model is not None and pairs:
            _check_probe(model, probe_parts(probe)[0], example_input)
    rank, world = _distributed()
    out_path = _agree(world, rank, lambda: check_out(out)) if out is not None else None
    lock = _Lock(out_path) if out_path is not None and rank == 0 else None
    seed = _agree(world, rank, lambda: _pair_seed(generator, out_path, pairs and max_pairs is not None))
    try:
        if out_path is not None:
            def prepare():
                lock.acquire()
                _reconcile_options(out_path, _run_options(arch, metrics, example_input, fmt, pairs, probe, layers,
                                                          max_pairs, seed, stitch_options,
                                                          route="weights" if weights_only else None))
                _verify_chunks(out_path, fmt)  # before any rank reads what is finished
            _agree(world, rank, prepare)
        return _run(run, members, out_path, rank, world, metrics, pairs, probe, layers, max_pairs, seed, fmt,
                    chunk_size, stitch_options, progress, report, metadata)
    finally:
        run.close()
        if lock is not None:
            lock.release()


def _check_probe(model: nn.Module, x: torch.Tensor, example_input=None):
    """ZooError (argument "probe") when the architecture cannot run on the
    probe's inputs: every pair would be an error row."""
    try:
        with torch.no_grad(), evaluating(model):
            model(x[:2])
    except Exception as error:  # a forward on the wrong input raises many kinds of errors
        expected = _input_shape(model, example_input)
        raise ZooError(f"probe inputs of shape {tuple(x.shape[1:])} ({str(x.dtype).removeprefix('torch.')}) do not "
                       f"fit the models" + (f", which take {expected}" if expected else "") + f" ({_reason(error)})",
                       argument="probe") from None


def _input_shape(model: nn.Module, example_input=None) -> str | None:
    """The shape of one input the model runs on: example_input's, or the
    first that works of those its first linear map suggests; None if none does."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    candidates = [example_input[:1]] if isinstance(example_input, torch.Tensor) else []
    if isinstance(first, nn.Linear):
        candidates.append(torch.zeros(1, first.in_features))
    elif first is not None:
        candidates += [torch.zeros(1, first.in_channels, *[size] * len(first.kernel_size))
                       for size in (8, 28, 32, 64, 224)]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for candidate in candidates:
        candidate = candidate.to(dtype) if candidate.is_floating_point() else candidate
        try:
            with torch.no_grad(), evaluating(model):
                model(candidate)
        except Exception:  # not this one
            continue
        return f"inputs of shape {tuple(candidate.shape[1:])} ({str(candidate.dtype).removeprefix('torch.')})"
    return None


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
        return ZooTables(**{t: pd.concat(memory[t], ignore_index=True) if memory[t] else pd.DataFrame()
                            for t in TABLES})
    if rank == 0:
        merged = _merge(out_path, fmt)
        if report:
            write_report(out_path, merged, metadata, progress)
    _barrier(world)
    return ZooTables(**{t: _read(out_path / f"{t}.{fmt}", fmt) for t in TABLES})


def _default_chunk_size(members) -> int:
    """256 members, fewer for large checkpoints: two chunks (the one analysed
    and the one read ahead) stay within about 1 GiB (a model folder counts
    its weight files; without arch only one tensor at a time is read, and
    the size keeps each committed chunk a few minutes of work)."""
    first = members[0][1]
    if isinstance(first, nn.Module):
        return 256
    return max(1, min(256, (512 << 20) // max(1, _checkpoint_bytes(pathlib.Path(first)))))


def _checkpoint_bytes(path: pathlib.Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    from ..weights import checkpoint_files

    try:
        files = checkpoint_files(str(path)) or []
    except ValueError:  # an unreadable index: that member's error row says so
        files = []
    files = files if files or not (path / "adapter_config.json").exists() else \
        [str(path / f) for f in ("adapter_model.safetensors", "adapter_model.bin")]
    return sum(pathlib.Path(f).stat().st_size for f in files if pathlib.Path(f).is_file())


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
    if isinstance(run, _WeightMembers):
        return _process_weights_chunk(chunk, run, metrics, reading)
    loaded = (reading or run.read([n for n, _ in chunk])).result()
    states = [item for _, item in loaded if isinstance(item, dict)]
    finite = all_finite_states(states)  # one check for the whole chunk; one per member only when it fails
    graphs, makers, errors = {}, {}, []
    with _collector_paused():
        for name, item in loaded:
            try:
                graphs[name], makers[name] = run.bind(name, item, checked=finite)
            except ValueError as error:
                errors.append({"model": name, "error": str(error)})
    sources = dict(chunk)
    for row in errors:  # the file at fault named in the row (the report shows model and error only)
        if not isinstance(sources.get(row["model"]), nn.Module):
            row["error"] = f"{pathlib.Path(sources[row['model']]).name}: {row['error']}"
    empty = {"models": pd.DataFrame(), "layers": pd.DataFrame(), "edges": pd.DataFrame()}
    if not metrics:
        tables = dict(empty, models=pd.DataFrame([{"model": n, "error": ""} for n in graphs]))
    elif graphs:
        try:
            tables = dict(model_metrics(_Lazy(makers), metrics, run.example_input, graphs=graphs), pairs=None)
            del tables["pairs"]  # a chunk of the per-model phase has no pairs table
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


def _process_weights_chunk(chunk, run: _WeightMembers, metrics, reading=None) -> dict[str, pd.DataFrame]:
    """The chunk's tables from the members' weights alone: their layers of one
    shape batched across members (weight_model_metrics); a member that cannot
    be read, or whose tensor is unreadable, NaN or infinite, is a models row
    with its error naming the file and the tensor, and the others go on."""
    loaded = (reading or run.read([n for n, _ in chunk])).result()
    errors, good = [], {}
    for name, item in loaded:
        if isinstance(item, Exception):
            errors.append({"model": name, "error": run.describe(name, str(item))})
        else:
            good[name] = item
    parts = []
    if good:
        try:
            parts.append(weight_model_metrics(good, metrics, progress=run.progress))
        except (ValueError, RuntimeError, OSError):  # one member spoils the batch: analyse one by one
            for name, entries in good.items():
                try:
                    parts.append(weight_model_metrics({name: entries}, metrics, progress=run.progress))
                except (ValueError, RuntimeError, OSError) as error:
                    errors.append({"model": name, "error": run.describe(name, str(error) or type(error).__name__)})
    tables = {t: pd.concat([p[t] for p in parts], ignore_index=True) if parts else pd.DataFrame()
              for t in ("models", "layers", "edges")}
    if len(tables["layers"]):
        sources = {n: run.sources[n] for n in good}
        tables["layers"]["source"] = [relative_to_member(sources[m], s)
                                      for m, s in zip(tables["layers"]["model"], tables["layers"]["source"])]
    if errors:
        tables["models"] = pd.concat([tables["models"], pd.DataFrame(errors)], ignore_index=True)
    if len(tables["models"]):
        tables["models"]["path"] = tables["models"]["model"].map({n: str(s) for n, s in chunk}).fillna("")
    return tables


def _error_row(pair, error: str) -> pd.DataFrame:
    return pd.DataFrame([{"model_a": pair[0], "model_b": pair[1], "layer": "", "measure": "",
                          "value": float("nan"), "error": error}])


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
    frames, good = [], []
    for pair in batch:
        if pair[0] in failed or pair[1] in failed:
            frames.append(_error_row(pair, failed.get(pair[0]) or failed[pair[1]]))
        else:
            good.append(pair)
    try:  # the chunk's pairs batched: each model's Gram / features once (pair_metrics)
        frames.append(pair_metrics(models, good, probe, layers, measures, stitch_options, cache, progress=False))
    except (ValueError, RuntimeError):  # a pair whose measure is undefined: one by one, a row saying so for it
        for pair in good:
            try:
                frames.append(pair_metrics(models, [pair], probe, layers, measures, stitch_options, cache,
                                           progress=False))
            except (ValueError, RuntimeError) as error:
                frames.append(_error_row(pair, " ".join(str(error).split())[:200]))
    if bar is not None:
        bar.update(len(batch))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


# ---------------------------------------------------------------------------------------------
# The report


def write_report(out: pathlib.Path, tables, metadata=None, progress: bool = True) -> pathlib.Path:
    """Write report.md with figures (spectral_ext.zoo.report.report).

    Members and errors, per-layer distributions, and with metadata (model and test_accuracy or accuracy)
    each metric against accuracy and the accuracy prediction from weights.

    Args:
        out: the results folder.
        tables: a ZooTables or {name: DataFrame}.
        metadata: the metadata table (default None).
        progress: a tqdm bar over the weight statistics (default True).

    Returns:
        The path of report.md.
    """
    from .report import report

    return report(out, tables, metadata, progress)


def _pair_seed(generator, out_path, sampled: bool) -> int:
    """The int seed of the pair sample (recorded in options.json): an int
    generator as it is; None or a torch.Generator draw one (None: from
    torch's global RNG), except that a resumed run given None takes its
    recorded seed and samples the same pairs; 0 when nothing is sampled."""
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, 2**62, (), generator=generator))
    if isinstance(generator, int) or not sampled:
        return generator or 0
    recorded = _stored_options(out_path).get("pairs", {}).get("seed") if out_path is not None else None
    return recorded if isinstance(recorded, int) else int(torch.randint(0, 2**62, ()))


def _sample_pairs(names: list[str], max_pairs: int | None, seed: int) -> list[tuple[str, str]]:
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = sorted(random.Random(seed).sample(pairs, max_pairs))
    return pairs
