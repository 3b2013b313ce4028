"""Zoo members: finding them (a folder, paths or modules), reading and
checking checkpoints, and binding each to its architecture's one trace
without running constructors (the loading path of a zoo run)."""
from __future__ import annotations

import collections
import collections.abc
import contextlib
import gc
import importlib
import os
import pathlib
import pickle
from collections.abc import Callable

import torch
from torch import nn

from .. import _checks
from ..layers import discover
from ._base import ZooError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")


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
