"""Zoo members: finding them (a folder, paths or modules), reading and
checking checkpoints, and binding each to its architecture's one trace
without running constructors (the loading path of a zoo run)."""
from __future__ import annotations

import collections
import collections.abc
import contextlib
import gc
import importlib
import json
import math
import os
import pathlib
import pickle
import sys
from collections.abc import Callable

import torch
from torch import nn

from .. import _checks
from ..layers import _replace, discover
from ._base import ZooError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")


def resolve_arch(arch) -> Callable[[], nn.Module] | None:
    """An architecture factory from "package.module:function", a torchvision model name, or a callable.

    Raises ZooError (argument "arch") naming it when it cannot be imported or is not callable;
    build_model checks what calling it gives.

    Args:
        arch: "package.module:function", a torchvision model name, a callable, or None.

    Returns:
        The factory (a callable returning an nn.Module), or None when checkpoints hold whole modules
        (arch None).
    """
    if arch is None or callable(arch):
        return arch
    if not isinstance(arch, str) or not arch:
        raise ZooError(f"arch must be 'package.module:function', a torchvision model name or a callable, got {arch!r}",
                       argument="arch")
    if ":" in arch:
        module_name, _, function = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError, ValueError) as error:  # ValueError: an empty module name
            raise ZooError(f"unknown architecture {arch!r}: {error}", argument="arch") from error
        except Exception as error:  # the module's own top level failed
            raise ZooError(f"arch {arch!r}: importing {module_name} failed ({_reason(error)})",
                           argument="arch") from None
        if not callable(factory):
            raise ZooError(f"architecture {arch!r} is not callable (it is an object of type "
                           f"{type(factory).__name__}): arch must name a function that returns an nn.Module",
                           argument="arch")
        return factory
    try:
        import torchvision
    except ImportError as error:
        raise ZooError(f"unknown architecture {arch!r} (torchvision is not installed)", argument="arch") from error
    if arch not in torchvision.models.list_models():
        raise ZooError(f"unknown architecture {arch!r}: not 'package.module:function' and not a torchvision "
                       "model name", argument="arch")
    return lambda **kwargs: torchvision.models.get_model(arch, weights=None, **kwargs)  # kwargs: a manifest's


def _reason(error: BaseException) -> str:
    """An exception as one short line: its type and first line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def arch_label(arch) -> str:
    """How messages name an architecture: its string, or a callable's qualified name."""
    if arch is None or isinstance(arch, str):
        return repr(arch)
    inner = getattr(arch, "func", arch)  # a functools.partial (a manifest's arch_kwargs)
    return f"{getattr(inner, '__module__', '?')}:{getattr(inner, '__qualname__', type(inner).__name__)}"


def build_model(factory, arch=None) -> nn.Module:
    """factory() checked: ZooError (argument "arch") naming the architecture
    when it raises or gives something other than an nn.Module."""
    try:
        model = factory()
    except Exception as error:  # a user's factory can raise anything
        raise ZooError(f"arch {arch_label(arch if arch is not None else factory)} failed to build a model "
                       f"({_reason(error)})", argument="arch") from None
    if not isinstance(model, nn.Module):
        raise ZooError(f"arch {arch_label(arch if arch is not None else factory)} must return an nn.Module, it "
                       f"returned a {type(model).__name__}", argument="arch")
    return model


MODEL_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors",
               "pytorch_model.bin")  # a Hugging Face model folder's weights (with config.json, or a shard index)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # a PEFT adapter's (with adapter_config.json)


def model_folder(path) -> str | None:
    """What a folder holds as one model.

    Args:
        path: a folder (str or path-like).

    Returns:
        "lora" for a PEFT LoRA adapter (adapter_config.json with adapter_model.safetensors or .bin),
        "huggingface" for a model in the Hugging Face layout (config.json with model.safetensors,
        pytorch_model.bin or a shard index; a shard index alone too: its shards are one model), else None.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        return None
    if (path / "adapter_config.json").is_file() and any((path / f).is_file() for f in ADAPTER_FILES):
        return "lora"
    indexed = any((path / f).is_file() for f in MODEL_FILES[:2])
    if indexed or ((path / "config.json").is_file() and any((path / f).is_file() for f in MODEL_FILES[2:])):
        return "huggingface"
    return None


def list_members(source) -> list[tuple[str, object]]:
    """The members of a zoo: (name, path or module) pairs, sorted by name for a deterministic order.

    A checkpoint file is named by its path relative to the folder without the suffix ("cnn_00",
    "seed_1/epoch_3"); where two files would share a name (a.pt and a.safetensors) both are kept, each
    named with its suffix ("a.pt", "a.safetensors"). A sub-folder holding a model in the Hugging Face
    layout or a PEFT LoRA adapter (see model_folder) is one member named by its relative path
    ("llama_a", "adapters/run_1"), its files (shards, and whatever else it holds) not members of their
    own; a source that is such a folder is the one member, named by the folder.

    Args:
        source: a folder of checkpoints (searched recursively, hidden entries skipped), a list of paths,
            or a list/dict of nn.Modules.

    Returns:
        A list of (name, path or module); names are strings, never missing values: a member may be called
        "NA" or "None".
    """
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
        elif model_folder(root) is not None:
            items = [(root.resolve().name or str(root), root)]
        else:
            items = _folder_members(root)
    else:
        if isinstance(source, nn.Module) or not isinstance(source, collections.abc.Iterable):
            raise ZooError(f"source must be a folder, a file, a list of paths or modules, or a dict of modules, got "
                           f"{type(source).__name__}", argument="source")
        items = []
        for k, item in enumerate(source):
            if isinstance(item, nn.Module):
                items.append((f"model_{k:05d}", item))
            else:
                path = pathlib.Path(item)
                if not path.exists():
                    raise ZooError(f"no such checkpoint: {path}")
                items.append((str(path if path.is_dir() else path.with_suffix("")), path))
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})[:5]
        raise ZooError(f"two members share a name: {twice}")
    if not items:
        raise ZooError(f"no checkpoints ({', '.join(CHECKPOINT_SUFFIXES)}), Hugging Face model folders, LoRA "
                       f"adapter folders or models in {source!r}")
    return sorted(items, key=lambda item: item[0])


def _folder_members(root: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """The members under a folder: model folders as one member each (not searched further), checkpoint files."""
    files, folders = [], []
    for here, dirs, names in os.walk(root):  # symlinked folders are members when they hold a model, never walked
        base = pathlib.Path(here)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in list(dirs):
            if model_folder(base / d) is not None:
                folders.append(base / d)
                dirs.remove(d)
        files += [base / n for n in names if not n.startswith(".") and pathlib.Path(n).suffix in CHECKPOINT_SUFFIXES
                  and (base / n).is_file()]
    return _relative_names(root, files) + [(p.relative_to(root).as_posix(), p) for p in folders]


def _relative_names(root: pathlib.Path, paths) -> list[tuple[str, pathlib.Path]]:
    relative = [p.relative_to(root) for p in paths]
    stems = [r.with_suffix("").as_posix() for r in relative]
    clash = {s for s in stems if stems.count(s) > 1} if len(set(stems)) != len(stems) else set()
    return [(r.as_posix() if s in clash else s, p) for r, s, p in zip(relative, stems, paths)]


_MMAP_BYTES = 4 << 20  # below this a file is read whole (faster for tiny checkpoints), above it memory-mapped
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class _State(dict):
    """A state_dict read by _read_small_safetensors. `floats`: all its
    floating tensors as one flat view when they share a dtype and lie side
    by side in the file (then their finiteness is one reduction), else None."""

    floats = None


def _safetensors_layout(header: bytes, start: int, total: int):
    """(runs, names in order, index of the one floating run or None) of a
    safetensors header: runs of neighbouring tensors of one dtype, each
    (dtype, first byte, end byte, element counts, names, shapes); None when
    the header is unusual or the tensors do not tile the data exactly."""
    try:
        entries = json.loads(header)
        entries.pop("__metadata__", None)
        layout = sorted((int(i["data_offsets"][0]), int(i["data_offsets"][1]), _SAFETENSORS_DTYPES[i["dtype"]],
                         [int(n) for n in i["shape"]], name) for name, i in entries.items())
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None
    end, runs = 0, []
    for a, b, dtype, shape, name in layout:
        size = dtype.itemsize
        if a != end or b - a != math.prod(shape) * size or (start + a) % size or min(shape, default=0) < 0:
            return None
        if not runs or runs[-1][0] != dtype:
            runs.append((dtype, start + a, start + a, [], [], []))
        run = runs[-1]
        runs[-1] = run[:2] + (start + b,) + run[3:]
        run[3].append((b - a) // size), run[4].append(name), run[5].append(shape)
        end = b
    if start + end != total or len(layout) != len(entries):
        return None
    floating = [k for k, run in enumerate(runs) if run[0].is_floating_point]
    return runs, sorted(entries), floating[0] if len(floating) == 1 else None


_LAYOUTS: dict[tuple[bytes, int], tuple | None] = {}  # the members of a zoo share one header


def _read_small_safetensors(path: pathlib.Path) -> _State | None:
    """The tensors of a small safetensors file as views of one buffer read
    whole, in name order; None for anything unusual (another dtype, a
    misaligned or inconsistent layout, a short read), which safetensors then
    reads or rejects with its reason. Hand-written, with the parsed header
    cached: safetensors' load(bytes) cost 10x the read itself for a 20 KB
    checkpoint."""
    if sys.byteorder != "little":
        return None
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        if len(data) < 8 or f.readinto(data) != len(data):
            return None
    start = 8 + int.from_bytes(data[:8], "little")
    if start > len(data) or start % 8:
        return None
    key = (bytes(data[8:start]), len(data))
    if key not in _LAYOUTS:
        if len(_LAYOUTS) > 64:
            _LAYOUTS.clear()
        _LAYOUTS[key] = _safetensors_layout(key[0], start, len(data))
    if _LAYOUTS[key] is None:
        return None
    runs, names, floating = _LAYOUTS[key]
    buffer = torch.frombuffer(data, dtype=torch.uint8)
    tensors, flats = {}, []
    for dtype, a, b, sizes, run_names, shapes in runs:  # one view and one split per run
        flats.append(buffer[a:b].view(dtype))
        for name, shape, piece in zip(run_names, shapes, flats[-1].split_with_sizes(sizes)):
            tensors[name] = piece.view(shape)
    state = _State((name, tensors[name]) for name in names)
    state.floats = flats[floating] if floating is not None else None  # its finiteness is one reduction
    return state


def read_checkpoint(source, allow_pickle: bool = False) -> dict | nn.Module:
    """The state_dict (or, with allow_pickle, the module) a checkpoint holds.

    Safetensors files are memory-mapped (read whole when small), torch files read with
    torch.load(mmap=True), a Hugging Face model folder's files together (its shards). Raises ValueError
    with the reason.

    Args:
        source: a checkpoint file or a Hugging Face model folder (str or path-like).
        allow_pickle: allow a torch file to hold a whole pickled module (trusted files only) (default
            False).

    Returns:
        A dict {name: tensor}, or an nn.Module with allow_pickle.
    """
    path = pathlib.Path(source)
    if path.is_dir():
        return _read_folder_checkpoint(path, allow_pickle)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load, load_file

            if path.stat().st_size > _MMAP_BYTES:
                state = load_file(str(path))
            else:
                state = _read_small_safetensors(path)
                state = state if state is not None else load(path.read_bytes())
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
        foreign = _not_a_torch_file(path) if path.suffix != ".safetensors" else None
        if foreign is not None:  # the unpickler's own error (IndexError, KeyError: 101) says nothing useful
            raise ValueError(f"unreadable checkpoint ({foreign})") from error
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


def _read_folder_checkpoint(path: pathlib.Path, allow_pickle: bool = False) -> dict:
    """The state_dict of a Hugging Face model folder: its one weight file, or
    its shards' tensors together (the shard index's files, in its order)."""
    from .. import weights

    if model_folder(path) == "lora":
        raise ValueError("a LoRA adapter folder holds a low-rank update, not a model's weights: analyse it without "
                         "arch (rank and alpha are read from its weights)")
    files = weights.checkpoint_files(str(path))  # a WeightError (ValueError) for an unreadable index
    if files is None:
        raise ValueError(f"unreadable checkpoint ({path.name} is a folder without model.safetensors, a shard index "
                         "or pytorch_model.bin)")
    state = {}
    for file in files:
        if not os.path.exists(file):
            raise ValueError(f"unreadable checkpoint ({os.path.basename(file)}: named by the shard index but missing)")
        try:
            part = read_checkpoint(file, allow_pickle)
        except ValueError as error:
            raise ValueError(f"{os.path.basename(file)}: {error}") from error
        if isinstance(part, nn.Module):
            raise ValueError(f"{os.path.basename(file)} holds a whole module, not a shard of a state_dict")
        state.update(part)
    return state


def _not_a_torch_file(path: pathlib.Path) -> str | None:
    """Why a file that torch.load refused is no torch file at all (a torch
    file is a zip archive, or a pickle for the legacy format), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return None
    if not head:
        return "an empty file, not a PyTorch checkpoint"
    kind = "a text file" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "not a zip archive or a pickle"
    return f"not a PyTorch checkpoint: {kind} starting {head[:12]!r}"


def all_finite_states(states) -> bool:
    """True when no floating tensor of any of the state_dicts holds a NaN or
    an infinity: one reduction for them all, over one stack per key of the
    states that share their keys (a zoo's members: a few stacks, not a
    flattening per tensor)."""
    parts, by_keys = [], {}
    for state in states:
        if getattr(state, "floats", None) is not None:
            parts.append(state.floats)
        else:
            by_keys.setdefault(tuple(state), []).append(state)
    with torch.no_grad():
        for keys, group in by_keys.items():
            for key in keys:
                tensors = [state[key] for state in group]
                try:
                    stacked = torch.stack(tensors).reshape(-1)
                except RuntimeError:  # shapes differ across the states
                    parts.extend(t.reshape(-1) for t in tensors if t.is_floating_point() or t.is_complex())
                    continue
                if stacked.is_floating_point() or stacked.is_complex():
                    parts.append(stacked)
    return not parts or _checks.all_finite(torch.cat(parts) if len(parts) > 1 else parts[0])


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """{qualified name: tensor} of a module's parameters and persistent
    buffers, the keys and tensors of its state_dict (without state_dict
    hooks). Hand-written: state_dict's per-module hooks and frames cost more
    than the analysis of a small zoo member."""
    out, stack = {}, [("", module)]
    while stack:
        prefix, current = stack.pop()
        for k, p in current._parameters.items():
            if p is not None:
                out[prefix + k] = p
        if current._buffers:
            skipped = current._non_persistent_buffers_set
            for k, b in current._buffers.items():
                if b is not None and k not in skipped:
                    out[prefix + k] = b
        children = current._modules
        if children:
            stack.extend((f"{prefix}{k}.", c) for k, c in reversed(children.items()) if c is not None)
    return out


def _matching_dtypes(state: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """state with each tensor in its architecture's dtype (a float16
    checkpoint of a float32 model is cast, as load_state_dict does); ValueError
    naming the first tensor whose values are integers or booleans where the
    architecture holds floating ones (they are not weights)."""
    cast = None
    for k, v in state.items():
        want = dtypes.get(k)
        if want is None or v.dtype == want:
            continue
        if (want.is_floating_point or want.is_complex) and not (v.is_floating_point() or v.is_complex()):
            raise ValueError(f"checkpoint tensor {k} holds {str(v.dtype).removeprefix('torch.')} values, the "
                             f"architecture a {str(want).removeprefix('torch.')} tensor")
        cast = dict(state) if cast is None else cast
        cast[k] = v.to(want)
    return state if cast is None else cast


def check_finite(state: dict[str, torch.Tensor]) -> None:
    """Check that no floating tensor of a state holds a NaN or an infinity.

    Raises ValueError naming the first floating tensor (weights and buffers such as BatchNorm's
    running_var) that does.

    Args:
        state: a state_dict {name: tensor}.

    Returns:
        None.
    """
    if not all_finite_states([state]):
        bad = next(k for k, v in state.items()
                   if (v.is_floating_point() or v.is_complex()) and not _checks.all_finite(v.detach()))
        raise ValueError(f"NaN or infinite values in {bad}")


def load_member(source, factory, allow_pickle: bool = False) -> nn.Module:
    """A model from a path or a module, in eval mode.

    Raises ValueError with the reason for anything unusable (unreadable, not matching the architecture, a
    NaN or infinity in any floating tensor, buffers included).

    Args:
        source: a checkpoint path (state_dict in .pt/.pth/.bin, or .safetensors, or a Hugging Face
            folder) or an nn.Module.
        factory: the architecture factory (resolve_arch) a state_dict is loaded into; None when the
            checkpoints hold whole modules.
        allow_pickle: allow a torch file to hold a whole pickled module (trusted files only) (default
            False).

    Returns:
        The nn.Module, in eval mode.
    """
    if isinstance(source, nn.Module):
        model = source
    else:
        state = read_checkpoint(source, allow_pickle)
        if isinstance(state, nn.Module):
            model = state
        else:
            if factory is None:
                raise ValueError("the checkpoint is a state_dict: pass arch to build the model")
            model = build_model(factory)
            state = _matching_dtypes(state, {k: v.dtype for k, v in model.state_dict().items()})
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as error:
                reason = " ".join(str(error).split())[:300]
                raise ValueError(f"checkpoint does not match the architecture ({reason})") from error
    check_finite(model.state_dict())
    return model.eval()


_CONTAINERS = (dict, collections.OrderedDict, set, list)


def _recipe(template: nn.Module, prefix: str, recipes: dict) -> tuple:
    """What _instantiate does to `template` (its containers to copy, its
    parameters', buffers' and children's state keys), worked out once per run
    and module: per member only the copies remain."""
    recipe = recipes.get((id(template), prefix))
    if recipe is None or recipe[0] is not template:
        own = ("_parameters", "_buffers", "_modules")
        containers = tuple(k for k, v in template.__dict__.items() if type(v) in _CONTAINERS and k not in own)
        parameters = tuple((k, None if p is None else prefix + k, p is not None and p.requires_grad)
                           for k, p in template._parameters.items())
        buffers = tuple((k, prefix + k, b) for k, b in template._buffers.items())
        children = tuple((k, c, f"{prefix}{k}.") for k, c in template._modules.items())
        recipe = recipes[(id(template), prefix)] = (template, containers, parameters, buffers, children)
    return recipe


def _instantiate(template: nn.Module, state: dict[str, torch.Tensor], prefix: str = "",
                 recipes: dict | None = None) -> nn.Module:
    """A copy of `template` holding `state`'s tensors, without running the
    constructor (its random initialisation costs more than the analysis of a
    small model): the module tree, its containers (hooks included) copied,
    other attributes shared. Hand-written because deepcopy and meta-device
    construction were 3-10x slower here. recipes: a run's cache of _recipe."""
    recipes = {} if recipes is None else recipes
    _, containers, parameters, buffers, children = _recipe(template, prefix, recipes)
    module = object.__new__(type(template))
    attrs = module.__dict__
    attrs.update(template.__dict__)
    for key in containers:
        attrs[key] = attrs[key].copy()
    # Parameter(t, grad) is this call for a plain tensor, without its Python-level frame
    attrs["_parameters"] = {k: None if key is None else torch.Tensor._make_subclass(nn.Parameter, state[key], grad)
                            for k, key, grad in parameters}
    attrs["_buffers"] = {k: None if b is None else state.get(key, b) for k, key, b in buffers}
    attrs["_modules"] = {k: None if c is None else _instantiate(c, state, child_prefix, recipes)
                         for k, c, child_prefix in children}
    return module


class _Architecture:
    """One architecture of a run: a template model, its parameter and buffer
    shapes, and its one dataflow trace, shared by every member."""

    def __init__(self, template: nn.Module, example_input):
        self.template = template
        self.shapes = {k: (v.shape, v.dtype) for k, v in template.state_dict().items()}
        self.recipes = {}
        self.example_input = example_input
        self._graph, self._error = None, None

    @property
    def graph(self):
        if self._graph is None and self._error is None:  # traced once: the only forward runs of this architecture
            try:
                self._graph = discover(self.template, self.example_input)
            except ValueError as error:
                self._error = ValueError(f"the architecture could not be traced ({' '.join(str(error).split())[:300]})")
        if self._error is not None:
            raise self._error  # every member of it says why, without tracing again
        return self._graph

    def check(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """state, its tensors in the architecture's dtypes; ValueError for a
        missing or unexpected key, another shape or integer weights."""
        if state.keys() != self.shapes.keys():
            missing = sorted(self.shapes.keys() - state.keys())[:5]
            unexpected = sorted(state.keys() - self.shapes.keys())[:5]
            raise ValueError(f"checkpoint does not match the architecture (missing keys {missing}, unexpected "
                             f"keys {unexpected})")
        shapes, other_dtype = self.shapes, False
        for k, v in state.items():
            if v.shape != shapes[k][0]:
                raise ValueError(f"checkpoint does not match the architecture ({k} has shape {tuple(v.shape)}, "
                                 f"the architecture {tuple(shapes[k][0])})")
            other_dtype = other_dtype or v.dtype != shapes[k][1]
        return _matching_dtypes(state, {k: dtype for k, (_, dtype) in shapes.items()}) if other_dtype else state

    def bind(self, state: dict[str, torch.Tensor]):
        """(graph, module factory) of a checked member given as a state_dict:
        the maps' modules hold its weights; the whole module is built only
        when asked for (the SVR and the pair measures run it)."""
        graph, recipes = self.graph, self.recipes
        maps = {}
        for name, m in graph.maps.items():
            bn = _instantiate(m.batchnorm, state, f"{m.batchnorm_name}.", recipes) if m.batchnorm is not None else None
            maps[name] = _replace(m, module=_instantiate(m.module, state, f"{name}.", recipes), batchnorm=bn)
        return _replace(graph, maps=maps), lambda: _instantiate(self.template, state, "", recipes)


class _Members:
    """The members of a run: read in parallel (a thread pool; file reads and
    tensor copies release the GIL), checked, and bound to their
    architecture's trace."""

    def __init__(self, members, factory, allow_pickle: bool, example_input, workers: int | None = None, arch=None):
        self.sources = dict(members)
        self.factory, self.allow_pickle, self.example_input = factory, allow_pickle, example_input
        self.arch = arch  # as the user gave it, for messages
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

    def bind(self, name, loaded, checked: bool = False, state: dict | None = None):
        """(graph, module factory) of a read member; ValueError for a bad one
        (checked: its tensors are known to be finite; state: a module's
        module_tensors, when the caller has them)."""
        if isinstance(loaded, Exception):
            raise loaded
        if isinstance(loaded, nn.Module):
            state = module_tensors(loaded) if state is None else state
            if not checked:
                check_finite(state)
            key = (type(loaded).__module__, type(loaded).__qualname__, tuple(state), tuple(v.shape for v in state.values()))
            arch = self._architecture(key, lambda: loaded)
            graph = arch.graph if arch.template is loaded else arch.graph.for_model(loaded)
            return graph, lambda: loaded
        if self.factory is None:
            raise ValueError("the checkpoint is a state_dict: pass arch to build the model")
        arch = self.template()
        state = arch.check(loaded)
        if not checked or state is not loaded:  # a cast can overflow (float64 1e300 to float32)
            check_finite(state)
        return arch.bind(state)

    def template(self) -> "_Architecture":
        """The factory's architecture, built once; ZooError (argument "arch")
        when the factory fails (every member would)."""
        return self._architecture(("factory",), lambda: build_model(self.factory, self.arch).eval())

    def module(self, name) -> nn.Module:
        graph, make = self.bind(name, self._read(name))
        return make()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def read_member_weights(source, allow_pickle: bool = False) -> list:
    """The weight tensors of a member for the weights route (no architecture).

    weights.read_path of a checkpoint file or a Hugging Face or LoRA folder, every tensor of two or more
    dimensions (vectors have no spectrum). ValueError (weights.WeightError naming the file and the
    tensor) for anything unreadable or without a weight to analyse.

    Args:
        source: a checkpoint file or a Hugging Face or LoRA folder (str or path-like).
        allow_pickle: a torch file may hold a whole pickled module (trusted files only), read as that
            module (default False).

    Returns:
        A list of weights.WeightTensor, one per tensor of two or more dimensions.
    """
    from .. import weights

    path = pathlib.Path(source)
    if allow_pickle and path.is_file() and path.suffix != ".safetensors":
        entries = weights.read_weights(read_checkpoint(path, allow_pickle=True))
    else:
        entries = weights.read_path(path)
    entries = [e for e in entries if e.kind != "vector"]
    if not entries:
        raise ValueError("no weight to analyse (no tensor of two or more dimensions)")
    return entries


class _WeightMembers(_Members):
    """The members of a run without an architecture: each read as its weight
    tensors (read_member_weights: headers only, every tensor is read when
    the analysis asks for it), in the run's reading threads."""

    def __init__(self, members, allow_pickle: bool, workers: int | None = None, progress: bool = False):
        super().__init__(members, None, allow_pickle, None, workers)
        self.progress = progress  # a bar over the bytes of each chunk's weights

    def _read(self, name):
        try:
            return read_member_weights(self.sources[name], self.allow_pickle)
        except Exception as error:  # third-party readers raise many kinds: an error row, and the run goes on
            return error if isinstance(error, ValueError) else ValueError(_reason(error))

    def describe(self, name, text: str) -> str:
        """An error of a member as one line naming its file: paths relative to the member's folder."""
        path = pathlib.Path(self.sources[name])
        text = " ".join(relative_to_member(path, str(text)).split())
        return text if text.startswith((f"{path.name}:", f"{path.name}/")) else f"{path.name}: {text}"

    def bind(self, name, loaded, checked: bool = False, state=None):
        raise ValueError("the checkpoint is a state_dict: pass arch to build the model")

    def template(self):
        raise ZooError("no architecture: the members are read as weights", argument="arch")


def relative_to_member(path: pathlib.Path, text: str) -> str:
    """text with the member's folder (a file's folder, or the folder above a model folder) left out of its paths."""
    return text.replace(str(pathlib.Path(path).parent) + os.sep, "")


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
